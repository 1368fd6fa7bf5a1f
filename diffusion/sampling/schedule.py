"""Noise schedules of the two formulations, and conversions between model parameterisations.

Every schedule presents its noise levels in the variance-preserving (VP) form the samplers and
guidance terms work in: x_t = sqrt(ab) x0 + sqrt(1 - ab) eps. A noise level sigma (EDM's
x = x0 + sigma n) is the same state scaled: alpha_bar = 1 / (1 + sigma^2), x_vp = x_sigma / sqrt(1 + sigma^2).
Each schedule also has a *model time* t, what `StepInfo.t` and `Step.t` hold:

- `NoiseSchedule` (diffusion.formulation: ddpm): t is the training timestep. Training noises
  images with diffusers' `DDPMScheduler` (`add_noise`, `get_velocity`); sampling reads the same
  alpha_bar table, moved to the sampling device once. Integer t read the table; fractional t (a
  sigma-space sampler visiting levels between the timesteps) interpolate log sigma between the two
  neighbouring timesteps, as k-diffusion's `DiscreteSchedule` does.
- `EDMSchedule` (diffusion.formulation: edm): t is sigma itself, and the network is EDM's
  preconditioned denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (Karras et al. 2022).

t = -1 (`CLEAN`) stands for the clean image in both: its alpha_bar is 1 and its sigma 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np
import torch
from diffusers import DDPMScheduler

from ..config import DiffusionConfig
from ..errors import UserError

# our beta_schedule names -> diffusers' (cosine is GLIDE's squaredcos_cap_v2)
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2", "scaled_linear": "scaled_linear",
                  "sigmoid": "sigmoid"}
CLEAN = -1  # the timestep after the last step: x_0 itself


def build_train_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The ddpm schedule as diffusers' `DDPMScheduler`: training noises with it, sampling reads its
    alpha_bar table, and the export saves its config. Every `diffusion:` key a diffusers scheduler config
    has is passed through (betas, x0 clipping or thresholding, variance type, spacing), so the export's
    `scheduler_config.json` describes what `sample.py` does."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=BETA_SCHEDULES[cfg.beta_schedule],
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        trained_betas=list(cfg.trained_betas) or None,
        prediction_type=cfg.prediction_type,
        clip_sample=cfg.clip_sample,
        clip_sample_range=cfg.clip_sample_range,
        thresholding=cfg.thresholding,
        dynamic_thresholding_ratio=cfg.dynamic_thresholding_ratio,
        sample_max_value=cfg.sample_max_value,
        variance_type=cfg.variance_type,
        timestep_spacing=cfg.timestep_spacing,
        steps_offset=cfg.steps_offset,
    )


@dataclass(frozen=True)
class SamplingRules:
    """How a ddpm model's scheduler samples, beside its alpha_bar table (diffusers' scheduler config keys):
    which timesteps n steps visit (`timestep_spacing`, `steps_offset`), how the predicted x0 is kept in
    range (`clip_sample` to +-`clip_sample_range`, or Imagen's `thresholding` at `dynamic_thresholding_ratio`
    capped at `sample_max_value`), and the DDPM sampler's variance (`variance_type`: fixed_small is the
    posterior's, fixed_large is beta_t; the _log variants are the same numbers). The defaults are this
    project's own runs: trailing timesteps, x0 clipped to [-1, 1], the posterior variance."""

    timestep_spacing: str = "trailing"
    steps_offset: int = 0
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    variance_type: str = "fixed_small"

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "SamplingRules":
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})

    @property
    def large_variance(self) -> bool:
        """DDPM's sigma_t^2 = beta_t (fixed_large) rather than the posterior variance (fixed_small)."""
        return self.variance_type.startswith("fixed_large")

    def timesteps(self, num_train_timesteps: int, steps: int) -> list[int]:
        """The timesteps `steps` steps visit, as diffusers' `DDPMScheduler.set_timesteps` picks them (trailing:
        its first `steps` only, see `trailing_timesteps`)."""
        total = num_train_timesteps
        if self.timestep_spacing == "leading":
            ratio = total // steps
            times = [i * ratio + self.steps_offset for i in reversed(range(steps))]
        elif self.timestep_spacing == "linspace":
            times = np.linspace(0, total - 1, steps).round()[::-1].astype(np.int64).tolist()
        else:
            times = trailing_timesteps(total, steps)
        if times[0] >= total:
            raise UserError(f"{steps} steps with steps_offset {self.steps_offset} reach timestep {times[0]}, past the "
                            f"model's last ({total - 1}): take fewer steps")
        return times

    def x0_processor(self):
        """The x0 processing these rules ask for (None: the prediction is used as it is)."""
        if self.thresholding:
            return threshold_x0(self.dynamic_thresholding_ratio, self.sample_max_value)
        if self.clip_sample:
            bound = self.clip_sample_range
            return lambda x0: x0.clamp(-bound, bound)
        return None


