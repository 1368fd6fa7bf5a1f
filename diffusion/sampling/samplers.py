"""Samplers: which noise levels to visit, and one update x_t -> x_{t_next} from a predicted (x0, eps).

A sampler's `steps` list is the only source of (t, t_next): guidance terms and in-painting hooks read
it from `Step`, so they can never disagree with the update. After the last step comes t = -1, the
clean image. Times are the schedule's model time (`schedule.py`): timesteps for ddpm models, sigma
for edm ones; every update works on the VP state x = sqrt(ab) x0 + sqrt(1 - ab) eps.

- ddpm, ddim, dpmsolver on a ddpm model visit diffusers' "trailing" timesteps,
  `round(arange(T, 0, -T/n)) - 1` (a pretrained diffusers folder's model: its scheduler's
  `timestep_spacing`, "leading" by default, as `DDPMScheduler.set_timesteps` picks them). DDPM and DDIM are written out here (as in guided-diffusion and
  EDM); DPM-Solver++ (2M) is diffusers' multistep solver, fed the same timesteps and our x0.
- heun and euler (Karras et al. 2022, Algorithm 2) visit Karras' sigmas, sigma_max^(1/rho) to
  sigma_min^(1/rho) in equal steps, on either formulation: a ddpm model at the fractional timesteps of
  those sigmas (`NoiseSchedule.time_of`), as EDM samples pretrained VP models. In sigma space,
  x_sigma = x / sqrt(ab) = x0 + sigma eps and dx_sigma/dsigma = eps, so an Euler step is exactly
  DDIM's update; Heun averages eps at both ends, asking the loop for the whole guided, clipped
  prediction at the second point (`Predict`). Churn (S_churn) raises each level by gamma before its
  step; here that noise is added at the end of the step before, so `Step.t` is always the level the
  model sees and post-step hooks see x at `Step.t_next`.
- on an edm model, ddpm and ddim take the same Karras sigmas, and dpmsolver is diffusers'
  `EDMDPMSolverMultistepScheduler`, fed the network output that gives our x0.

The update never clips: x0 arrives guided, then clipped or thresholded (see `loop.py`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler

from ..choices import SAMPLERS
from ..errors import UserError
from .schedule import CLEAN, EDMSchedule, NoiseSchedule, Schedule, karras_sigmas, trailing_timesteps  # noqa: F401

SIGMA_SAMPLERS = ("heun", "euler")  # Karras' sigmas on every formulation
Predict = Callable[[torch.Tensor, "int | float"], torch.Tensor]  # (x at model time t, t) -> final eps there


@dataclass(frozen=True)
class Step:
    """One sampler step: from the model time `t` to `t_next` (-1 = the clean image)."""

    index: int
    t: int | float
    t_next: int | float

    @property
    def is_last(self) -> bool:
        return self.t_next == CLEAN


def _time(t) -> int | float:
    """A plain Python int (timestep) or float (fractional timestep, sigma)."""
    return int(t) if isinstance(t, (int, np.integer)) or (isinstance(t, torch.Tensor) and not t.is_floating_point()) else float(t)


def model_times(schedule: Schedule, sigmas: Sequence[float]) -> list[int | float]:
    """The schedule's model times of noise levels (CLEAN for 0), in one call."""
    times = schedule.times_of(torch.tensor(list(sigmas), dtype=torch.float64)).tolist()
    return [CLEAN if s <= 0 else t for s, t in zip(sigmas, times)]


def make_steps(timesteps: Sequence[int | float]) -> list[Step]:
    times = [_time(t) for t in timesteps]
    return [Step(i, t, times[i + 1] if i + 1 < len(times) else CLEAN) for i, t in enumerate(times)]


