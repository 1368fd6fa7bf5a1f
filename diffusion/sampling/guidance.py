"""Guidance: small functions of the model output, applied the same way by every sampler.

At every step the loop (`loop.py`) runs, in this order:
  1. the model function: eps at (x_t, t); classifier-free guidance lives here (two forward passes);
  2. guidance terms `term(eps, info) -> eps` in order: gradient guidance (classifier, CLIP);
  3. x0 processing: the guided x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab) is clipped to [-1, 1] or
     dynamically thresholded (or left alone: `CFGOptions.x0_clip = False`, NVlabs' edm_sampler), and
     eps is re-derived from it; then any DDPM posterior-mean shift of the "mean" form is added to the
     x0 the update receives, after the clip, as guided-diffusion's `condition_mean` adds it to the
     mean computed from the clipped x0 (`process_x0`). The guided x0 estimates E[x0 | x_t, y],
     which lies in the data's range like any clean image, so the bound is right for guided and
     unguided predictions alike. It is what keeps gradient guidance sane at high noise: there the
     eps-form shift moves x0 by s * (1 - ab) / sqrt(ab) * g (2e4 * s * g at t = 999 of the cosine
     schedule), which is harmless for the exact p(y | x_t) (its gradient vanishes on pure noise) but
     not for a learned guide, whose gradient there is small yet not zero;
  4. constraints (an upsampler's low-res consistency), then the sampler's update, which never clips.

Guidance-scale convention: 0 = unconditional, 1 = plain conditional, above 1 = guided,
eps = eps_u + s * (eps_c - eps_u).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from .samplers import Step
from .schedule import Schedule, epsilon_to_x0, same_times, x0_to_epsilon


@dataclass
class StepInfo:
    """What the model function, guidance terms and post-step hooks see at one step."""

    x: torch.Tensor  # x_t, (B, C, H, W), in VP form whatever the formulation (see schedule.py)
    t: torch.Tensor  # (B,) model time: integer timesteps, fractional ones (sigma samplers), or sigma (edm)
    step: Step  # the same t as a Python number, and t_next (-1 = clean)
    alpha_bar: torch.Tensor  # (B, 1, 1, 1) at t
    alpha_bar_next: torch.Tensor  # (B, 1, 1, 1) at t_next (1 for the clean image)
    schedule: Schedule
    generators: list[torch.Generator] = field(default_factory=list)
    mean_shift: torch.Tensor | None = None  # s * g of "mean"-form gradient terms, applied by `process_x0`


class GuidanceTerm(Protocol):
    def __call__(self, eps: torch.Tensor, info: StepInfo) -> torch.Tensor: ...


ModelFn = Callable[[torch.Tensor, StepInfo], torch.Tensor]  # (x_t, info) -> eps
X0Processor = Callable[[torch.Tensor], torch.Tensor]  # predicted x0 -> x0


def clip_x0(x0: torch.Tensor) -> torch.Tensor:
    """Static thresholding: the data lies in [-1, 1], so its prediction should too."""
    return x0.clamp(-1, 1)


def dynamic_threshold(percentile: float) -> X0Processor:
    """Imagen's dynamic thresholding (Saharia et al. 2022): s = max(1, p-th percentile of |x0|) per
    sample; x0 <- clip(x0, -s, s) / s. Pixels pushed past [-1, 1] (strong CFG) are pulled back in
    rather than clipped flat."""
    q = percentile / 100.0

    def process(x0: torch.Tensor) -> torch.Tensor:
        s = torch.quantile(x0.abs().flatten(1).float(), q, dim=1).clamp(min=1.0).view(-1, *[1] * (x0.ndim - 1))
        return torch.maximum(torch.minimum(x0, s), -s) / s

    return process


def process_x0(eps: torch.Tensor, info: StepInfo, processor: X0Processor | None) -> torch.Tensor:
    """eps re-derived from the processed x0, plus the posterior-mean shift of "mean"-form terms
    (unchanged when there is neither).

    The DDPM posterior mean is mu = A x0 + B x_t with A = sqrt(ab_next) beta / (1 - ab), so handing the
    update x0 + Sigma s g / A = x0 + (1 - ab_next) / sqrt(ab_next) * s g moves mu by exactly Sigma s g:
    guided-diffusion's `condition_mean` (mu from the clipped x0, then + s Sigma g), not undone by the clip.
    Sigma is the DDPM sampler's variance: the posterior's, or beta for a scheduler whose variance_type is
    fixed_large (`SamplingRules.large_variance`), where Sigma / A = (1 - ab) / sqrt(ab_next).
    """
    if processor is None and info.mean_shift is None:
        return eps
    x0 = epsilon_to_x0(eps, info.x, info.alpha_bar)
    if processor is not None:
        x0 = processor(x0)
    if info.mean_shift is not None:
        large = getattr(getattr(info.schedule, "rules", None), "large_variance", False)
        x0 = x0 + (1 - (info.alpha_bar if large else info.alpha_bar_next)) / info.alpha_bar_next.sqrt() * info.mean_shift
    return x0_to_epsilon(x0, info.x, info.alpha_bar)


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


def _cat_cond(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([a[k], b[k]]) for k in a}


@dataclass
class CFGOptions:
    """Refinements of classifier-free guidance, off by default.

    - `rescale` phi > 0: `rescale_guidance` on the predicted x0 of the guided output;
    - `interval` (lo, hi): guidance only at model times lo <= t <= hi; elsewhere the plain conditional
      prediction (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval improves sample
      and distribution quality"). Model time is the training timestep for ddpm models and sigma (as
      in the paper) for edm models. The same interval limits gradient guidance (classifier, CLIP):
      see `within_interval`;
    - `threshold` P: Imagen's dynamic thresholding of x0 at percentile P instead of clipping;
    - `x0_clip` False: x0 neither clipped nor thresholded (`--no-x0-clip`), as NVlabs' edm_sampler and
      k-diffusion sample; the default clips.
    """

    rescale: float = 0.0
    interval: tuple[float, float] | None = None
    threshold: float | None = None
    x0_clip: bool = True

    def x0_processor(self) -> X0Processor | None:
        """The loop's x0 processing: dynamic thresholding, the clip to [-1, 1], or None (x0 as predicted)."""
        if self.threshold is not None:
            return dynamic_threshold(self.threshold)
        return clip_x0 if self.x0_clip else None


