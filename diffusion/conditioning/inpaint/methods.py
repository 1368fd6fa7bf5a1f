"""In-painting methods: GLIDE's mask channels, and in-painting with any checkpoint.

- channels: an in-painting checkpoint (model.inpaint: true) reads 7 input channels: x_t (3), the
  masked image (3: known pixels, zeros elsewhere) and the keep-mask (1). The Denoiser concatenates
  the last 4, passed as `channels`, after x_t.
- replace: any checkpoint; after every step the known region is noised to the step's t_next (the
  sampler's own next timestep, clean after the last step) and put back.
- repaint: replace plus RePaint's resampling jumps (Lugmayr et al. 2022), which harmonise the
  generated region with the known one by going back in time and denoising again.
Every method pastes the known pixels back into the final image, so they equal the input exactly.
Mask files and pictures are in `files`, training masks in `masks`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ...choices import INPAINT_METHODS as METHODS
from ...config import Config
from ...errors import UserError
from ...models.denoiser import INPAINT_CHANNELS
from ...sampling.guidance import ModelFn, StepInfo
from ...sampling.loop import Loop, PostStep, Progress, Trajectory
from ...sampling.plan import KnownPixels, SampleItem, SamplerSettings, SamplingPlan, run_plan
from ...sampling.samplers import noise_from

REVISITING = ("ddpm", "ddim", "heun", "euler")  # samplers whose steps read x alone (`Sampler.revisits`)


# -- GLIDE's channels ---------------------------------------------------------------------------

def inpaint_channels(image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, 4, H, W): the masked image (known pixels, zeros elsewhere) then the keep-mask."""
    keep = keep.to(image.dtype)
    return torch.cat([image * keep, keep], dim=1)


def unknown_channels(batch: int, resolution: int) -> torch.Tensor:
    """The channels of an all-unknown mask (nothing known: plain generation)."""
    return torch.zeros(batch, INPAINT_CHANNELS, resolution, resolution)


def is_inpaint_model(cfg: Config) -> bool:
    return bool(cfg.model.inpaint)


def default_method(cfg: Config) -> str:
    return "channels" if is_inpaint_model(cfg) else "replace"


def check_method(method: str, cfg: Config, sampler: str) -> None:
    if method not in METHODS:
        raise UserError(f"unknown in-painting method '{method}': choose one of {', '.join(METHODS)}")
    if method == "channels" and not is_inpaint_model(cfg):
        raise UserError("--inpaint-method channels needs an in-painting checkpoint (model.inpaint: true); "
                        "use replace or repaint with this one")
    if method == "repaint" and sampler not in REVISITING:
        raise UserError(f"--inpaint-method repaint goes back in time, which the {sampler} sampler cannot; "
                        "pass --sampler ddim (or ddpm, heun, euler)")


def inpaint_condition(cfg: Config, image: torch.Tensor, keep: torch.Tensor, method: str) -> dict[str, torch.Tensor]:
    """The model's condition for one in-painting item.

    In-painting checkpoints see the known pixels through their channels under `channels`; under
    replace/repaint they get the all-unknown channels (plain generation), so the methods compare
    the mechanisms alone. Other checkpoints need no condition.
    """
    if not is_inpaint_model(cfg):
        return {}
    if method == "channels":
        return {"channels": inpaint_channels(image, keep)}
    return {"channels": unknown_channels(image.shape[0], image.shape[-1])}