def trailing_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """diffusers' "trailing" spacing, `round(arange(T, 0, -T/n)) - 1`: T - 1 and n - 1 timesteps evenly below.

    For 62 of n = 1..1000 (61, 103, ...) float round-off makes that arange one element longer than
    asked (diffusers then samples n + 1 steps); we keep its first n, so `--steps n` means n steps.
    """
    spaced = np.arange(num_train_timesteps, 0, -num_train_timesteps / steps)[:steps]
    return (spaced.round().astype(np.int64) - 1).tolist()


def threshold_x0(ratio: float, max_value: float):
    """diffusers' `DDPMScheduler._threshold_sample`: s = the `ratio` quantile of |x0| per sample, clamped to
    [1, max_value]; x0 <- clip(x0, -s, s) / s (max_value 1 makes it plain clipping to [-1, 1])."""

    def process(x0: torch.Tensor) -> torch.Tensor:
        flat = x0.float().flatten(1)
        s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).view(-1, *[1] * (x0.ndim - 1))
        return (torch.maximum(torch.minimum(x0.float(), s), -s) / s).to(x0.dtype)

    return process


def default_x0_processor(schedule: "Schedule"):
    """The x0 processing a sampler applies when the command line asks for none: the schedule's rules
    (ddpm: the scheduler's clip_sample or thresholding), else clipping to [-1, 1]."""
    rules = getattr(schedule, "rules", None)
    return rules.x0_processor() if rules is not None else (lambda x0: x0.clamp(-1, 1))


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """Karras et al.'s noise levels (eq. 5): sigma_max^(1/rho) to sigma_min^(1/rho) in equal steps, to the rho."""
    if steps == 1:
        return [float(sigma_max)]
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).tolist()


def _as_tensor(t, device: torch.device) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else torch.tensor(t, device=device)


def _shape_like(value: torch.Tensor, t) -> torch.Tensor:
    """A 0-d tensor for a Python number, else (B, 1, 1, 1)."""
    return value if not isinstance(t, torch.Tensor) else value.view(-1, 1, 1, 1)