def noise_from(generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """(len(generators), *shape) standard normal noise, sample i drawn from generator i."""
    return torch.stack([torch.randn(shape, generator=g, device=device, dtype=dtype) for g in generators])


class Sampler(Protocol):
    name: str
    steps: list[Step]
    revisits: bool  # may steps be repeated out of order (RePaint)? Only memoryless samplers can.

    def update(self, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, step: Step, ab: torch.Tensor,
               ab_next: torch.Tensor, generators: Sequence[torch.Generator], predict: Predict | None = None) -> torch.Tensor:
        """x_{t_next} from x_t and the final (processed, guided) predictions x0 and eps; `predict`
        gives the same final eps at another point (second-order samplers)."""
        ...


@dataclass
class DDPMSampler:
    """Ancestral sampling (Ho et al. 2020): the posterior mean of q(x_{t_next} | x_t, x0) plus noise of
    variance beta~ = (1 - ab_next) / (1 - ab) * (1 - ab / ab_next), "fixed small", or (`large_variance`,
    a scheduler's fixed_large) beta = 1 - ab / ab_next; respaced steps use that effective beta, as
    guided-diffusion's respacing and diffusers' `DDPMScheduler` do. The last step returns the mean."""

    steps: list[Step]
    name: str = "ddpm"
    revisits: bool = True
    large_variance: bool = False

    def update(self, x, x0, eps, step, ab, ab_next, generators, predict=None):
        mean = posterior_mean(x, x0, ab, ab_next)
        if step.is_last:
            return mean
        noise = noise_from(generators, x.shape[1:], x.device, x.dtype)
        variance = (1 - ab / ab_next) if self.large_variance else posterior_variance(ab, ab_next)
        return mean + variance.sqrt() * noise


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

    def update(self, x, x0, eps, step, ab, ab_next, generators, predict=None):
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

    def update(self, x, x0, eps, step, ab, ab_next, generators, predict=None):
        if self.scheduler.step_index is not None and self.scheduler.step_index != step.index:
            raise RuntimeError("DPM-Solver steps must run in order, once each")
        return self.scheduler.step(x0, step.t, x).prev_sample


@dataclass(frozen=True)
class SigmaOptions:
    """Settings of the samplers that visit Karras' sigmas (EDM's names in brackets). None: the model's
    `diffusion.sigma_min/sigma_max`; a ddpm model's own range (sigma(0) .. sigma(T-1)) clamps both."""

    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float = 7.0
    churn: float = 0.0  # S_churn: gamma = min(churn / steps, sqrt(2) - 1)
    churn_min: float = 0.0  # S_tmin
    churn_max: float = math.inf  # S_tmax
    churn_noise: float = 1.0  # S_noise
    churn_ceiling: float | None = None  # no level raised above it (gradient guides' top trained sigma; run_plan)

    def meta(self, lo: float, hi: float) -> dict[str, str]:
        out = {"sigma_min": f"{lo:g}", "sigma_max": f"{hi:g}", "rho": f"{self.rho:g}"}
        if self.churn:
            out.update(churn=f"{self.churn:g}", churn_min=f"{self.churn_min:g}", churn_max=f"{self.churn_max:g}",
                       churn_noise=f"{self.churn_noise:g}")
        return out


def sigma_range(schedule: Schedule, options: SigmaOptions) -> tuple[float, float]:
    """(sigma_min, sigma_max) of a Karras schedule on this model, as EDM's sampler clamps them."""
    lo = schedule.sampling_range[0] if options.sigma_min is None else options.sigma_min
    hi = schedule.sampling_range[1] if options.sigma_max is None else options.sigma_max
    low_limit, high_limit = schedule.sigma_limits()
    lo, hi = max(lo, low_limit), min(hi, high_limit)
    if not 0 < lo < hi:
        raise UserError(f"the sigma range {lo:g}..{hi:g} is empty (this model covers {low_limit:g}..{high_limit:g}): "
                        "pass --sigma-min below --sigma-max")
    return lo, hi


class KarrasSampler:
    """EDM's sampler (Karras et al. 2022, Algorithm 2): Heun's 2nd order method ("heun", 2 n - 1
    network evaluations for n steps: the last step is Euler's) or Euler's, with optional churn."""

    revisits = True  # each step reads x alone, so RePaint may go back in time

    def __init__(self, schedule: Schedule, name: str, sigmas: list[float], options: SigmaOptions):
        self.schedule, self.name, self.churn_noise = schedule, name, options.churn_noise
        gamma = min(options.churn / len(sigmas), math.sqrt(2) - 1)
        top = min(schedule.sigma_limits()[1], math.inf if options.churn_ceiling is None else options.churn_ceiling)
        raised = [max(s, min(s * (1 + gamma), top)) if gamma and options.churn_min <= s <= options.churn_max else s
                  for s in sigmas]  # raised to at most `top`, never lowered
        self.steps = make_steps(model_times(schedule, raised))
        self.after = [s.t_next for s in make_steps(model_times(schedule, sigmas))]  # t_next before any churn

    def update(self, x, x0, eps, step, ab, ab_next, generators, predict=None):
        sigma = ((1 - ab) / ab).sqrt()
        t_after = self.after[step.index]
        ab_after = self.schedule.alpha_bar(t_after)
        sigma_after = ((1 - ab_after) / ab_after).sqrt()
        x_sigma = x0 + sigma_after * eps  # Euler: x0 + sigma eps + (sigma_after - sigma) eps
        if self.name == "heun" and t_after != CLEAN:
            eps_after = predict(ab_after.sqrt() * x_sigma, t_after)
            x_sigma = x0 + sigma * eps + (sigma_after - sigma) * (eps + eps_after) / 2
        if step.t_next != t_after:  # churn: raise the noise to the next step's level
            raised = ((1 - ab_next) / ab_next).sqrt()
            noise = noise_from(generators, x.shape[1:], x.device, x.dtype)
            x_sigma = x_sigma + (raised ** 2 - sigma_after ** 2).clamp(min=0).sqrt() * self.churn_noise * noise
        return ab_next.sqrt() * x_sigma


class EDMDPMSolverSampler:
    """DPM-Solver++ (2M) on an edm model: diffusers' `EDMDPMSolverMultistepScheduler` over Karras'
    sigmas, working on x_sigma. It applies the preconditioning itself, so it is given the network
    output F that yields our (guided, clipped) x0: F = (x0 - c_skip x_sigma) / c_out."""

    name = "dpmsolver"
    revisits = False

    def __init__(self, schedule: EDMSchedule, steps: int, sigma_min: float, sigma_max: float, rho: float):
        self.schedule = schedule
        self.scheduler = EDMDPMSolverMultistepScheduler(
            sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=schedule.sigma_data, rho=rho,
            prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero",
        )
        self.scheduler.set_timesteps(steps)
        self.steps = make_steps(model_times(schedule, self.scheduler.sigmas[:-1].tolist()))

    def update(self, x, x0, eps, step, ab, ab_next, generators, predict=None):
        if self.scheduler.step_index is not None and self.scheduler.step_index != step.index:
            raise RuntimeError("DPM-Solver steps must run in order, once each")
        x_sigma = x / ab.sqrt()
        c_skip, c_out, _ = self.schedule.coefficients(self.scheduler.sigmas[step.index].to(x.device))
        out = (x0 - c_skip * x_sigma) / c_out
        return self.scheduler.step(out, self.scheduler.timesteps[step.index], x_sigma).prev_sample * ab_next.sqrt()


def build_sampler(schedule: Schedule, name: str, steps: int, options: SigmaOptions | None = None) -> Sampler:
    """A fresh sampler (DPM-Solver keeps state: one per sampling run) over `steps` steps: trailing
    timesteps (ddpm, ddim, dpmsolver on ddpm models), else Karras' sigmas."""
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler '{name}': choose one of {', '.join(SAMPLERS)}")
    options = options or SigmaOptions()
    if schedule.formulation == "ddpm" and name not in SIGMA_SAMPLERS:
        total = schedule.num_train_timesteps
        if not 0 < steps <= total:
            raise UserError(f"--steps must be between 1 and the model's {total} training timesteps, got {steps}")
        plan = make_steps(schedule.rules.timesteps(total, steps))
        if name == "ddpm":
            return DDPMSampler(plan, large_variance=schedule.rules.large_variance)
        if name == "ddim":
            return DDIMSampler(plan)
        return DPMSolverSampler(schedule, plan)
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    lo, hi = sigma_range(schedule, options)
    if name == "dpmsolver":
        return EDMDPMSolverSampler(schedule, steps, lo, hi, options.rho)
    sigmas = karras_sigmas(steps, lo, hi, options.rho)
    if name == "ddpm":
        return DDPMSampler(make_steps(model_times(schedule, sigmas)))
    if name == "ddim":
        return DDIMSampler(make_steps(model_times(schedule, sigmas)))
    return KarrasSampler(schedule, name, sigmas, options)


def network_evaluations(name: str, steps: int) -> int:
    """Denoiser evaluations per image (without CFG's second branch): Heun's last step is Euler's."""
    return 2 * steps - 1 if name == "heun" else steps
