"""Drill cases of issue #34, classes 6 and 7: config values valid alone but meaningless together
(diffusion/config_readers.py), and GuidedDiffusionPipeline.__call__'s arguments (diffusion/pipeline.py).

Config cases run train.py on the tiny override list (refused before anything is built). Pipeline cases
are `python -c` processes that load the drill's tiny run as a pipeline and call it: a ValueError or
TypeError is printed as one `error:` line with exit status 2, as a library caller would report it;
anything else (a tensor error, an IndexError) is a traceback and counts against the case.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from benchmarks.hostile_env import Case, Env, train_argv

COMBINATIONS = [  # (config, overrides, words of the one error line)
    ("classifier_shapes", ["model.inpaint=true"], "model.inpaint"),
    ("classifier_shapes", ["model.upsample=true"], "model.upsample"),
    ("clip_shapes", ["model.inpaint=true"], "model.inpaint"),
    ("shapes", ["task=classifier"], "model.condition"),
    ("classifier_shapes", ["model.condition=class"], "model.condition"),
    ("clip_shapes", ["model.num_classes=12"], "model.num_classes"),
    ("shapes_uncond", ["model.num_classes=12"], "model.num_classes"),
    ("shapes_uncond", ["model.cond_drop_prob=0.5"], "model.cond_drop_prob"),
    ("shapes", ["model.text.width=16"], "model.text.width"),
    ("shapes", ["sample.prompts=[a red circle]"], "sample.prompts"),
    ("shapes", ["model.pool=mean"], "model.pool"),
    ("shapes", ["model.vision.width=64"], "model.vision.width"),
    ("shapes", ["train.caption_word_drop=0.3"], "train.caption_word_drop"),
    ("shapes", ["inpaint.box=2"], "inpaint.box"),
    ("shapes", ["upsample.factor=2"], "upsample.factor"),
    ("shapes", ["diffusion.p_mean=0"], "diffusion.p_mean"),
    ("shapes", ["diffusion.sigma_data=1"], "diffusion.sigma_data"),
    ("shapes", ["train.compile_backend=eager"], "train.compile_backend"),
    ("shapes", ["train.ema_warmup=false", "train.ema_power=0.5"], "train.ema_power"),
    ("shapes", ["data.subset_seed=3"], "data.subset_seed"),
    ("shapes", ["data.celeba_attributes=[Male]"], "data.celeba_attributes"),
    ("shapes", ["model.num_classes=3"], "model.num_classes"),
    ("shapes", ["model.num_classes=20"], "model.num_classes"),
    ("shapes", ["data.name=celeba"], "data.celeba_attributes"),
    ("shapes_text", ["data.name=celeba", "data.celeba_captions=class"], "data.celeba_captions=class"),
    ("shapes", ["model.cond_drop_prob=0"], "model.cond_drop_prob=0"),
    ("shapes", ["sample.churn_min=5", "sample.churn_max=1"], "sample.churn_min"),
]
WORKS = [  # (config, overrides): keys at their defaults, or knobs the table tolerates unread (more in
    # tests/test_config_combinations.py, which loads them without training)
    ("shapes", ["diffusion.formulation=edm", "model.inpaint=false", "upsample.factor=4"]),
]

PIPELINE_CALL = """\
import sys
import numpy as np
import torch
from diffusion.pipeline import GuidedDiffusionPipeline
pipe = GuidedDiffusionPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
kwargs = eval(sys.argv[2])
try:
    images = pipe(**{"num_inference_steps": 2, **kwargs}).images
except (ValueError, TypeError) as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
print(f"{len(images)} images")
"""

PIPELINE = [  # (keyword arguments of __call__, as Python, words of the one error line); a process each (~20 s
    # idle), so the neighbours are left to tests/test_properties_pipeline.py
    ("dict(guidance_scale=float('nan'))", "guidance_scale"),
    ("dict(guidance_scale=float('-inf'))", "guidance_scale"),
    ("dict(prompt='a red circle')", "prompt"),
    ("dict(prompt=['a red circle'], class_labels=[1])", "prompt"),
    ("dict(class_labels=[1.7])", "class_labels[0]"),
    ("dict(class_labels=torch.tensor([1.7]))", "class_labels"),
    ("dict(class_labels=[[1, 2], [3]])", "class_labels[0]"),
    ("dict(class_labels=[12])", "class_labels[0] 12 is out of range"),
    ("dict(num_inference_steps=2.5)", "num_inference_steps"),
    ("dict(num_inference_steps=101)", "num_inference_steps 101"),
    ("dict(class_labels=[1, 2], batch_size=3)", "batch_size=3 does not match"),
    ("dict(batch_size=-2)", "batch_size"),
    ("dict(batch_size=10**15)", "batch_size"),
    ("dict(seed=1, generator=torch.Generator())", "seed or generator"),
    ("dict(generator=[torch.Generator()] * 3, class_labels=[1, 2])", "generator"),
    ("dict(output_type='latent')", "output_type"),
    ("dict(return_dict='yes')", "return_dict"),
]


def pipeline_argv(kwargs: str) -> Callable[[Env, Path], list[str]]:
    return lambda env, folder: ["python", "-c", PIPELINE_CALL, str(env.run / "final"), kwargs]


def images_written(count: int) -> Callable:
    def check(env: Env, folder: Path, result) -> str | None:
        return None if f"{count} images" in result.out else f"expected {count} images, got {result.out[-200:]!r}"
    return check


ROUND3_COMBINATIONS = [
    *[Case("config combinations", f"{config}.yaml {' '.join(overrides)}",
           train_argv(*overrides, config=f"configs/{config}.yaml"), words) for config, overrides, words in COMBINATIONS],
    *[Case("config combinations", f"{config}.yaml {' '.join(overrides)} (works)",
           train_argv(*overrides, steps=1, config=f"configs/{config}.yaml"), status=0, words=None, quick=False)
      for config, overrides in WORKS],
    *[Case("pipeline arguments", f"pipe(**{kwargs})", pipeline_argv(kwargs), words, quick=False)
      for kwargs, words in PIPELINE],
    Case("pipeline arguments", "pipe(class_labels=2, batch_size=3) (works)", pipeline_argv("dict(class_labels=2, batch_size=3)"),
         status=0, words=None, check=images_written(3), quick=False),
]