def _stack_known(items: Sequence[SampleItem], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.cat([it.known.image for it in items]).to(device)
    keep = torch.cat([it.known.keep for it in items]).to(device)
    return image, keep


# -- sampling -----------------------------------------------------------------------------------

def paste_back(images: torch.Tensor, known: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Known pixels copied exactly from `known`; generated ones from `images`."""
    return torch.where(keep.to(images.device) > 0.5, known.to(images.device, images.dtype), images)


def paste_back_finisher(images: torch.Tensor, items: Sequence[SampleItem]) -> torch.Tensor:
    """Plan finisher: the final images with each item's known pixels pasted back."""
    known, keep = _stack_known(items, images.device)
    return paste_back(images, known, keep)


def replace_hook(known: torch.Tensor, keep: torch.Tensor) -> PostStep:
    """Post-step hook: x now sits at the step's t_next; its known region becomes
    sqrt(ab_next) known + sqrt(1 - ab_next) noise (ab_next = 1 after the last step: the clean pixels)."""

    def hook(x: torch.Tensor, info: StepInfo) -> torch.Tensor:
        nonlocal known, keep
        known, keep = known.to(x.device, x.dtype), keep.to(x.device)  # copied on the first step only
        if info.step.is_last:
            return paste_back(x, known, keep)
        ab = info.alpha_bar_next.to(x.dtype)
        noise = noise_from(info.generators, x.shape[1:], x.device, x.dtype)
        return paste_back(x, ab.sqrt() * known + (1 - ab).sqrt() * noise, keep)

    return hook


def replace_hook_factory(items: Sequence[SampleItem]) -> PostStep:
    return replace_hook(*_stack_known(items, torch.device("cpu")))


def repaint_schedule(steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """The levels visited after the start (level `steps` = pure noise, level 0 = the clean image).

    Lugmayr et al.'s `get_schedule_jump`, with their timestep t as our level t + 1 (their -1 is the
    clean image): after every `jump_length` steps down, go back up `jump_length` levels,
    `jump_n_sample - 1` times, so each stretch is denoised `jump_n_sample` times in all. Jumps start
    at level 1 (their t = 0), never at level 0: the last resampling round ends on the clean image.
    """
    jumps = {j + 1: jump_n_sample - 1 for j in range(0, steps - jump_length, jump_length)}
    level, levels = steps, []
    while level >= 1:
        level -= 1
        levels.append(level)
        if jumps.get(level, 0) > 0:
            jumps[level] -= 1
            for _ in range(jump_length):
                level += 1
                levels.append(level)
    return levels


def renoise(x: torch.Tensor, ab_from: torch.Tensor, ab_to: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Sample q(x_to | x_from): forward diffusion from a less noisy level to a noisier one."""
    ratio = ab_to / ab_from
    noise = noise_from(generators, x.shape[1:], x.device, x.dtype)
    return ratio.sqrt() * x + (1 - ratio).sqrt() * noise


def repaint_loop(jump_length: int, jump_n_sample: int) -> Loop:
    """A sampling loop (same signature as `sample_loop`) that follows RePaint's schedule.

    Level L (1..n) is the state before sampler step n - L, level 0 the clean image; going down one
    level is one ordinary `Trajectory.step`, so hooks and guidance act exactly as in `sample_loop`.
    """
    if jump_length < 1 or jump_n_sample < 1:
        raise UserError("--jump-length and --jump-n-sample must be at least 1")

    @torch.no_grad()
    def loop(model_fn: ModelFn, trajectory: Trajectory, noise: torch.Tensor,
             progress: Progress | None = None) -> torch.Tensor:
        sampler = trajectory.sampler
        if not sampler.revisits:
            raise UserError(f"repaint goes back in time, which the {sampler.name} sampler cannot: pass --sampler ddim "
                            "(or ddpm, heun, euler)")
        steps = sampler.steps
        n = len(steps)

        def level_alpha_bar(level: int) -> torch.Tensor:
            return trajectory.schedule.alpha_bar(steps[n - level].t if level > 0 else -1)

        schedule = repaint_schedule(n, jump_length, jump_n_sample)
        x, level = noise, n
        for done, target in enumerate(schedule, 1):
            if target < level:
                x = trajectory.step(model_fn, x, steps[n - level])
            else:
                x = renoise(x, level_alpha_bar(level), level_alpha_bar(target), trajectory.generators)
            level = target
            if progress is not None:
                progress(done, len(schedule))
        return x

    return loop


def add_to_plan(plan: SamplingPlan, method: str, jump_length: int = 5, jump_n_sample: int = 5) -> None:
    """Hooks, loop and paste-back for `method`; the items carry their `known` pixels."""
    if method in ("replace", "repaint"):
        plan.hooks.append(replace_hook_factory)
    if method == "repaint":
        plan.loop = repaint_loop(jump_length, jump_n_sample)
    plan.finishers.append(paste_back_finisher)


def run_inpainting(loaded, images: torch.Tensor, keeps: torch.Tensor, method: str, settings: SamplerSettings,
                   conds: Sequence[dict[str, torch.Tensor]] | None = None, seed: int = 0, jump_length: int = 5,
                   jump_n_sample: int = 5, bar: bool = False) -> torch.Tensor:
    """In-paint images (N, 3, R, R) under keep-masks (N, 1, R, R) with one method; item i uses seed + i.

    `conds` holds each image's own condition (class label, caption tokens; batch dim 1), if any.
    """
    check_method(method, loaded.cfg, settings.sampler)
    items = []
    for i, (image, keep) in enumerate(zip(images, keeps)):
        image, keep = image.unsqueeze(0), keep.unsqueeze(0)
        cond = {**(conds[i] if conds else {}), **inpaint_condition(loaded.cfg, image, keep, method)}
        items.append(SampleItem(seed=seed + i, cond=cond, known=KnownPixels(image, keep)))
    plan = SamplingPlan(items)
    add_to_plan(plan, method, jump_length, jump_n_sample)
    return run_plan(loaded, plan, settings, bar=bar)
