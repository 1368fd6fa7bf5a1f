"""Generation from a loaded model: per-sample conditions and seeds, sampled in batches.

A `SamplingPlan` lists one `SampleItem` per image (its seed, the model's condition, PNG metadata and
typed targets: class label, prompt, known pixels), plus factories that build guidance terms and
post-step hooks for each batch. Features (class labels, prompts, classifier or CLIP guidance,
in-painting) add to the plan; the loop stays the same. Constraints are terms that run at every
step after the guidance terms, outside any guidance interval (an upsampler's low-res consistency).
`model_fns` wrap or replace the model function of each batch (autoguidance: `BatchModel`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..checkpoints.load import LoadedModel
from ..checkpoints.store import TrainState
from ..config import Config, SampleConfig
from ..device import autocast_dtype
from .guidance import CFGOptions, ClassifierFreeGuidance, GuidanceTerm, ModelFn, within_interval
from .images import save_grid
from .loop import Guidance, Loop, PostStep, Progress, Trajectory, sample_loop, seeded_noise
from .samplers import SIGMA_SAMPLERS, SigmaOptions, build_sampler, sigma_range
from .schedule import Schedule, build_schedule, default_x0_processor


@dataclass
class KnownPixels:
    """In-painting targets of one sample: the image (1, 3, H, W) and its keep-mask (1, 1, H, W), 1 = known."""

    image: torch.Tensor
    keep: torch.Tensor


@dataclass
class SampleItem:
    seed: int
    cond: dict[str, torch.Tensor] = field(default_factory=dict)  # model inputs, each with a batch dim of 1
    uncond: dict[str, torch.Tensor] | None = None  # None: the model's null condition
    meta: dict[str, str] = field(default_factory=dict)  # written into the PNG
    label: int | None = None  # target class (class-conditional models, classifier guidance)
    prompt: str | None = None  # target caption (caption models, CLIP guidance)
    known: KnownPixels | None = None  # in-painting
    low_res: torch.Tensor | None = None  # upsampling: the (1, 3, r, r) input the result must downsample to

    def but(self, **changes) -> "SampleItem":
        """A copy with some fields replaced (dicts are copied, tensors shared)."""
        copied = {"cond": dict(self.cond), "meta": dict(self.meta)}
        return dataclasses.replace(self, **{**copied, **changes})


BatchFactory = Callable[[list[SampleItem]], object]
Finisher = Callable[[torch.Tensor, list[SampleItem]], torch.Tensor]


@dataclass
class BatchModel:
    """What a model-function factory sees for one batch: its items, their stacked condition tensors on the
    sampling device, the settings, and `model_fn`, the function so far (CFG at the settings' scale, or what
    an earlier factory made of it)."""

    items: list["SampleItem"]
    loaded: LoadedModel
    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor]
    settings: "SamplerSettings"
    options: CFGOptions
    autocast: torch.dtype | None
    model_fn: ModelFn


ModelFnFactory = Callable[[BatchModel], ModelFn]


@dataclass
class SamplingPlan:
    items: list[SampleItem]
    terms: list[Callable[[list[SampleItem]], GuidanceTerm]] = field(default_factory=list)
    constraints: list[Callable[[list[SampleItem]], GuidanceTerm]] = field(default_factory=list)  # after terms, every step
    hooks: list[Callable[[list[SampleItem]], PostStep]] = field(default_factory=list)
    finishers: list[Finisher] = field(default_factory=list)
    loop: Loop = sample_loop  # RePaint swaps in a loop that goes back in time
    cfg: CFGOptions = field(default_factory=CFGOptions)
    churn_ceiling: float | None = None  # gradient guides' top trained sigma: churn raises no level above it
    model_fns: list[ModelFnFactory] = field(default_factory=list)  # in order: each wraps or replaces the last


@dataclass
class SamplerSettings:
    """How to sample: sampler and steps, CFG scale, batch size, the denoiser's precision, and the
    Karras-sigma settings (heun and euler; every sampler on an edm model but ddpm-model timesteps)."""

    sampler: str = "ddim"
    steps: int = 50
    guidance_scale: float = 1.0
    batch_size: int = 16
    precision: str = "fp32"  # fp32 | bf16 (autocast of the denoiser; guidance gradients stay fp32)
    sigmas: SigmaOptions = field(default_factory=SigmaOptions)

    def meta(self, schedule: Schedule | None = None) -> dict[str, str]:
        """PNG metadata; with the model's schedule, the sigma range and churn where the sampler uses them."""
        out = {"sampler": self.sampler, "steps": str(self.steps), "guidance_scale": str(self.guidance_scale)}
        if schedule is not None and (self.sampler in SIGMA_SAMPLERS or schedule.formulation == "edm"):
            out.update(self.sigmas.meta(*sigma_range(schedule, self.sigmas)))
        return out


