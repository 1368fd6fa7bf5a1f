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
from typing import TYPE_CHECKING, Any

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


def pairing_table(*, resolution: int, in_channels: int, out_channels: int, formulation: str, condition: str,
                  classes: int | None) -> dict[str, Any]:
    """What a guide must share with its main model, under the names the refusals use: the one table that
    loaded checkpoints (check_pair) and exported pipelines (pipeline_autoguide.check_pipelines) compare.
    `classes` counts real classes (no CFG null class); it is compared only for class conditioning."""
    return {"data.resolution": resolution, "input channels": in_channels, "output channels": out_channels,
            "diffusion.formulation": formulation, "model.condition": condition,
            "the number of classes": classes if condition == "class" else None}


def refuse_mismatch(main: dict[str, Any], guide: dict[str, Any], main_schedule: Schedule, guide_schedule: Schedule,
                    flag: str, error: type[Exception] = UserError) -> None:
    """Raise `error`, in one line naming the first row of the tables that differs, or the noise levels."""
    for what, mine in main.items():
        theirs = guide.get(what)
        if mine != theirs:
            raise error(f"{flag} does not pair with the main model: {what} is {theirs} there but {mine} here; "
                        "a guide must be the same kind of model of the same data (a smaller or shorter-trained twin)")
    if not same_times(main_schedule, guide_schedule):  # e.g. equal settings but other betas
        raise error(f"{flag} does not pair with the main model: its noise levels (alpha_bar per timestep) differ; "
                    "a guide must be trained with the same diffusion schedule")


def _checkpoint_table(loaded: LoadedModel) -> dict[str, Any]:
    """pairing_table of a loaded checkpoint, with the rows only a run's config has (in-painting and upsampler
    inputs before the channel counts they explain; ddpm's timesteps and betas)."""
    cfg, unet = loaded.cfg, loaded.model.unet.config
    shared = pairing_table(resolution=cfg.data.resolution, in_channels=unet.in_channels, out_channels=unet.out_channels,
                           formulation=cfg.diffusion.formulation, condition=_condition_kind(loaded),
                           classes=getattr(loaded.model, "num_classes", None))
    table = {"data.resolution": shared.pop("data.resolution"),
             "model.inpaint (mask input channels)": cfg.model.inpaint,
             "model.upsample (low-res input channels)": cfg.model.upsample}
    if cfg.model.upsample:
        table["upsample.factor"] = cfg.upsample.factor
    for what, value in shared.items():  # ddpm's timesteps and betas right after the formulation, as before
        table[what] = value
        if what == "diffusion.formulation" and value == "ddpm":
            table.update({f"diffusion.{key}": getattr(cfg.diffusion, key) for key in ("num_train_timesteps", "beta_schedule")})
    return table


def check_pair(main: LoadedModel, guide: LoadedModel, where: str) -> None:
    """Refuse, in one line naming the mismatch, a guide that cannot guide `main`: another task,
    resolution, input or output channels (in-painting masks, upsampler inputs), formulation, noise
    levels (ddpm: timesteps and betas), conditioning kind or number of classes. sigma_data and the
    prediction type may differ: each model's own schedule reads its output."""
    flag = f"--autoguide {where}"
    if guide.cfg.task != "denoiser":
        raise UserError(f"{flag} is a {guide.cfg.task} checkpoint: a guide is a denoiser (task: denoiser) of the same data")
    refuse_mismatch(_checkpoint_table(main), _checkpoint_table(guide), main.schedule, guide.schedule, flag)


def guide_condition(main: torch.nn.Module, guide: torch.nn.Module, cond: dict[str, torch.Tensor],
                    prompt: str | None) -> dict[str, torch.Tensor]:
    """The guide's tensors for the main model's condition of one item: the same tensors, except a caption
    guide of another context length, which tokenises the same caption itself."""
    out = dict(cond)
    if "tokens" in cond and getattr(guide, "context_length", None) != getattr(main, "context_length", None):
        out["tokens"] = guide.tokenize(prompt or "")
    return out
