"""Samplers as plain functions over diffusers schedulers, with per-sample seeds.

Sample i of a run uses its own generator seeded with `seed + i` for both its starting noise
and every later noise draw, so any sample can be regenerated alone, in any batch.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from tqdm.auto import tqdm

from .guidance import GuidanceTerm, ModelFn, StepInfo
from .schedule import alpha_bar

PostStep = Callable[[torch.Tensor, StepInfo], torch.Tensor]


def noise_from(generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """(len(generators), *shape) standard normal noise, sample i drawn from generator i."""
    return torch.stack([torch.randn(shape, generator=g, device=device, dtype=dtype) for g in generators])


def seeded_noise(shape: tuple[int, ...], seeds: Sequence[int], device: torch.device | str = "cpu"
                 ) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Starting noise (len(seeds), *shape) and the per-sample generators that drew it."""
    generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    return noise_from(generators, shape, device), generators


def step_options(scheduler: SchedulerMixin) -> dict:
    """DDIM re-derives eps from the clipped x0, as GLIDE and guided-diffusion do. Without it the
    clipped x0 and the unclipped eps disagree wherever x0 leaves [-1, 1] (black backgrounds): samples
    keep visible noise, and guidance steps point the wrong way in those pixels."""
    return {"use_clipped_model_output": True} if isinstance(scheduler, DDIMScheduler) else {}


def denoise_step(model_fn: ModelFn, scheduler: SchedulerMixin, x: torch.Tensor, timesteps: list[int], i: int,
                 generators: list[torch.Generator], terms: Sequence[GuidanceTerm] = (),
                 post_step: Sequence[PostStep] = ()) -> torch.Tensor:
    """Step `i` of `timesteps`: x_t -> x_{next t}, with guidance terms and post-step hooks applied."""
    t = timesteps[i]
    t_batch = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
    info = StepInfo(
        x=x, t=t_batch, alpha_bar=alpha_bar(scheduler, t_batch), scheduler=scheduler, index=i,
        next_t=int(timesteps[i + 1]) if i + 1 < len(timesteps) else None, generators=generators,
    )
    eps = model_fn(scheduler.scale_model_input(x, t), t_batch)
    for term in terms:
        eps = term(eps, info)
    x = scheduler.step(eps, t, x, generator=generators, **step_options(scheduler)).prev_sample
    for hook in post_step:
        x = hook(x, info)
    return x


@torch.no_grad()
def sample_loop(model_fn: ModelFn, scheduler: SchedulerMixin, noise: torch.Tensor, generators: list[torch.Generator],
                terms: Sequence[GuidanceTerm] = (), post_step: Sequence[PostStep] = (),
                progress: bool = True) -> torch.Tensor:
    """Run `scheduler` from `noise` to x_0. `model_fn(x, t)` returns epsilon.

    `terms` adjust epsilon at every step (guidance); `post_step` hooks adjust x after every step
    (in-painting). Neither needs the loop edited.
    """
    x = noise * scheduler.init_noise_sigma
    timesteps = [int(t) for t in scheduler.timesteps]
    for i in tqdm(range(len(timesteps)), desc="sampling", leave=False, disable=not progress):
        x = denoise_step(model_fn, scheduler, x, timesteps, i, generators, terms, post_step)
    return x