def sigma_options(sample: SampleConfig, **given) -> SigmaOptions:
    """The run's `sample:` Karras-sigma settings, with any given ones (not None) in their place."""
    values = dict(rho=sample.rho, churn=sample.churn, churn_min=sample.churn_min, churn_max=sample.churn_max,
                  churn_noise=sample.churn_noise)
    values.update({k: v for k, v in given.items() if v is not None})
    return SigmaOptions(**values)


def _stack(conds: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.cat([c[k] for c in conds]).to(device) for k in conds[0]} if conds and conds[0] else {}


def run_plan(loaded: LoadedModel, plan: SamplingPlan, settings: SamplerSettings, progress: Progress | None = None,
             bar: bool = True) -> torch.Tensor:
    """Images in [-1, 1], (N, 3, H, W) on the CPU, one per plan item, in order.

    `progress(done, total)` is told the steps done over the whole plan; `bar` shows a terminal bar.
    """
    model, device = loaded.model, loaded.device
    schedule = loaded.schedule.to(device)
    shape = (3, loaded.cfg.data.resolution, loaded.cfg.data.resolution)
    batches = [plan.items[i:i + settings.batch_size] for i in range(0, len(plan.items), settings.batch_size)]
    total = len(batches) * settings.steps
    meter = tqdm(total=total, desc="sampling", leave=False, disable=not bar)
    out = []
    for number, items in enumerate(batches):
        def advance(done: int, loop_total: int, before: int = number * settings.steps) -> None:
            now = before + round(done * settings.steps / loop_total)  # RePaint's loop runs more steps
            meter.update(now - meter.n)
            if progress is not None:
                progress(now, total)

        noise, generators = seeded_noise(shape, [it.seed for it in items], device)
        if device.type == "cuda":
            noise = noise.contiguous(memory_format=torch.channels_last)
        cond = _stack([it.cond for it in items], device)
        uncond = _stack([it.uncond if it.uncond is not None else model.null_condition(it.cond) for it in items], device)
        autocast = autocast_dtype(device, settings.precision)
        model_fn = ClassifierFreeGuidance(model, cond, uncond, settings.guidance_scale, plan.cfg, autocast)
        for make_fn in plan.model_fns:
            model_fn = make_fn(BatchModel(items, loaded, cond, uncond, settings, plan.cfg, autocast, model_fn))
        x0 = default_x0_processor(schedule) if plan.cfg.threshold is None and plan.cfg.x0_clip else plan.cfg.x0_processor()
        guidance = Guidance(x0=x0,
                            terms=[within_interval(make(items), plan.cfg.interval) for make in plan.terms],
                            constraints=[make(items) for make in plan.constraints],
                            hooks=[make(items) for make in plan.hooks])
        sigmas = settings.sigmas if plan.churn_ceiling is None else dataclasses.replace(
            settings.sigmas, churn_ceiling=plan.churn_ceiling)
        sampler = build_sampler(schedule, settings.sampler, settings.steps, sigmas)
        trajectory = Trajectory(schedule, sampler, generators, guidance)
        images = plan.loop(model_fn, trajectory, noise, advance).float().clamp(-1, 1)
        for finish in plan.finishers:
            images = finish(images, items)
        out.append(images.cpu())
    meter.close()
    return torch.cat(out)


def preview_grid(model: torch.nn.Module, cfg: Config, path: Path) -> None:
    """The training-time sample grid: classes cycled (conditional) or unconditional samples."""
    n = cfg.sample.num_samples
    device = next(model.parameters()).device
    loaded = LoadedModel(cfg, model, build_schedule(cfg.diffusion).to(device), TrainState(), path)
    items = [SampleItem(seed=i, cond=model.preview_condition(i) if hasattr(model, "preview_condition") else {})
             for i in range(n)]
    settings = SamplerSettings(cfg.sample.sampler, cfg.sample.steps, cfg.sample.guidance_scale, batch_size=n,
                               sigmas=sigma_options(cfg.sample))
    was_training = model.training
    model.eval()
    try:
        images = run_plan(loaded, SamplingPlan(items), settings, bar=False)
    finally:
        model.train(was_training)
    save_grid(images, path)
