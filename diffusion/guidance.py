"""Guidance: small functions of the model output, applied the same way by every sampler.

A sampler asks a model function for epsilon at (x_t, t), then passes it through a list of
guidance terms `term(eps, info) -> eps`. Classifier-free guidance lives in the model function
(it needs two forward passes); gradient guidance (classifier, CLIP) and x0 thresholding are terms.

Guidance-scale convention: 0 = unconditional, 1 = plain conditional, above 1 = guided,
eps = eps_u + s * (eps_c - eps_u).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .schedule import alpha_bar, epsilon_to_x0, to_epsilon, x0_to_epsilon


@dataclass
class StepInfo:
    """What a guidance term or post-step hook sees at one sampler step."""

    x: torch.Tensor  # x_t, (B, C, H, W)
    t: torch.Tensor  # (B,) integer timesteps, the same ones the denoiser sees
    alpha_bar: torch.Tensor  # (B, 1, 1, 1)
    scheduler: SchedulerMixin
    index: int  # step number, 0-based
    next_t: int | None  # timestep after this step, None at the last step
    generators: list[torch.Generator] = field(default_factory=list)


class GuidanceTerm(Protocol):
    def __call__(self, eps: torch.Tensor, info: StepInfo) -> torch.Tensor: ...


ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    return eps_uncond + scale * (eps_cond - eps_uncond)


def rescale_guidance(x0_cfg: torch.Tensor, x0_cond: torch.Tensor, phi: float) -> torch.Tensor:
    """CFG rescale (Lin et al. 2023, "Common diffusion noise schedules and sample steps are flawed", eq. 15-16).

    x_rescaled = x_cfg * std(x_cond) / std(x_cfg), per sample over (C, H, W);
    x_final = phi * x_rescaled + (1 - phi) * x_cfg.
    Applied, as in the paper, to the predicted x0 (diffusers' `rescale_noise_cfg` applies it to eps),
    so a strongly guided prediction keeps the conditional one's spread instead of over-saturating.
    """
    dims = tuple(range(1, x0_cfg.ndim))
    rescaled = x0_cfg * (x0_cond.std(dim=dims, keepdim=True) / x0_cfg.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * x0_cfg


def dynamic_threshold(percentile: float) -> "GuidanceTerm":
    """Imagen's dynamic thresholding (Saharia et al. 2022) as a guidance term, usable by every sampler.

    From the predicted x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab): s = max(1, p-th percentile of |x0|)
    per sample; x0 <- clip(x0, -s, s) / s; eps is recomputed from the new x0. Pixels that
    guidance pushed past [-1, 1] are pulled back in instead of being clipped flat.
    """
    q = percentile / 100.0

    def term(eps: torch.Tensor, info: StepInfo) -> torch.Tensor:
        x0 = epsilon_to_x0(eps, info.x, info.alpha_bar)
        s = torch.quantile(x0.abs().flatten(1).float(), q, dim=1).clamp(min=1.0).view(-1, *[1] * (x0.ndim - 1))
        x0 = torch.maximum(torch.minimum(x0, s), -s) / s
        return x0_to_epsilon(x0, info.x, info.alpha_bar)

    return term


def _cat_cond(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([a[k], b[k]]) for k in a}


@dataclass
class ClassifierFreeGuidance:
    """The model function of a conditional denoiser under classifier-free guidance.

    At scale 0 only the unconditional branch runs and at scale 1 only the conditional one, so
    those scales reproduce the plain predictions exactly. Above 1 both run in one batch.
    Options, off by default:
    - `rescale` phi > 0: `rescale_guidance` on the predicted x0 of the guided output;
    - `interval` (lo, hi): guidance only at timesteps lo <= t <= hi; elsewhere the plain conditional
      prediction (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval improves
      sample and distribution quality"; they give the interval in sigma, we in training timesteps).
    """

    denoiser: torch.nn.Module
    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor]
    scale: float
    prediction_type: str
    scheduler: SchedulerMixin
    rescale: float = 0.0
    interval: tuple[float, float] | None = None

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.denoiser(x, t, **cond).float()
        return to_epsilon(out, x, alpha_bar(self.scheduler, t), self.prediction_type)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.scale == 0 or not self.cond:
            return self.predict(x, t, self.uncond)
        if self.scale == 1:
            return self.predict(x, t, self.cond)
        guided = torch.ones_like(t, dtype=torch.bool)
        if self.interval is not None:
            guided = (t >= self.interval[0]) & (t <= self.interval[1])
            if not guided.any():
                return self.predict(x, t, self.cond)
        eps_c, eps_u = self.predict(torch.cat([x, x]), torch.cat([t, t]), _cat_cond(self.cond, self.uncond)).chunk(2)
        eps = cfg_combine(eps_u, eps_c, self.scale)
        if self.rescale:
            ab = alpha_bar(self.scheduler, t)
            x0 = rescale_guidance(epsilon_to_x0(eps, x, ab), epsilon_to_x0(eps_c, x, ab), self.rescale)
            eps = x0_to_epsilon(x0, x, ab)
        return torch.where(guided.view(-1, *[1] * (eps.ndim - 1)), eps, eps_c)


def posterior_mean_coefficient(info: StepInfo) -> torch.Tensor:
    """c such that eps - c * g shifts the DDPM posterior mean by Sigma_t * g (Dhariwal & Nichol's form).

    mu = (x - beta_t / sqrt(1 - ab_t) * eps) / sqrt(alpha_t) and Sigma_t = beta_t (1 - ab_prev) / (1 - ab_t),
    so mu + Sigma g is reached by eps - sqrt(alpha_t) (1 - ab_prev) / sqrt(1 - ab_t) * g.
    """
    ab = info.alpha_bar
    prev = info.next_t
    ab_prev = alpha_bar(info.scheduler, torch.full_like(info.t, prev)) if prev is not None and prev >= 0 else torch.ones_like(ab)
    alpha_t = ab / ab_prev
    return alpha_t.sqrt() * (1 - ab_prev) / (1 - ab).sqrt()


def gradient_term(log_prob: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scale: float,
                  form: str = "eps") -> GuidanceTerm:
    """Guidance by the gradient of `log_prob(x_t, t)` (B,) with respect to x_t.

    form "eps": eps - s * sqrt(1 - ab_t) * grad, honoured by every sampler.
    form "mean": the DDPM posterior mean shift mu + s * Sigma * grad (DDPM sampler only).
    """

    def term(eps: torch.Tensor, info: StepInfo) -> torch.Tensor:
        if scale == 0:
            return eps
        with torch.enable_grad():
            x = info.x.detach().float().requires_grad_(True)
            grad = torch.autograd.grad(log_prob(x, info.t).sum(), x)[0]
        if form == "mean":
            return eps - scale * posterior_mean_coefficient(info) * grad
        return eps - scale * (1 - info.alpha_bar).sqrt() * grad

    return term
