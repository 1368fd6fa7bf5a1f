"""Autoguidance for `GuidedDiffusionPipeline(autoguide=...)`: the guide as a path or a loaded pipeline,
checked against the main pipeline, and the model function eps_guide + w (eps_main - eps_guide) with
both given the same condition and CFG off (diffusion/sampling/autoguide.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .cli.args import BadType, BadValue
from .errors import preview
from .sampling.autoguide import Autoguidance, pairing_table, plain, refuse_mismatch

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


def pairing_table_of(pipe: GuidedDiffusionPipeline, schedule) -> dict[str, Any]:
    """sampling.autoguide.pairing_table of an exported pipeline (its U-Net config and `schedule`; the class
    count without the null class CFG training adds)."""
    config = pipe.unet.config
    condition = "text" if pipe.text_encoder is not None else ("class" if config.get("num_class_embeds") else "none")
    return pairing_table(resolution=config.sample_size, in_channels=config.in_channels, out_channels=config.out_channels,
                         formulation=schedule.formulation, condition=condition,
                         classes=(config.num_class_embeds - 1) if condition == "class" else None)


def check_pipelines(main: GuidedDiffusionPipeline, guide: GuidedDiffusionPipeline) -> None:
    """check_pair's table on exported pipelines: resolution, channels, formulation, condition, classes, noise levels."""
    main_schedule, guide_schedule = main.schedule(), guide.schedule()
    refuse_mismatch(pairing_table_of(main, main_schedule), pairing_table_of(guide, guide_schedule), main_schedule,
                    guide_schedule, "autoguide", BadValue)


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
