"""Generation from a checkpoint: load, plan per-sample conditions and seeds, sample in batches, save.

A `SamplingPlan` lists one `SampleItem` per image (its seed, conditioning and PNG metadata), plus
factories that build guidance terms and post-step hooks for each batch. Features (class labels,
prompts, classifier or CLIP guidance, in-painting) add to the plan; the loop stays the same.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import DDPMScheduler
from PIL import Image, PngImagePlugin
from torchvision.utils import make_grid, save_image

from .config import Config
from .errors import UserError
from .guidance import ClassifierFreeGuidance, GuidanceTerm, dynamic_threshold
from .io import atomic_write
from .sampling import PostStep, sample_loop, seeded_noise
from .schedule import build_sampler, build_train_scheduler
from .training import checkpoint as ckpt


@dataclass
class LoadedModel:
    cfg: Config
    model: torch.nn.Module
    scheduler: DDPMScheduler
    info: ckpt.TrainState
    path: Path


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Any task's model from a checkpoint or run directory, with its EMA weights."""
    from .training.tasks import build_task

    directory = ckpt.resolve_checkpoint(path)
    cfg = ckpt.read_config(directory)
    model = build_task(cfg).build_model()
    weights = ckpt.read_weights(directory)
    problem = ckpt.describe_mismatch(model.state_dict(), weights)
    if problem:
        raise UserError(f"{directory / ckpt.EMA_FILE} does not fit the model its {ckpt.CONFIG_FILE} describes: {problem}")
    model.load_state_dict(weights)
    model.eval().requires_grad_(False).to(device)
    return LoadedModel(cfg, model, build_train_scheduler(cfg.diffusion), ckpt.read_info(directory), directory)


@dataclass
class SampleItem:
    seed: int
    cond: dict[str, torch.Tensor] = field(default_factory=dict)  # tensors with a batch dim of 1
    uncond: dict[str, torch.Tensor] | None = None  # None: the model's null condition
    meta: dict[str, str] = field(default_factory=dict)  # written into the PNG
    extra: dict[str, Any] = field(default_factory=dict)  # targets for guidance factories


BatchFactory = Callable[[list[SampleItem]], Any]


@dataclass
class SamplingPlan:
    items: list[SampleItem]
    terms: list[BatchFactory] = field(default_factory=list)  # -> GuidanceTerm
    hooks: list[BatchFactory] = field(default_factory=list)  # -> PostStep
    finishers: list[Callable[[torch.Tensor, list[SampleItem]], torch.Tensor]] = field(default_factory=list)
    loop: Callable[..., torch.Tensor] = sample_loop  # same signature as sample_loop (RePaint goes back in time)
    # ClassifierFreeGuidance options (rescale, interval), plus "dynamic_threshold": a percentile
    # whose thresholding term runs after every other term.
    cfg_options: dict[str, Any] = field(default_factory=dict)


def _stack(conds: list[dict[str, torch.Tensor]], device) -> dict[str, torch.Tensor]:
    return {k: torch.cat([c[k] for c in conds]).to(device) for k in conds[0]} if conds and conds[0] else {}


def run_plan(loaded: LoadedModel, plan: SamplingPlan, sampler: str, steps: int, guidance_scale: float,
             batch_size: int, progress: bool = True) -> torch.Tensor:
    """Images in [-1, 1], (N, 3, H, W), one per plan item, in order."""
    model, cfg = loaded.model, loaded.cfg
    device = next(model.parameters()).device
    shape = (3, cfg.data.resolution, cfg.data.resolution)
    out = []
    for start in range(0, len(plan.items), batch_size):
        items = plan.items[start:start + batch_size]
        scheduler = build_sampler(loaded.scheduler, sampler, steps)
        noise, generators = seeded_noise(shape, [it.seed for it in items], device)
        cond = _stack([it.cond for it in items], device)
        uncond = _stack([it.uncond if it.uncond is not None else model.null_condition(it.cond) for it in items], device)
        options = dict(plan.cfg_options)
        threshold = options.pop("dynamic_threshold", None)
        model_fn = ClassifierFreeGuidance(model, cond, uncond, guidance_scale, cfg.diffusion.prediction_type, scheduler,
                                          **options)
        terms: list[GuidanceTerm] = [make(items) for make in plan.terms]
        if threshold is not None:
            terms.append(dynamic_threshold(threshold))
        hooks: list[PostStep] = [make(items) for make in plan.hooks]
        images = plan.loop(model_fn, scheduler, noise, generators, terms, hooks, progress=progress).clamp(-1, 1)
        for finish in plan.finishers:
            images = finish(images, items)
        out.append(images.cpu())
    return torch.cat(out)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] to uint8, exactly the values a saved PNG holds (FID scores these)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(to_uint8(image).permute(1, 2, 0).cpu().numpy())


def save_png(image: torch.Tensor, path: Path, meta: dict[str, str]) -> None:
    """Write one sample as PNG with its generation settings as text chunks."""
    info = PngImagePlugin.PngInfo()
    for key, value in meta.items():
        info.add_text(key, str(value))
    atomic_write(path, lambda tmp: to_pil(image).save(tmp, format="PNG", pnginfo=info))


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> None:
    nrow = nrow or max(1, int(len(images) ** 0.5 + 0.999))
    grid = make_grid(images.float(), nrow=nrow, normalize=True, value_range=(-1, 1), padding=2)
    atomic_write(path, lambda tmp: save_image(grid, str(tmp), format="PNG"))


def preview_grid(model: torch.nn.Module, cfg: Config, train_scheduler: DDPMScheduler, path: Path) -> None:
    """The training-time sample grid: classes cycled (conditional) or unconditional samples."""
    n = cfg.sample.num_samples
    loaded = LoadedModel(cfg, model, train_scheduler, ckpt.TrainState(), path)
    items = [SampleItem(seed=i, cond=model.preview_condition(i) if hasattr(model, "preview_condition") else {}) for i in range(n)]
    was_training = model.training
    model.eval()
    try:
        images = run_plan(loaded, SamplingPlan(items), cfg.sample.sampler, cfg.sample.steps, cfg.sample.guidance_scale,
                          batch_size=n, progress=False)
    finally:
        model.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(images, path)
