"""In-painting: one mask convention, GLIDE's mask channels, and in-painting with any checkpoint.

Conventions
- Mask files (what users draw): white = region to generate, black = keep, as in diffusers and most
  editors. `--invert-mask` flips a file drawn the other way.
- Internally: a keep-mask (B, 1, H, W), 1 = known pixel, 0 = to generate, as in GLIDE.
- An in-painting checkpoint (model.inpaint: true) reads 7 input channels: x_t (3), then the masked
  image (3: known pixels, zeros elsewhere), then the keep-mask (1). The Denoiser concatenates the
  last 4, passed as `channels`, after x_t.

Methods
- channels: the in-painting checkpoint sees the known pixels through its extra channels.
- replace: any checkpoint; after every step the known region is noised to the current t and put back.
- repaint: replace plus RePaint's resampling jumps (Lugmayr et al. 2022), which harmonise the
  generated region with the known one by going back in time and denoising again.
Every method pastes the known pixels back into the final image, so they equal the input exactly.
Training masks live in `diffusion.inpaint_masks`.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image
from torchvision import transforms
from tqdm.auto import tqdm

from .config import Config
from .data.common import image_transform, load_rgb
from .errors import UserError
from .guidance import GuidanceTerm, ModelFn, StepInfo
from .inpaint_masks import training_keep_masks
from .models.denoiser import INPAINT_CHANNELS
from .sampling import PostStep, denoise_step, noise_from

METHODS = ("channels", "replace", "repaint")
ALMOST = 0.02  # warn when less than this fraction of the mask is black (or white)
OVERLAY_COLOUR = (1.0, -1.0, -1.0)  # red, in [-1, 1]


# -- the mask convention ------------------------------------------------------------------------

def keep_from_file_mask(white: torch.Tensor, invert: bool = False) -> torch.Tensor:
    """Keep-mask (1 = known) from a mask file's grey levels in [0, 1] (white = generate)."""
    generate = white > 0.5
    if invert:
        generate = ~generate
    return (~generate).float()


def mask_image(keep: torch.Tensor) -> Image.Image:
    """The mask file for a keep-mask (1, H, W) or (H, W): white = generate, black = keep."""
    white = (keep.reshape(keep.shape[-2:]) < 0.5).to(torch.uint8) * 255
    return Image.fromarray(white.cpu().numpy(), mode="L")


def geometry(resolution: int) -> list:
    """Resize the short side and centre-crop: the same for the image and its mask."""
    return [transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
            transforms.CenterCrop(resolution)]


def load_image(path: str | Path, resolution: int) -> torch.Tensor:
    """(1, 3, R, R) in [-1, 1], resized and centre-cropped like the training data."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--image not found: {path}")
    return image_transform(resolution, hflip=False)(load_rgb(path)).unsqueeze(0)


def load_mask(path: str | Path, resolution: int, invert: bool = False) -> torch.Tensor:
    """Keep-mask (1, 1, R, R) from a mask file (white = generate), with the image's geometry."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--mask not found: {path}")
    try:
        with Image.open(path) as img:
            grey = img.convert("L")
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read mask {path}: {err}") from None
    white = transforms.Compose([*geometry(resolution), transforms.ToTensor()])(grey)
    return keep_from_file_mask(white, invert).unsqueeze(0)


def coverage_warning(keep: torch.Tensor) -> str | None:
    """A warning when a mask leaves (almost) nothing to generate or (almost) nothing known."""
    unknown = 1.0 - float(keep.float().mean())
    if unknown > 1 - ALMOST:
        return (f"the mask is almost all white ({unknown:.0%} to generate): nearly the whole image will be "
                "generated; white marks the region to generate, pass --invert-mask if yours marks what to keep")
    if unknown < ALMOST:
        return (f"the mask is almost all black ({unknown:.1%} to generate): the result will be nearly the input; "
                "white marks the region to generate, pass --invert-mask if yours marks what to keep")
    return None


def warn_coverage(keep: torch.Tensor) -> None:
    message = coverage_warning(keep)
    if message:
        print(f"warning: {message}", file=sys.stderr)


# -- GLIDE's channels ---------------------------------------------------------------------------