class Schedule(Protocol):
    """What samplers, guidance terms and hooks may ask of a schedule, whatever its formulation."""

    formulation: str
    prediction_type: str
    sampling_range: tuple[float, float]  # default (sigma_min, sigma_max) of Karras' levels

    @property
    def device(self) -> torch.device: ...

    def to(self, device: torch.device | str) -> "Schedule": ...

    def alpha_bar(self, t) -> torch.Tensor: ...

    def sigma(self, t) -> torch.Tensor: ...

    def time_of(self, sigma: float) -> int | float: ...

    def times_of(self, sigma: torch.Tensor) -> torch.Tensor: ...

    def sigma_limits(self) -> tuple[float, float]: ...

    def network_input(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def to_epsilon(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


class NoiseSchedule:
    """alpha_bar_t for t = 0 .. T-1, plus alpha_bar = 1 at t = -1 (the clean image), on one device."""

    formulation = "ddpm"

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 sampling_range: tuple[float, float] = (0.002, 80.0), rules: SamplingRules | None = None):
        table = alphas_cumprod.detach().float().flatten()
        self.num_train_timesteps = len(table)
        self.table = torch.cat([table, table.new_ones(1)])  # index -1 -> 1.0
        self.log_sigmas = (0.5 * ((1 - table.double()) / table.double()).log()).float()  # (T,), rising with t
        self.prediction_type = prediction_type
        self.sampling_range = sampling_range
        self.rules = rules or SamplingRules()

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "NoiseSchedule":
        return cls(build_train_scheduler(cfg).alphas_cumprod, cfg.prediction_type, (cfg.sigma_min, cfg.sigma_max),
                   SamplingRules.from_config(cfg))

    @property
    def device(self) -> torch.device:
        return self.table.device

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        """This schedule with its table on `device` (self when it is there already)."""
        if self.table.device == torch.device(device):
            return self
        moved = NoiseSchedule.__new__(NoiseSchedule)
        moved.__dict__.update(self.__dict__)
        moved.table, moved.log_sigmas = self.table.to(device), self.log_sigmas.to(device)
        return moved

    @staticmethod
    def _is_integer(t) -> bool:
        return isinstance(t, int) or (isinstance(t, torch.Tensor) and not t.is_floating_point())

    def alpha_bar(self, t) -> torch.Tensor:
        """alpha_bar at timesteps: a 0-d tensor for a number, else (B, 1, 1, 1). t = -1 gives 1.
        Integer t read the table; fractional t go through `sigma` (log-sigma interpolation)."""
        if isinstance(t, int):
            return self.table[t]
        if self._is_integer(t):
            return self.table[t.long()].view(-1, 1, 1, 1)
        return 1 / (1 + self.sigma(t) ** 2)

    def sigma(self, t) -> torch.Tensor:
        """sqrt((1 - ab) / ab) at timesteps, shaped as `alpha_bar`; between two timesteps log sigma is
        interpolated linearly (k-diffusion's `DiscreteSchedule.t_to_sigma`); t = -1 gives 0."""
        if self._is_integer(t):
            ab = self.alpha_bar(t)
            return ((1 - ab) / ab).sqrt()
        tt = _as_tensor(t, self.device).float()
        clamped = tt.clamp(0, self.num_train_timesteps - 1)
        low = clamped.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = clamped - low
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]
        return _shape_like(torch.where(tt <= CLEAN, torch.zeros_like(log_sigma), log_sigma.exp()), t)

    def times_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """The (fractional) timesteps whose sigma is `sigma` (k-diffusion's `sigma_to_t`: log sigma
        interpolated between the neighbouring timesteps, clamped to 0 .. T-1); sigma 0 gives CLEAN."""
        table = self.log_sigmas.to(sigma.device, torch.float64)
        log_sigma = sigma.double().clamp(min=1e-30).log()
        low = (torch.searchsorted(table, log_sigma.contiguous()) - 1).clamp(0, self.num_train_timesteps - 2)
        w = ((log_sigma - table[low]) / (table[low + 1] - table[low])).clamp(0, 1)
        return torch.where(sigma > 0, low + w, torch.full_like(w, CLEAN)).float()

    def time_of(self, sigma: float) -> int | float:
        """`times_of` for one number."""
        return CLEAN if sigma <= 0 else float(self.times_of(torch.tensor([float(sigma)]))[0])

    def sigma_limits(self) -> tuple[float, float]:
        """The noise levels the model was trained at: sigma(0) .. sigma(T - 1)."""
        return float(self.log_sigmas[0].exp()), float(self.log_sigmas[-1].exp())

    def network_input(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network reads x_t and the timestep as they are."""
        return x, t

    def to_epsilon(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps from the network's output (eps or v) at `network_input(x, t)`."""
        return to_epsilon(out, x, self.alpha_bar(t), self.prediction_type)


class EDMSchedule:
    """EDM's formulation (Karras et al. 2022): model time t = sigma, preconditioned network.

    D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) with c_skip = sd^2 / (sigma^2 + sd^2),
    c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4,
    sd = sigma_data. F is the diffusers U-Net and c_noise its timestep. Training draws
    ln(sigma) ~ N(P_mean, P_std^2) and weights ||D - x0||^2 by (sigma^2 + sd^2) / (sigma sd)^2, which
    is exactly ||F - (x0 - c_skip x) / c_out||^2 (`training_example`).
    """

    formulation = "edm"
    prediction_type = "edm"

    def __init__(self, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 p_mean: float = -1.2, p_std: float = 1.2, device: torch.device | str = "cpu"):
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std
        self.sampling_range = (sigma_min, sigma_max)
        self._device = torch.device(device)

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "EDMSchedule":
        return cls(cfg.sigma_data, cfg.sigma_min, cfg.sigma_max, cfg.p_mean, cfg.p_std)

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: torch.device | str) -> "EDMSchedule":
        if self._device == torch.device(device):
            return self
        moved = EDMSchedule.__new__(EDMSchedule)
        moved.__dict__.update(self.__dict__)
        moved._device = torch.device(device)
        return moved

    def sigma(self, t) -> torch.Tensor:
        tt = _as_tensor(t, self._device).float()
        return _shape_like(tt.clamp(min=0), t)  # CLEAN (-1) -> 0

    def alpha_bar(self, t) -> torch.Tensor:
        return 1 / (1 + self.sigma(t) ** 2)

    def times_of(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.where(sigma > 0, sigma.float(), torch.full_like(sigma.float(), CLEAN))

    def time_of(self, sigma: float) -> float:
        return float(sigma) if sigma > 0 else CLEAN

    def sigma_limits(self) -> tuple[float, float]:
        return 0.0, math.inf  # the log-normal reaches every level; the preconditioning keeps them all in range

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """c_skip, c_out, c_in at sigma (any shape)."""
        sd2 = self.sigma_data ** 2
        norm = (sigma ** 2 + sd2).sqrt()
        return sd2 / (sigma ** 2 + sd2), sigma * self.sigma_data / norm, 1 / norm

    @staticmethod
    def c_noise(sigma: torch.Tensor) -> torch.Tensor:
        return sigma.log() / 4

    def network_input(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_in x_sigma, c_noise) for a VP state x at sigma = t (B,): x_sigma = x sqrt(1 + sigma^2)."""
        sigma = t.float().view(-1, 1, 1, 1)
        _, _, c_in = self.coefficients(sigma)
        return x * ((1 + sigma ** 2).sqrt() * c_in).to(x.dtype), self.c_noise(t.float().flatten())

    def denoise(self, out: torch.Tensor, x_sigma: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D = c_skip x_sigma + c_out F, for the network output F at (c_in x_sigma, c_noise)."""
        c_skip, c_out, _ = self.coefficients(sigma.float().view(-1, 1, 1, 1))
        return c_skip * x_sigma + c_out * out

    def to_epsilon(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps = (x_sigma - D) / sigma = x_sigma sigma / (sigma^2 + sd^2) - sd F / sqrt(sigma^2 + sd^2)
        (no division by sigma, so it stays exact as sigma -> 0)."""
        sigma = t.float().view(-1, 1, 1, 1)
        norm2 = sigma ** 2 + self.sigma_data ** 2
        x_sigma = x * (1 + sigma ** 2).sqrt()
        return x_sigma * sigma / norm2 - self.sigma_data * out / norm2.sqrt()

    def training_sigmas(self, n: int, device: torch.device | str) -> torch.Tensor:
        """(n,) training noise levels: ln(sigma) ~ N(P_mean, P_std^2)."""
        return (torch.randn(n, device=device) * self.p_std + self.p_mean).exp()

    def guide_sigmas(self, u: torch.Tensor) -> torch.Tensor:
        """Noise levels for guides (classifier, CLIP) at quantiles u in [0, 1): log-uniform over the
        sampling range, since guidance acts at every level a sampler visits (sigma_max included),
        where the log-normal would leave a guide untrained."""
        lo, hi = (math.log(s) for s in self.sampling_range)
        return (lo + u * (hi - lo)).exp()

    def training_example(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(network input, c_noise, target of F) for images x0 noised to sigma (B,)."""
        s = sigma.view(-1, 1, 1, 1)
        x_sigma = x0 + s * noise
        c_skip, c_out, c_in = self.coefficients(s)
        return c_in * x_sigma, self.c_noise(sigma), (x0 - c_skip * x_sigma) / c_out


def same_times(a: Schedule, b: Schedule) -> bool:
    """Whether model time t means the same noise level in both schedules."""
    if a.formulation != b.formulation:
        return False
    return a.formulation == "edm" or (a.num_train_timesteps == b.num_train_timesteps
                                      and torch.equal(a.table.cpu(), b.table.cpu()))


def time_map(source: Schedule, target: Schedule):
    """t -> the target's time of the same noise level (identity when both mean the same): how a guide
    trained with another schedule or formulation reads the denoiser's noise level."""
    if same_times(source, target):
        return lambda t: t
    return lambda t: target.times_of(source.sigma(t).flatten()).to(t.device)


def build_schedule(cfg: DiffusionConfig) -> NoiseSchedule | EDMSchedule:
    """The schedule of a run's `diffusion:` section (its formulation)."""
    return EDMSchedule.from_config(cfg) if cfg.formulation == "edm" else NoiseSchedule.from_config(cfg)


def to_epsilon(pred: torch.Tensor, x: torch.Tensor, ab: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """eps from a network's output: eps itself, v, or x0 ("sample")."""
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "sample":
        return x0_to_epsilon(pred, x, ab)
    return ab.sqrt() * pred + (1 - ab).sqrt() * x  # from v


def epsilon_to_x0(eps: torch.Tensor, x: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    return (x - (1 - ab).sqrt() * eps) / ab.sqrt()


def x0_to_epsilon(x0: torch.Tensor, x: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    return (x - ab.sqrt() * x0) / (1 - ab).sqrt()


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if scheduler.config.prediction_type == "epsilon":
        return noise
    if scheduler.config.prediction_type == "sample":
        return x0
    return scheduler.get_velocity(x0, noise, t)
