"""sample.py feature: diffusion upsamplers, as a cascade or on a user's image.

- `--checkpoint BASE --upsampler UP_RUN`: the base samples as usual, then each sample is
  upsampled with the same seed and the same class or caption. `sample_NNNN.png` is the high-res
  result and `lowres_NNNN.png` the base sample; both carry the settings of both stages
  (the upsampler's under `upsampler_*` keys). `--upsampler-sampler/-steps/-guidance-scale` set the
  second stage (default: the upsampler run's config).
- `--checkpoint UP_RUN --low-res photo.png`: super-resolves one image, resized (short side) and
  centre-cropped to the model's low resolution; `bicubic_NNNN.png` (the bicubic upsample of the
  same input) and `lowres_NNNN.png` are written beside each sample.
`--aug-level L` (a fraction of the training timesteps in [0, 1]; a sigma for edm models; 0 = clean) noises the upsampled
low-res input as in training (default: the upsampler's `upsample.aug_level`). `--consistency`
(default: `upsample.consistency`) projects every step's predicted image so that it downsamples exactly
to the low-res input.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..choices import SAMPLERS
from ..errors import UserError

if TYPE_CHECKING:  # the rest is imported where it is used, so that building the parser needs no torch
    import torch

    from ..checkpoints.load import LoadedModel
    from ..sampling.plan import SampleItem, SamplingPlan


def is_upsampler(loaded: LoadedModel) -> bool:
    return bool(getattr(loaded.cfg.model, "upsample", False))


def load_low_res(path: str | Path, resolution: int) -> torch.Tensor:
    """(1, 3, r, r) in [-1, 1]: any image `data.common.read_image` reads (every mode, EXIF-rotated, 16-bit
    scaled, odd sizes), resized and centre-cropped."""
    from ..conditioning import upsample as up
    from ..data.common import image_transform, read_image

    image = read_image(path, what="--low-res")  # the one reader: its errors name the file and the fix
    return up.quantise(image_transform(resolution)(image).unsqueeze(0))


def aug_level(args: argparse.Namespace, loaded: LoadedModel) -> int | float:
    """The integer level of a fraction of the timesteps (ddpm), or a sigma (edm)."""
    from ..conditioning import upsample as up

    value = loaded.cfg.upsample.aug_level if args.aug_level is None else args.aug_level
    if loaded.schedule.formulation != "edm" and not 0.0 <= value <= 1.0:
        raise UserError(f"--aug-level is a fraction of the training timesteps in [0, 1] (0 = clean); got {value}")
    return up.aug_level(value, loaded.schedule)


def aug_level_meta(args: argparse.Namespace, loaded: LoadedModel) -> dict[str, str]:
    """PNG metadata: `aug_level` as the user gives it (--aug-level, else the config's), and the level the model
    reads (`aug_level_input`: a timestep on ddpm models, c_noise on edm), so a sample's file can be redone as is."""
    given = loaded.cfg.upsample.aug_level if args.aug_level is None else args.aug_level
    return {"aug_level": f"{given:g}", "aug_level_input": f"{aug_level(args, loaded):g}"}


def consistency(args: argparse.Namespace, loaded: LoadedModel) -> bool:
    return loaded.cfg.upsample.consistency if args.consistency is None else args.consistency


def stage_condition(item: SampleItem, upsampler: LoadedModel) -> dict[str, torch.Tensor]:
    """The upsampler's own class or caption condition for a base item (its label or prompt)."""
    import torch

    model = upsampler.model
    condition = getattr(model, "condition", "none")
    if condition == "class":
        label = item.label if item.label is not None else model.null_label
        return {"labels": torch.tensor([label])}
    if condition == "text":
        return {"tokens": model.tokenize(item.prompt or "")}
    return {}


def upsample_items(low: torch.Tensor, items: list[SampleItem], upsampler: LoadedModel, level: int) -> list[SampleItem]:
    """Upsampler items for low-res images (N, 3, r, r): same seeds, labels and prompts as `items`."""
    from ..conditioning import upsample as up
    from ..sampling.plan import SampleItem

    cfg, schedule = upsampler.cfg, upsampler.schedule
    out = []
    for image, item in zip(low, items):
        cond = {**stage_condition(item, upsampler),
                **up.sampling_condition(up.quantise(image.unsqueeze(0)), cfg, schedule, level, item.seed)}
        out.append(SampleItem(seed=item.seed, cond=cond, label=item.label, prompt=item.prompt,
                              low_res=up.quantise(image.unsqueeze(0))))
    return out


def check_chain(base: LoadedModel, upsampler: LoadedModel, path: str) -> None:
    """Refuse an upsampler whose low resolution is not the base's resolution, or one that is not an upsampler."""
    from ..conditioning import upsample as up

    if not is_upsampler(upsampler):
        raise UserError(f"--upsampler {path} is not an upsampler (its config has model.upsample: false)")
    low, res = up.low_resolution(upsampler.cfg), base.cfg.data.resolution
    if low != res:
        raise UserError(f"the base makes {res}px samples but the upsampler {path} expects {low}px inputs "
                        f"({upsampler.cfg.data.resolution}px / factor {upsampler.cfg.upsample.factor}): "
                        "pick a pair whose resolutions chain")


class UpsampleFeature:
    low: torch.Tensor  # --low-res, read in `variants`

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("upsampling")
        group.add_argument("--upsampler", default=None, metavar="UP_RUN",
                           help="cascade: upsample every base sample with this upsampler run or checkpoint")
        group.add_argument("--upsampler-sampler", choices=SAMPLERS, default=None, help="default: the upsampler's config")
        group.add_argument("--upsampler-steps", type=int, default=None, help="default: the upsampler's config")
        group.add_argument("--upsampler-guidance-scale", type=float, default=None,
                           help="CFG scale of the second stage (default: the upsampler's config)")
        group.add_argument("--aug-level", type=float, default=None, metavar="L",
                           help="noise level of the low-res input, a fraction of the training timesteps in [0, 1] "
                                "(edm models: a sigma; 0 = clean; default: the upsampler's upsample.aug_level)")
        group.add_argument("--consistency", action=argparse.BooleanOptionalAction, default=None,
                           help="make every step's prediction downsample exactly to the low-res input "
                                "(default: the upsampler's upsample.consistency)")
        group.add_argument("--low-res", default=None, metavar="IMAGE",
                           help="super-resolve this image with an upsampler --checkpoint")

    def variants(self, args, loaded, variants):
        if args.upsampler is not None and args.low_res is not None:
            raise UserError("--upsampler (cascade from a base) and --low-res (an upsampler on your image) exclude each other")
        if args.upsampler_steps is not None and args.upsampler_steps <= 0:
            raise UserError(f"--upsampler-steps must be positive, got {args.upsampler_steps}")
        if not is_upsampler(loaded):
            if args.low_res is not None:
                raise UserError(f"--low-res needs an upsampler --checkpoint (model.upsample: true); {loaded.path} is not one")
            for given, flag in ((args.aug_level, "--aug-level"), (args.consistency, "--consistency")):
                if given is not None and args.upsampler is None:
                    raise UserError(f"{flag} needs --upsampler UP_RUN or an upsampler --checkpoint")
            return variants
        if args.upsampler is not None:
            raise UserError("--checkpoint is an upsampler: give the base model as --checkpoint and this one as --upsampler")
        if args.low_res is None:
            raise UserError("this checkpoint is an upsampler: pass --low-res IMAGE, or use it as --upsampler of a base")
        from ..conditioning import upsample as up

        self.low = load_low_res(args.low_res, up.low_resolution(loaded.cfg))  # conditions: see extend
        meta = {"low_res": str(args.low_res), **aug_level_meta(args, loaded),
                "consistency": str(consistency(args, loaded))}
        return [item.but(meta={**item.meta, **meta}) for item in variants]

    def extend(self, args: argparse.Namespace, loaded: LoadedModel, plan: SamplingPlan) -> None:
        if not is_upsampler(loaded) and args.upsampler is None:
            return  # nothing to add (callers such as evaluate fid build plans without an --out)
        out = Path(args.out)
        position = {id(item): index for index, item in enumerate(plan.items)}
        if is_upsampler(loaded):
            self._beside_low_res(args, loaded, plan, out, position)
        elif args.upsampler is not None:
            self._cascade(args, loaded, plan, out, position)

    def _beside_low_res(self, args, loaded, plan, out: Path, position: dict[int, int]) -> None:
        from ..conditioning import upsample as up
        from ..sampling.images import save_png

        level, low = aug_level(args, loaded), self.low
        for item in plan.items:  # the augmentation noise follows each sample's seed
            item.cond.update(up.sampling_condition(low, loaded.cfg, loaded.schedule, level, item.seed))
            item.low_res = low
        if consistency(args, loaded):
            plan.constraints.append(up.consistency_constraint(loaded.cfg))
        bicubic = up.resample(low, loaded.cfg.data.resolution, "bicubic").clamp(-1, 1)[0]

        def write_baselines(images: torch.Tensor, items: list[SampleItem]) -> torch.Tensor:
            for item in items:
                index = position[id(item)]
                save_png(bicubic, out / f"bicubic_{index:04d}.png", {**item.meta, "method": "bicubic"})
                save_png(low[0], out / f"lowres_{index:04d}.png", {**item.meta, "method": "input"})
            return images

        plan.finishers.append(write_baselines)

    def _cascade(self, args, loaded, plan, out: Path, position: dict[int, int]) -> None:
        from ..checkpoints.load import load_model
        from ..conditioning import upsample as up
        from ..device import default_precision, prepare_for_sampling
        from ..sampling.images import save_png
        from ..sampling.plan import SamplerSettings, SamplingPlan, run_plan, sigma_options

        upsampler = load_model(args.upsampler, loaded.device)
        if upsampler.cfg.task != "denoiser":
            raise UserError(f"--upsampler {args.upsampler} is a {upsampler.cfg.task} checkpoint, not an upsampler")
        check_chain(loaded, upsampler, args.upsampler)
        prepare_for_sampling(upsampler.model, loaded.device)
        level = aug_level(args, upsampler)
        sampler = args.upsampler_sampler or upsampler.cfg.sample.sampler
        steps = args.upsampler_steps or upsampler.cfg.sample.steps
        scale = (upsampler.cfg.sample.guidance_scale if args.upsampler_guidance_scale is None
                 else args.upsampler_guidance_scale)
        if scale < 0:
            raise UserError(f"--upsampler-guidance-scale must be >= 0, got {scale}")
        settings = SamplerSettings(sampler, steps, scale, args.batch_size, args.dtype or default_precision(loaded.device),
                                   sigma_options(upsampler.cfg.sample))
        stage = {f"upsampler_{k}": v for k, v in settings.meta(upsampler.schedule).items()}
        project = consistency(args, upsampler)
        stage.update(upsampler_checkpoint=str(upsampler.path), **aug_level_meta(args, upsampler), consistency=str(project))

        def second_stage(images: torch.Tensor, items: list[SampleItem]) -> torch.Tensor:
            """Upsample one batch of base samples; write them as lowres_NNNN.png, return the high-res ones."""
            low = images.float().cpu()
            stage_plan = SamplingPlan(upsample_items(low, items, upsampler, level), cfg=plan.cfg,
                                      constraints=[up.consistency_constraint(upsampler.cfg)] if project else [])
            high = run_plan(upsampler, stage_plan, settings, bar=False)
            for image, item in zip(low, items):
                item.meta.update(stage)
                save_png(image, out / f"lowres_{position[id(item)]:04d}.png", item.meta)
            return high.to(images.device)

        plan.finishers.append(second_stage)
