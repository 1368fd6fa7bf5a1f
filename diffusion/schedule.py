"""The noise schedule (diffusers' DDPMScheduler) and conversions between model parameterisations."""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .config import DiffusionConfig
from .errors import UserError

BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
SAMPLERS = ("ddpm", "ddim", "dpmsolver")


def build_train_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=BETA_SCHEDULES[cfg.beta_schedule],
        prediction_type=cfg.prediction_type,
    )


def build_sampler(train_scheduler: DDPMScheduler, name: str, steps: int) -> SchedulerMixin:
    """A sampling scheduler with the training schedule's betas.

    Samplers always receive epsilon: the model output is converted first, so guidance terms
    work in one parameterisation whatever the model predicts.
    """
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler '{name}': choose one of {', '.join(SAMPLERS)}")
    if steps <= 0:
        raise UserError(f"--steps must be positive, got {steps}")
    total = train_scheduler.config.num_train_timesteps
    if steps > total:
        raise UserError(f"--steps {steps} exceeds the model's {total} training timesteps")
    config = dict(train_scheduler.config, prediction_type="epsilon")
    if name == "ddpm":
        scheduler = DDPMScheduler.from_config(config, timestep_spacing="trailing")
    elif name == "ddim":
        scheduler = DDIMScheduler.from_config(config, timestep_spacing="trailing")
    else:
        scheduler = DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing"
        )
    scheduler.set_timesteps(steps)
    return scheduler


def alpha_bar(scheduler: SchedulerMixin, t: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t broadcast to (B, 1, 1, 1)."""
    ab = scheduler.alphas_cumprod.to(t.device)[t.long()]
    return ab.float().view(-1, 1, 1, 1)


def to_epsilon(pred: torch.Tensor, x: torch.Tensor, ab: torch.Tensor, prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return pred
    return ab.sqrt() * pred + (1 - ab).sqrt() * x  # from v


def epsilon_to_x0(eps: torch.Tensor, x: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    return (x - (1 - ab).sqrt() * eps) / ab.sqrt()


def x0_to_epsilon(x0: torch.Tensor, x: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    return (x - ab.sqrt() * x0) / (1 - ab).sqrt()


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if scheduler.config.prediction_type == "epsilon":
        return noise
    return scheduler.get_velocity(x0, noise, t)
