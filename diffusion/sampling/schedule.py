"""The noise schedule: alpha_bar_t as one table, and conversions between model parameterisations.

Training noises images with diffusers' `DDPMScheduler` (`add_noise`, `get_velocity`); sampling reads
the same betas through `NoiseSchedule`, whose table is moved to the sampling device once, so no step
copies it again. Timestep -1 stands for the clean image: its alpha_bar is 1.
"""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from ..config import DiffusionConfig

BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
CLEAN = -1  # the timestep after the last step: x_0 itself


def build_train_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The training scheduler (its x0 clipping setting is never used: samplers are our own)."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=BETA_SCHEDULES[cfg.beta_schedule],
        prediction_type=cfg.prediction_type,
    )


class NoiseSchedule:
    """alpha_bar_t for t = 0 .. T-1, plus alpha_bar = 1 at t = -1 (the clean image), on one device."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        table = alphas_cumprod.detach().float().flatten()
        self.num_train_timesteps = len(table)
        self.table = torch.cat([table, table.new_ones(1)])  # index -1 -> 1.0
        self.prediction_type = prediction_type

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "NoiseSchedule":
        return cls(build_train_scheduler(cfg).alphas_cumprod, cfg.prediction_type)

    @property
    def device(self) -> torch.device:
        return self.table.device

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        """This schedule with its table on `device` (self when it is there already)."""
        if self.table.device == torch.device(device):
            return self
        moved = NoiseSchedule.__new__(NoiseSchedule)
        moved.num_train_timesteps, moved.prediction_type = self.num_train_timesteps, self.prediction_type
        moved.table = self.table.to(device)
        return moved

    def alpha_bar(self, t: int | torch.Tensor) -> torch.Tensor:
        """alpha_bar at integer timesteps: a 0-d tensor for an int, else (B, 1, 1, 1). t = -1 gives 1."""
        if isinstance(t, int):
            return self.table[t]
        return self.table[t.long()].view(-1, 1, 1, 1)


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
