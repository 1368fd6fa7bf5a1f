"""Samplers: which timesteps to visit, and one update x_t -> x_{t_next} from a predicted (x0, eps).

Every sampler visits diffusers' "trailing" timesteps, `round(arange(T, 0, -T/n)) - 1`, and steps from
each one to the next one in that list; after the last one comes t = -1, the clean image. That one list
is the only source of (t, t_next): guidance terms and in-painting hooks read it from `Step`, so they
can never disagree with the update. DDPM and DDIM are written out here (as in guided-diffusion and
EDM); DPM-Solver++ (2M) is diffusers' multistep solver, fed the same timesteps and our x0.

The update never clips: x0 arrives guided, then clipped or thresholded (see `loop.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler

from ..choices import SAMPLERS
from ..errors import UserError
from .schedule import CLEAN, NoiseSchedule


@dataclass(frozen=True)
class Step:
    """One sampler step: from the model's timestep `t` to `t_next` (-1 = the clean image)."""

    index: int
    t: int
    t_next: int

    @property
    def is_last(self) -> bool:
        return self.t_next == CLEAN


def trailing_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """diffusers' "trailing" spacing, `round(arange(T, 0, -T/n)) - 1`: T - 1 and n - 1 timesteps evenly below.

    For 62 of n = 1..1000 (61, 103, ...) float round-off makes that arange one element longer than
    asked (diffusers then samples n + 1 steps); we keep its first n, so `--steps n` means n steps.
    """
    spaced = np.arange(num_train_timesteps, 0, -num_train_timesteps / steps)[:steps]
    return (spaced.round().astype(np.int64) - 1).tolist()


def make_steps(timesteps: Sequence[int]) -> list[Step]:
    return [Step(i, int(t), int(timesteps[i + 1]) if i + 1 < len(timesteps) else CLEAN) for i, t in enumerate(timesteps)]


def noise_from(generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """(len(generators), *shape) standard normal noise, sample i drawn from generator i."""
    return torch.stack([torch.randn(shape, generator=g, device=device, dtype=dtype) for g in generators])


class Sampler(Protocol):
    name: str
    steps: list[Step]
    revisits: bool  # may steps be repeated out of order (RePaint)? Only memoryless samplers can.

    def update(self, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, step: Step, ab: torch.Tensor,
               ab_next: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """x_{t_next} from x_t and the final (processed, guided) predictions x0 and eps."""
        ...


@dataclass
class DDPMSampler:
    """Ancestral sampling (Ho et al. 2020): the posterior q(x_{t_next} | x_t, x0) with its variance
    beta~ = (1 - ab_next) / (1 - ab) * (1 - ab / ab_next), "fixed small"; respaced steps use the
    effective beta 1 - ab / ab_next, as guided-diffusion's respacing does."""

    steps: list[Step]
    name: str = "ddpm"
    revisits: bool = True

    def update(self, x, x0, eps, step, ab, ab_next, generators):
        mean = posterior_mean(x, x0, ab, ab_next)
        if step.is_last:
            return mean
        noise = noise_from(generators, x.shape[1:], x.device, x.dtype)
        return mean + posterior_variance(ab, ab_next).sqrt() * noise


def posterior_mean(x: torch.Tensor, x0: torch.Tensor, ab: torch.Tensor, ab_next: torch.Tensor) -> torch.Tensor:
    beta = 1 - ab / ab_next
    return (ab_next.sqrt() * beta * x0 + (ab / ab_next).sqrt() * (1 - ab_next) * x) / (1 - ab)


def posterior_variance(ab: torch.Tensor, ab_next: torch.Tensor) -> torch.Tensor:
    return (1 - ab / ab_next) * (1 - ab_next) / (1 - ab)


@dataclass
class DDIMSampler:
    """Deterministic DDIM (Song et al. 2021, eta = 0): x_next = sqrt(ab_next) x0 + sqrt(1 - ab_next) eps."""

    steps: list[Step]
    name: str = "ddim"
    revisits: bool = True

    def update(self, x, x0, eps, step, ab, ab_next, generators):
        return ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps


class DPMSolverSampler:
    """DPM-Solver++ (2M) from diffusers, told the predictions are x0 ("sample") so it takes ours as they
    are. It keeps the previous x0 for its second-order update, so it cannot revisit steps."""

    name = "dpmsolver"
    revisits = False

    def __init__(self, schedule: NoiseSchedule, steps: list[Step]):
        self.steps = steps
        betas = 1 - schedule.table[:-1] / torch.cat([schedule.table.new_ones(1), schedule.table[:-2]])
        self.scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=schedule.num_train_timesteps, trained_betas=betas.cpu().double().numpy(),
            prediction_type="sample", algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing",
        )
        self.scheduler.set_timesteps(timesteps=[s.t for s in steps])
        if self.scheduler.timesteps.tolist() != [s.t for s in steps]:
            raise RuntimeError(f"DPM-Solver's timesteps {self.scheduler.timesteps.tolist()} differ from the plan's")

    def update(self, x, x0, eps, step, ab, ab_next, generators):
        if self.scheduler.step_index is not None and self.scheduler.step_index != step.index:
            raise RuntimeError("DPM-Solver steps must run in order, once each")
        return self.scheduler.step(x0, step.t, x).prev_sample


def build_sampler(schedule: NoiseSchedule, name: str, steps: int) -> Sampler:
    """A fresh sampler (DPM-Solver keeps state: one per sampling run) over `steps` trailing timesteps."""
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler '{name}': choose one of {', '.join(SAMPLERS)}")
    total = schedule.num_train_timesteps
    if not 0 < steps <= total:
        raise UserError(f"--steps must be between 1 and the model's {total} training timesteps, got {steps}")
    plan = make_steps(trailing_timesteps(total, steps))
    if name == "ddpm":
        return DDPMSampler(plan)
    if name == "ddim":
        return DDIMSampler(plan)
    return DPMSolverSampler(schedule, plan)