@dataclass
class ClassifierFreeGuidance:
    """The model function of a denoiser under classifier-free guidance.

    At scale 0 only the unconditional branch runs and at scale 1 only the conditional one, so those
    scales reproduce the plain predictions exactly. Above 1 both run in one batch. `autocast` is the
    dtype the denoiser runs in (bf16 on GPUs by default); eps is always returned in fp32.
    """

    denoiser: torch.nn.Module
    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor]
    scale: float
    options: CFGOptions = field(default_factory=CFGOptions)
    autocast: torch.dtype | None = None

    def predict(self, x: torch.Tensor, info: StepInfo, cond: dict[str, torch.Tensor], repeat: int = 1) -> torch.Tensor:
        t = info.t.repeat(repeat)
        x_in, t_in = info.schedule.network_input(x, t)  # edm: preconditioned input and c_noise
        context = torch.autocast(x.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with context:
            out = self.denoiser(x_in, t_in, **cond)
        return info.schedule.to_epsilon(out.float(), x.float(), t)

    def __call__(self, x: torch.Tensor, info: StepInfo) -> torch.Tensor:
        if self.scale == 0 or not self.cond:
            return self.predict(x, info, self.uncond)
        interval = self.options.interval
        outside = interval is not None and not interval[0] <= info.step.t <= interval[1]
        if self.scale == 1 or outside:
            return self.predict(x, info, self.cond)
        eps_c, eps_u = self.predict(torch.cat([x, x]), info, _cat_cond(self.cond, self.uncond), repeat=2).chunk(2)
        eps = cfg_combine(eps_u, eps_c, self.scale)
        if self.options.rescale:
            ab = info.alpha_bar
            x0 = rescale_guidance(epsilon_to_x0(eps, x, ab), epsilon_to_x0(eps_c, x, ab), self.options.rescale)
            eps = x0_to_epsilon(x0, x, ab)
        return eps


def posterior_mean_coefficient(info: StepInfo) -> torch.Tensor:
    """c such that eps - c * g shifts the DDPM posterior mean by Sigma * g (Dhariwal & Nichol's form)
    where x0 is not clipped (the "mean" form itself adds the shift after the clip: `process_x0`).

    mu = (sqrt(ab_next) beta x0 + sqrt(alpha) (1 - ab_next) x) / (1 - ab) with alpha = ab / ab_next,
    beta = 1 - alpha and Sigma = beta (1 - ab_next) / (1 - ab), so mu + Sigma g is reached by
    eps - sqrt(alpha) (1 - ab_next) / sqrt(1 - ab) * g.
    """
    ab, ab_next = info.alpha_bar, info.alpha_bar_next
    return (ab / ab_next).sqrt() * (1 - ab_next) / (1 - ab).sqrt()


def shift_eps(eps: torch.Tensor, grad: torch.Tensor, scale: float, form: str, info: StepInfo) -> torch.Tensor:
    """eps moved along a gradient g of log p(y | x_t) so that the sampler's update carries s * g.

    form "eps": eps - s * sqrt(1 - ab) * g, i.e. the score shifted by s * g; every sampler honours it
    (the x0 the sampler receives moves by s * (1 - ab) / sqrt(ab) * g, then is clipped).
    form "mean": the DDPM posterior mean shifted by s * Sigma * g after the clip, as guided-diffusion's
    `condition_mean` (DDPM sampler only): eps is returned as it is and s * g is kept in
    `info.mean_shift` for `process_x0`.
    """
    if form == "mean":
        shift = scale * grad
        info.mean_shift = shift if info.mean_shift is None else info.mean_shift + shift
        return eps
    return eps - scale * (1 - info.alpha_bar).sqrt() * grad


def within_interval(term: GuidanceTerm, interval: tuple[float, float] | None) -> GuidanceTerm:
    """`term` applied only at timesteps lo <= t <= hi (all steps when `interval` is None): the
    `--guidance-interval` option, which limits CFG and gradient guidance alike."""
    if interval is None:
        return term
    lo, hi = interval

    def limited(eps: torch.Tensor, info: StepInfo) -> torch.Tensor:
        return term(eps, info) if lo <= info.step.t <= hi else eps

    return limited


def gradient_term(log_prob: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scale: float,
                  form: str = "eps") -> GuidanceTerm:
    """Guidance by the gradient g of `log_prob(x_t, t)` (B,) with respect to x_t, in fp32 (`shift_eps`)."""

    def term(eps: torch.Tensor, info: StepInfo) -> torch.Tensor:
        if scale == 0:
            return eps
        with torch.enable_grad(), torch.autocast(info.x.device.type, enabled=False):
            x = info.x.detach().float().requires_grad_(True)
            grad = torch.autograd.grad(log_prob(x, info.t).sum(), x)[0]
        return shift_eps(eps, grad, scale, form, info)

    return term


def guide_sigma_range(schedule: Schedule) -> tuple[float, float]:
    """The noise levels (sigma) a guide (classifier, CLIP) was trained at: a ddpm guide's timesteps
    0 .. T-1, an edm guide's log-uniform levels over its sigma_min .. sigma_max (`guide_sigmas`)."""
    if schedule.formulation == "edm":
        return tuple(float(s) for s in schedule.sampling_range)
    return schedule.sigma_limits()


def guide_time_map(denoiser: Schedule, guide: Schedule) -> Callable[[torch.Tensor], torch.Tensor]:
    """t -> the guide's model time of the same noise level, for a guide trained with any schedule or
    formulation: the identity when t means the same level to both; else sigma(t) of the denoiser, held
    inside the levels the guide was trained at (`guide_sigma_range`), as the guide's time (a ddpm
    guide's fractional timestep, k-diffusion's log-sigma interpolation; an edm guide's sigma)."""
    if same_times(denoiser, guide):
        return lambda t: t
    lo, hi = guide_sigma_range(guide)

    def mapped(t: torch.Tensor) -> torch.Tensor:
        sigma = denoiser.sigma(t).flatten().double().clamp(lo, hi)
        return guide.times_of(sigma).to(t.device)

    return mapped


def churn_ceiling(current: float | None, guide: Schedule) -> float:
    """The highest noise level churn may raise a step to while a guide trained with `guide` steers the
    samples (the lowest of the guides' tops): above it the guide's gradient would be extrapolated."""
    top = guide_sigma_range(guide)[1]
    return top if current is None else min(current, top)
