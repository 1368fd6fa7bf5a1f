"""Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"; NVlabs/edm2).

The main model is guided by a weaker version of itself (smaller and/or trained for less long), both
given the SAME condition (class, caption or none) at the same x and noise level:

    D = D_guide + w (D_main - D_guide),   equivalently   eps = eps_guide + w (eps_main - eps_guide),

since both denoisers are affine in the same x at the same level (eps = (x - sqrt(ab) D) / sqrt(1 - ab)).
w = 1 runs the main model alone (bit for bit the unguided prediction), w = 0 the guide alone. Each model
reads the noise level through its own schedule (`network_input`, `to_epsilon`), so an edm guide may
have another sigma_data and a ddpm guide another prediction type; the noise levels themselves must
mean the same to both (`check_pair`). Classifier-free guidance is off while autoguiding: the main
model's prediction is its plain conditional one. The guidance interval (`CFGOptions.interval`)
limits autoguidance as it limits CFG: outside it, the main model alone. CFG rescale, if asked,
pulls the guided x0's spread toward the main model's, as it pulls CFG's toward the conditional one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..errors import UserError
from .guidance import CFGOptions, ClassifierFreeGuidance, ModelFn, StepInfo, cfg_combine, rescale_guidance
from .schedule import Schedule, epsilon_to_x0, same_times, x0_to_epsilon

if TYPE_CHECKING:
    from ..checkpoints.load import LoadedModel


@dataclass
class Autoguidance:
    """The model function eps = eps_guide + scale * (eps_main - eps_guide).

    `main` and `guide` are plain (unguided) model functions; the guide is called with a `StepInfo`
    whose schedule is `guide_schedule`, so it reads x and the noise level in its own formulation's terms.
    """

    main: ModelFn
    guide: ModelFn
    guide_schedule: Schedule
    scale: float
    options: CFGOptions = field(default_factory=CFGOptions)

    def guide_eps(self, x: torch.Tensor, info: StepInfo) -> torch.Tensor:
        return self.guide(x, dataclasses.replace(info, schedule=self.guide_schedule))

    def __call__(self, x: torch.Tensor, info: StepInfo) -> torch.Tensor:
        interval = self.options.interval
        outside = interval is not None and not interval[0] <= info.step.t <= interval[1]
        if self.scale == 1 or outside:
            return self.main(x, info)
        if self.scale == 0:
            return self.guide_eps(x, info)
        eps_main = self.main(x, info)
        eps = cfg_combine(self.guide_eps(x, info), eps_main, self.scale)
        if self.options.rescale:
            ab = info.alpha_bar
            x0 = rescale_guidance(epsilon_to_x0(eps, x, ab), epsilon_to_x0(eps_main, x, ab), self.options.rescale)
            eps = x0_to_epsilon(x0, x, ab)
        return eps


def plain(denoiser: torch.nn.Module, cond: dict[str, torch.Tensor], autocast: torch.dtype | None = None) -> ModelFn:
    """A model's unguided prediction under `cond`: the same code (and so the same bits) as CFG at scale 1."""
    return ClassifierFreeGuidance(denoiser, cond, cond, 1.0, CFGOptions(), autocast)


def autoguided(main: torch.nn.Module, guide: torch.nn.Module, guide_schedule: Schedule, cond: dict[str, torch.Tensor],
               guide_cond: dict[str, torch.Tensor], scale: float, options: CFGOptions | None = None,
               autocast: torch.dtype | None = None) -> Autoguidance:
    """Autoguidance of denoiser `main` by `guide` (each with its condition tensors, the same condition)."""
    return Autoguidance(plain(main, cond, autocast), plain(guide, guide_cond, autocast), guide_schedule, scale,
                        options or CFGOptions())


def _condition_kind(loaded: LoadedModel) -> str:
    return getattr(loaded.model, "condition", loaded.cfg.model.condition)


def check_pair(main: LoadedModel, guide: LoadedModel, where: str) -> None:
    """Refuse, in one line naming the mismatch, a guide that cannot guide `main`: another task,
    resolution, input or output channels (in-painting masks, upsampler inputs), formulation, noise
    levels (ddpm: timesteps and betas), conditioning kind or number of classes. sigma_data and the
    prediction type may differ: each model's own schedule reads its output."""
    flag = f"--autoguide {where}"
    if guide.cfg.task != "denoiser":
        raise UserError(f"{flag} is a {guide.cfg.task} checkpoint: a guide is a denoiser (task: denoiser) of the same data")
    rows = [("data.resolution", main.cfg.data.resolution, guide.cfg.data.resolution),
            ("model.inpaint (mask input channels)", main.cfg.model.inpaint, guide.cfg.model.inpaint),
            ("model.upsample (low-res input channels)", main.cfg.model.upsample, guide.cfg.model.upsample)]
    if main.cfg.model.upsample:
        rows.append(("upsample.factor", main.cfg.upsample.factor, guide.cfg.upsample.factor))
    unet_main, unet_guide = main.model.unet.config, guide.model.unet.config
    rows += [("input channels", unet_main.in_channels, unet_guide.in_channels),
             ("output channels", unet_main.out_channels, unet_guide.out_channels),
             ("diffusion.formulation", main.cfg.diffusion.formulation, guide.cfg.diffusion.formulation)]
    if main.cfg.diffusion.formulation == "ddpm":
        rows += [(f"diffusion.{key}", getattr(main.cfg.diffusion, key), getattr(guide.cfg.diffusion, key))
                 for key in ("num_train_timesteps", "beta_schedule")]
    rows.append(("model.condition", _condition_kind(main), _condition_kind(guide)))
    if _condition_kind(main) == "class":
        rows.append(("the number of classes", main.model.num_classes, guide.model.num_classes))
    for what, mine, theirs in rows:
        if mine != theirs:
            raise UserError(f"{flag} does not pair with the main model: {what} is {theirs} there but {mine} here; "
                            "a guide must be the same kind of model of the same data (a smaller or shorter-trained twin)")
    if not same_times(main.schedule, guide.schedule):  # e.g. equal settings but other betas
        raise UserError(f"{flag} does not pair with the main model: its noise levels (alpha_bar per timestep) differ; "
                        "a guide must be trained with the same diffusion schedule")


def guide_condition(main: torch.nn.Module, guide: torch.nn.Module, cond: dict[str, torch.Tensor],
                    prompt: str | None) -> dict[str, torch.Tensor]:
    """The guide's tensors for the main model's condition of one item: the same tensors, except a caption
    guide of another context length, which tokenises the same caption itself."""
    out = dict(cond)
    if "tokens" in cond and getattr(guide, "context_length", None) != getattr(main, "context_length", None):
        out["tokens"] = guide.tokenize(prompt or "")
    return out
