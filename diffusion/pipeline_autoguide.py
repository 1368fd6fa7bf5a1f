"""Autoguidance for `GuidedDiffusionPipeline(autoguide=...)`: the guide as a path or a loaded pipeline,
checked against the main pipeline, and the model function eps_guide + w (eps_main - eps_guide) with
both given the same condition and CFG off (diffusion/sampling/autoguide.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .cli.args import BadType, BadValue
from .errors import preview
from .sampling.autoguide import Autoguidance, plain
from .sampling.schedule import EDMSchedule

GuidedDiffusionPipeline = Any  # diffusion/pipeline.py's class; it imports this module, so not imported back


def load_guide(pipe: GuidedDiffusionPipeline, value: Any, cache: dict[str, Any]) -> GuidedDiffusionPipeline:
    """The guide pipeline: `value` itself, or the export folder it names (loaded once, on the pipeline's
    device), refused with a BadValue naming the mismatch when it cannot guide `pipe`."""
    if isinstance(value, type(pipe)):
        guide = value
    elif isinstance(value, (str, Path)):
        key = str(Path(value).resolve())
        if key not in cache:
            if not (Path(value) / "model_index.json").is_file():
                raise BadValue(f"autoguide: {preview(str(value))} is not an exported pipeline folder (RUN/final with "
                               "model_index.json): give the guide run's final folder or a loaded pipeline")
            cache[key] = type(pipe).from_pretrained(str(value)).to(pipe.unet.device)
        guide = cache[key]
    else:
        raise BadType(f"autoguide must be a pipeline folder or a GuidedDiffusionPipeline, got {preview(value)}")
    if guide.unet.device != pipe.unet.device:
        raise BadValue(f"autoguide is on {guide.unet.device} but this pipeline on {pipe.unet.device}: move it with .to()")
    check_pipelines(pipe, guide)
    return guide


def check_pipelines(main: GuidedDiffusionPipeline, guide: GuidedDiffusionPipeline) -> None:
    """The checks of `check_pair` on exported pipelines: resolution, channels, condition, classes, noise levels."""
    a, b = main.unet.config, guide.unet.config
    kind = lambda p: "text" if p.text_encoder is not None else ("class" if p.unet.config.num_class_embeds else "none")  # noqa: E731
    rows = [("resolution (sample_size)", a.sample_size, b.sample_size), ("input channels", a.in_channels, b.in_channels),
            ("output channels", a.out_channels, b.out_channels), ("condition", kind(main), kind(guide)),
            ("class embeddings (classes + null)", a.get("num_class_embeds"), b.get("num_class_embeds"))]
    s_main, s_guide = main.schedule(), guide.schedule()
    rows.append(("formulation", s_main.formulation, s_guide.formulation))
    for what, mine, theirs in rows:
        if mine != theirs:
            raise BadValue(f"autoguide does not pair with this pipeline: its {what} is {theirs}, here {mine}; "
                           "a guide must be the same kind of model of the same data")
    if not isinstance(s_main, EDMSchedule) and not torch.equal(s_main.table.cpu(), s_guide.table.cpu()):
        raise BadValue("autoguide does not pair with this pipeline: its noise levels (alpha_bar per timestep) differ")


def guided(main: GuidedDiffusionPipeline, guide: GuidedDiffusionPipeline, unet_fn, labels, prompts, batch: int,
           scale: float) -> Autoguidance:
    """The pipeline's model function under autoguidance: each model's conditional prediction (or its null
    condition for unconditional images), combined with strength `scale`."""
    device = main.unet.device

    def condition(pipe: GuidedDiffusionPipeline) -> dict:
        cond, uncond = pipe._condition(labels, prompts, batch, device)
        return cond or uncond

    return Autoguidance(plain(unet_fn(main.unet), condition(main)), plain(unet_fn(guide.unet), condition(guide)),
                        guide.schedule().to(device), scale)
