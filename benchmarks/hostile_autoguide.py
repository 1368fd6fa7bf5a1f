"""The autoguidance cases of the hostile-input drill (`AUTOGUIDE_CASES`, joined in benchmarks/hostile_cases.py):
guides that cannot pair with the drill's tiny run (written untrained into the case's folder by
`fresh_checkpoint`, nothing trained), a missing guide, and `--unconditional` where it makes no sense.
Each must end in one `error:` line naming the mismatch, exit status 2."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from benchmarks.hostile_env import Case, Env, sample_argv


def fresh_checkpoint(folder: Path, *overrides: str, config: str = "configs/shapes.yaml", classes: int = 12) -> Path:
    """An untrained checkpoint of the tests' tiny config with `overrides` (built and saved, no training);
    `classes` is set after the config's checks, which tie model.num_classes to the dataset's 12."""
    import torch

    from diffusion.checkpoints import store
    from diffusion.config import save_config
    from diffusion.models import build_model
    from tests.conftest import tiny_config

    cfg = tiny_config(folder, "model.num_classes=12", *overrides, config=config)
    if cfg.model.condition == "class":
        cfg.model.num_classes = classes
    torch.manual_seed(len(overrides))
    model = build_model(cfg)
    folder.mkdir(parents=True)
    store.write_weights(folder / store.EMA_FILE, store.named_weights(model))
    save_config(cfg, folder / store.CONFIG_FILE)
    store.write_info(folder, store.TrainState())
    return folder


def guide(*overrides: str, config: str = "configs/shapes.yaml", classes: int = 12) -> Callable[[Env, Path], None]:
    def prepare(env: Env, folder: Path) -> None:
        fresh_checkpoint(folder / "guide", *overrides, config=config, classes=classes)
    return prepare


def case(name: str, words: str, prepare: Callable[[Env, Path], None] | None = None, *extra: str,
         checkpoint: str = "{run}") -> Case:
    argv = sample_argv(*(extra or ("--autoguide", "{folder}/guide")), checkpoint=checkpoint)
    return Case("autoguide", name, argv, words, prepare=prepare, quick=False, timeout=600)  # a loaded CPU is slow to start


NO_DROP = ("model.cond_drop_prob=0", "sample.guidance_scale=1")
UNCOND = ("model.condition=none", "model.num_classes=0")

AUTOGUIDE_CASES = [
    case("guide at another resolution", "data.resolution is 16 there but 8 here", guide("data.resolution=16")),
    case("guide of the other formulation", "diffusion.formulation is edm there but ddpm here",
         guide("diffusion.formulation=edm")),
    case("guide with other timesteps", "diffusion.num_train_timesteps is 50 there but 100 here",
         guide("diffusion.num_train_timesteps=50")),
    case("guide with another beta schedule", "diffusion.beta_schedule is linear there but cosine here",
         guide("diffusion.beta_schedule=linear")),
    case("unconditional guide of a class model", "model.condition is none there but class here",
         guide(*UNCOND, config="configs/shapes_uncond.yaml")),
    case("caption guide of a class model", "model.condition is text there but class here",
         guide("model.num_classes=0", "model.condition=text", "model.text.width=16", "model.text.layers=1",
               "model.text.heads=2", "model.text.context_length=8", config="configs/shapes_text.yaml")),
    case("guide with 5 classes", "the number of classes is 5 there but 12 here", guide(classes=5)),
    case("in-painting guide (mask channels)", "model.inpaint (mask input channels) is True there",
         guide("model.inpaint=true", "init_from=null", config="configs/inpaint_shapes.yaml")),
    case("a classifier as the guide", "is a classifier checkpoint", guide(config="configs/classifier_shapes.yaml")),
    case("guide not found", "not found", None),
    case("guide is an empty folder", "neither a checkpoint nor a run directory",
         lambda env, folder: (folder / "guide").mkdir()),
    case("--guidance-scale -1 with a guide", "--guidance-scale", guide(), "--autoguide", "{folder}/guide",
         "--guidance-scale", "-1"),
    case("--unconditional with --class-label", "leave out --class-label", None, "--unconditional", "--class-label", "2"),
    case("--unconditional on an unconditional model", "unconditional already", guide(*UNCOND,
         config="configs/shapes_uncond.yaml"), "--unconditional", checkpoint="{folder}/guide"),
    case("--unconditional without condition dropout", "without condition dropout", guide(*NO_DROP),
         "--unconditional", checkpoint="{folder}/guide"),
    case("--unconditional with a guide without dropout", "the guide", guide(*NO_DROP), "--unconditional",
         "--autoguide", "{folder}/guide"),
]