def inpaint_channels(image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, 4, H, W): the masked image (known pixels, zeros elsewhere) then the keep-mask."""
    keep = keep.to(image.dtype)
    return torch.cat([image * keep, keep], dim=1)


def unknown_channels(batch: int, resolution: int) -> torch.Tensor:
    """The channels of an all-unknown mask (nothing known: plain generation)."""
    return torch.zeros(batch, INPAINT_CHANNELS, resolution, resolution)


def training_channels(x0: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Extra input channels for one training batch, with masks drawn as `cfg.inpaint` says."""
    keep = training_keep_masks(x0.shape[0], x0.shape[-1], cfg.inpaint).to(x0.device)
    return inpaint_channels(x0, keep)


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
    if method == "repaint" and sampler not in ("ddpm", "ddim"):
        raise UserError(f"--inpaint-method repaint goes back in time, which the {sampler} sampler cannot; "
                        "pass --sampler ddim or --sampler ddpm")


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


def inpaint_extra(image: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the hooks and the paste-back read from each SampleItem.extra."""
    return {"inpaint_image": image, "inpaint_keep": keep}


def _stack_extra(items: Sequence, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.cat([it.extra["inpaint_image"] for it in items]).to(device)
    keep = torch.cat([it.extra["inpaint_keep"] for it in items]).to(device)
    return image, keep


# -- sampling -----------------------------------------------------------------------------------

def paste_back(images: torch.Tensor, known: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Known pixels copied exactly from `known`; generated ones from `images`."""
    return torch.where(keep.to(images.device) > 0.5, known.to(images.device, images.dtype), images)


def paste_back_finisher(images: torch.Tensor, items: Sequence) -> torch.Tensor:
    """Plan finisher: the final images with each item's known pixels pasted back."""
    if not items or "inpaint_keep" not in items[0].extra:
        return images
    known, keep = _stack_extra(items, images.device)
    return paste_back(images, known, keep)


def replace_hook(known: torch.Tensor, keep: torch.Tensor) -> PostStep:
    """Post-step hook: the known region noised to the step's next t (clean at the last step)."""

    def hook(x: torch.Tensor, info: StepInfo) -> torch.Tensor:
        nonlocal known, keep
        known, keep = known.to(x.device, x.dtype), keep.to(x.device)  # copied on the first step only
        target = known
        if info.next_t is not None and info.next_t >= 0:
            ab = info.scheduler.alphas_cumprod[info.next_t].to(x.device, x.dtype)
            noise = noise_from(info.generators, x.shape[1:], x.device, x.dtype)
            target = ab.sqrt() * target + (1 - ab).sqrt() * noise
        return paste_back(x, target, keep)

    return hook


def replace_hook_factory(items: Sequence) -> PostStep:
    known, keep = _stack_extra(items, torch.device("cpu"))
    return replace_hook(known, keep)


def repaint_schedule(steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """The levels visited after the start (level `steps` = pure noise, level 0 = the image).

    RePaint's schedule: after every `jump_length` steps down, go back up `jump_length` levels,
    `jump_n_sample - 1` times, so each stretch is denoised `jump_n_sample` times in all.
    """
    jumps = {level: jump_n_sample - 1 for level in range(0, steps - jump_length, jump_length)}
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


def renoise(x: torch.Tensor, ab_from: float, ab_to: float, generators: list[torch.Generator]) -> torch.Tensor:
    """Sample q(x_to | x_from): forward diffusion from a less noisy level to a noisier one."""
    ratio = ab_to / ab_from
    noise = noise_from(generators, x.shape[1:], x.device, x.dtype)
    return ratio ** 0.5 * x + (1 - ratio) ** 0.5 * noise


def repaint_loop(jump_length: int, jump_n_sample: int) -> Callable[..., torch.Tensor]:
    """A sampling loop (same signature as `sample_loop`) that follows RePaint's schedule."""
    if jump_length < 1 or jump_n_sample < 1:
        raise UserError("--jump-length and --jump-n-sample must be at least 1")

    @torch.no_grad()
    def loop(model_fn: ModelFn, scheduler: SchedulerMixin, noise: torch.Tensor, generators: list[torch.Generator],
             terms: Sequence[GuidanceTerm] = (), post_step: Sequence[PostStep] = (), progress: bool = True) -> torch.Tensor:
        if not isinstance(scheduler, (DDPMScheduler, DDIMScheduler)):
            raise UserError("repaint needs the ddpm or ddim sampler: pass --sampler ddim")
        timesteps = [int(t) for t in scheduler.timesteps]
        steps = len(timesteps)
        abar = scheduler.alphas_cumprod

        def level_alpha_bar(level: int) -> float:
            return 1.0 if level == 0 else float(abar[timesteps[steps - level]])

        x, level = noise * scheduler.init_noise_sigma, steps
        for target in tqdm(repaint_schedule(steps, jump_length, jump_n_sample), desc="repaint", leave=False,
                           disable=not progress):
            if target < level:
                x = denoise_step(model_fn, scheduler, x, timesteps, steps - level, generators, terms, post_step)
            else:
                x = renoise(x, level_alpha_bar(level), level_alpha_bar(target), generators)
            level = target
        return x

    return loop


def add_to_plan(plan, method: str, jump_length: int = 5, jump_n_sample: int = 5) -> None:
    """Hooks, loop and paste-back for `method`; the items carry `inpaint_extra` in their extra."""
    if method in ("replace", "repaint"):
        plan.hooks.append(replace_hook_factory)
    if method == "repaint":
        plan.loop = repaint_loop(jump_length, jump_n_sample)
    plan.finishers.append(paste_back_finisher)


def run_inpainting(loaded, images: torch.Tensor, keeps: torch.Tensor, method: str, *, sampler: str, steps: int,
                   guidance_scale: float = 1.0, conds: Sequence[dict[str, torch.Tensor]] | None = None, seed: int = 0,
                   batch_size: int = 16, jump_length: int = 5, jump_n_sample: int = 5,
                   progress: bool = False) -> torch.Tensor:
    """In-paint images (N, 3, R, R) under keep-masks (N, 1, R, R) with one method; item i uses seed + i.

    `conds` holds each image's own condition (class label, caption tokens; batch dim 1), if any.
    """
    from .generate import SampleItem, SamplingPlan, run_plan

    check_method(method, loaded.cfg, sampler)
    items = []
    for i, (image, keep) in enumerate(zip(images, keeps)):
        image, keep = image.unsqueeze(0), keep.unsqueeze(0)
        cond = {**(conds[i] if conds else {}), **inpaint_condition(loaded.cfg, image, keep, method)}
        items.append(SampleItem(seed=seed + i, cond=cond, extra=inpaint_extra(image, keep)))
    plan = SamplingPlan(items)
    add_to_plan(plan, method, jump_length, jump_n_sample)
    return run_plan(loaded, plan, sampler, steps, guidance_scale, batch_size, progress=progress)


def load_image_folder(folder: str | Path, resolution: int, limit: int | None = None) -> tuple[torch.Tensor, list[Path]]:
    """The first `limit` images of a folder (sorted by name), as (N, 3, R, R) in [-1, 1]."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)[:limit]
    if not files:
        raise UserError(f"no images ({', '.join(IMG_EXTENSIONS)}) in {folder}")
    return torch.cat([load_image(f, resolution) for f in files]), files


# -- pictures -----------------------------------------------------------------------------------

def overlay(image: torch.Tensor, keep: torch.Tensor, alpha: float = 0.55) -> torch.Tensor:
    """The image with the region to generate tinted red: (3, H, W) in [-1, 1]."""
    colour = torch.tensor(OVERLAY_COLOUR, dtype=image.dtype, device=image.device).view(3, 1, 1)
    tinted = (1 - alpha) * image + alpha * colour
    return torch.where(keep.reshape(1, *image.shape[-2:]).to(image.device) > 0.5, image, tinted)


def strip(image: torch.Tensor, keep: torch.Tensor, result: torch.Tensor, pad: int = 1) -> torch.Tensor:
    """input | mask overlay | result, side by side: (3, H, 3W + 2 pad) in [-1, 1]."""
    gap = torch.ones(3, image.shape[-2], pad, dtype=image.dtype)
    parts = [image.reshape(3, *image.shape[-2:]).cpu(), overlay(image.reshape(3, *image.shape[-2:]), keep).cpu(),
             result.cpu().to(image.dtype)]
    return torch.cat([parts[0], gap, parts[1], gap, parts[2]], dim=-1)


def upscale(image: torch.Tensor, min_height: int = 128) -> torch.Tensor:
    """Nearest-neighbour enlargement of a small (3, H, W) picture, so 16-64 px images stay visible."""
    factor = max(1, min_height // image.shape[-2])
    return image.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
