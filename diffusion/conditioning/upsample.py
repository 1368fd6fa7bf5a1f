"""Diffusion upsamplers: low-res inputs, their channels and noise-conditioning augmentation.

As in GLIDE and guided-diffusion's SuperResModel, the low-res image (made from the real one with
area resampling, then quantised to 8 bits) is interpolated back up (bilinear, align_corners=False)
and fed as 3 extra input channels. As in Cascaded Diffusion Models / Imagen / DeepFloyd IF, those
channels are noised to an augmentation level with the model's own alpha_bar table, and the model is
told the level (`aug_level`, see diffusion/models/denoiser.py).

Levels: an integer L in 0..T (T = diffusion.num_train_timesteps). L = 0 is the clean low-res;
L >= 1 noises it as training timestep L - 1 does x_0: sqrt(ab) low + sqrt(1 - ab) noise. On the
command line and in the config a level is a fraction of T in [0, 1] (0.25 = DeepFloyd's 250/1000).
edm models take the level as a sigma >= 0 instead: low + sigma noise, drawn uniformly from
`aug_noise` in training; the model reads it as it reads its own noise level, c_noise = ln(sigma) / 4,
with sigma floored at diffusion.sigma_min (0 = clean).

Low-res consistency (`upsample.consistency`, `--consistency`): at every sampling step the predicted
x0 is projected so that it downsamples exactly to the low-res input (`consistency_term`).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..config import Config, UpsampleConfig
from ..data.items import ItemRandom, dataset_item
from ..errors import UserError
from ..sampling.guidance import GuidanceTerm, StepInfo
from ..sampling.schedule import EDMSchedule, Schedule, epsilon_to_x0, x0_to_epsilon


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] rounded to the 256 levels an 8-bit PNG holds."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def resample(images: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """(B, C, H, W) to (B, C, size, size); bilinear and bicubic without corner alignment."""
    if mode == "area" or mode == "nearest":
        return F.interpolate(images, size=(size, size), mode=mode)
    antialias = size < images.shape[-1]
    return F.interpolate(images, size=(size, size), mode=mode, align_corners=False, antialias=antialias)


def low_resolution(cfg: Config) -> int:
    return cfg.data.resolution // cfg.upsample.factor


def make_low_res(images: torch.Tensor, cfg: UpsampleConfig) -> torch.Tensor:
    """The low-res inputs of high-res images (B, 3, R, R): downsampled by `factor`, quantised if asked."""
    low = resample(images, images.shape[-1] // cfg.factor, cfg.downsample).clamp(-1, 1)
    return quantise(low) if cfg.quantise else low


def upsample_channels(low: torch.Tensor, resolution: int, cfg: UpsampleConfig) -> torch.Tensor:
    """The model's extra input channels: the low-res image interpolated up to `resolution`."""
    return resample(low, resolution, cfg.upsample)


def resample_matrix(source: int, size: int, mode: str) -> torch.Tensor:
    """(size, source): `resample` along one axis as a matrix; it is separable, resample(x) = A @ x @ A.T."""
    columns = torch.eye(source).view(source, 1, 1, source).expand(source, 1, source, source)  # image k: column k lit
    return resample(columns, size, mode)[:, 0, 0, :].T.contiguous()


def consistency_term(low: torch.Tensor, resolution: int, cfg: UpsampleConfig, rounds: int = 10) -> GuidanceTerm:
    """Project each predicted x0 onto the images that downsample exactly to `low` (B, 3, r, r).

    x0 <- x0 + U (low - D x0), with D the training downsampling and U = G (D G)^-1, G the model's
    interpolation up: D U = I, so D x0 = low afterwards, and the correction is a smooth
    (interpolated) image rather than nearest-neighbour blocks. This is the range-space step of
    DDNM (Wang et al. 2023) with an interpolating right inverse; what the low-res image does not
    determine (the detail) is left to the model. eps is re-derived from the new x0, as clipping does.
    The projection alternates with clipping to [-1, 1] (POCS, `rounds` times), so that the final
    clip of the image does not undo the match where the correction overshoots.
    """
    down = resample_matrix(resolution, low.shape[-1], cfg.downsample)  # (r, R)
    interp = resample_matrix(low.shape[-1], resolution, cfg.upsample)  # (R, r)
    lift = interp @ torch.linalg.inv(down @ interp)  # (R, r), down @ lift = I
    low = low.float()

    def term(eps: torch.Tensor, info: StepInfo) -> torch.Tensor:
        d, u, y = (v.to(eps.device) for v in (down, lift, low))
        x0 = epsilon_to_x0(eps, info.x, info.alpha_bar)
        for _ in range(rounds):
            x0 = x0.clamp(-1, 1)
            x0 = x0 + u @ (y - d @ x0 @ d.T) @ u.T
        return x0_to_epsilon(x0, info.x, info.alpha_bar)

    return term


def consistency_constraint(cfg: Config) -> Callable[[list], GuidanceTerm]:
    """A sampling-plan constraint: `consistency_term` for each batch of items, from their `low_res`."""

    def make(items: list) -> GuidanceTerm:
        return consistency_term(torch.cat([item.low_res for item in items]), cfg.data.resolution, cfg.upsample)

    return make


def level_index(fraction: float, num_train_timesteps: int) -> int:
    """A level given as a fraction of T in [0, 1] as the integer level 0..T."""
    if not 0.0 <= fraction <= 1.0:
        raise UserError(f"the aug level is a fraction of the training timesteps in [0, 1] (0 = clean); got {fraction}")
    return round(fraction * num_train_timesteps)


def aug_level(value: float, schedule: Schedule) -> int | float:
    """A level from the command line or config: the integer level of a fraction of T (ddpm), or sigma (edm)."""
    if schedule.formulation != "edm":
        return level_index(value, schedule.num_train_timesteps)
    if not value >= 0.0:
        raise UserError(f"an edm model's aug level is a noise level sigma >= 0 (0 = clean); got {value}")
    return float(value)


def level_input(level: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """What the model reads as `aug_level`: the integer level (ddpm), or c_noise of sigma floored at sigma_min (edm)."""
    if not isinstance(schedule, EDMSchedule):
        return level
    return schedule.c_noise(level.float().clamp(min=schedule.sampling_range[0]))


def augment(channels: torch.Tensor, level: torch.Tensor, schedule: Schedule, noise: torch.Tensor) -> torch.Tensor:
    """Noise the channels to levels (B,): level 0 leaves them clean."""
    if schedule.formulation == "edm":
        return channels + level.to(channels.device, channels.dtype).view(-1, 1, 1, 1) * noise
    ab = schedule.alpha_bar(level.to(schedule.device) - 1).to(channels.device, channels.dtype)
    return ab.sqrt() * channels + (1 - ab).sqrt() * noise


def training_condition(low: torch.Tensor, cfg: Config, schedule: Schedule) -> dict[str, torch.Tensor]:
    """`channels` and `aug_level` for one training batch of low-res images, levels uniform in aug_noise."""
    if schedule.formulation == "edm":
        lo, hi = cfg.upsample.aug_noise
        level = lo + (hi - lo) * torch.rand(low.shape[0], device=low.device)
    else:
        lo, hi = (level_index(f, schedule.num_train_timesteps) for f in cfg.upsample.aug_noise)
        level = torch.randint(lo, hi + 1, (low.shape[0],), device=low.device)
    channels = upsample_channels(low, cfg.data.resolution, cfg.upsample)
    noisy = augment(channels, level, schedule, torch.randn_like(channels))
    return {"channels": noisy, "aug_level": level_input(level, schedule)}


def sampling_condition(low: torch.Tensor, cfg: Config, schedule: Schedule, level: int | float,
                       seed: int) -> dict[str, torch.Tensor]:
    """`channels` and `aug_level` for one low-res image (1, 3, r, r); the augmentation noise comes from `seed`."""
    channels = upsample_channels(low.float(), cfg.data.resolution, cfg.upsample)
    noise = torch.randn(channels.shape, generator=torch.Generator().manual_seed(int(seed) + 7919))
    level_t = torch.tensor([level])
    schedule = schedule.to("cpu")
    return {"channels": augment(channels, level_t, schedule, noise), "aug_level": level_input(level_t, schedule)}


class WithLowRes(torch.utils.data.Dataset):
    """A dataset whose items also carry "low_res" (3, r, r), made from their high-res image on the fly."""

    def __init__(self, dataset: torch.utils.data.Dataset, cfg: UpsampleConfig):
        self.dataset, self.cfg = dataset, cfg

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._add_low_res(self.dataset[index])

    def item(self, index: int, rng: ItemRandom) -> dict[str, Any]:
        """Item `index` of a dataset that draws per item (`diffusion.data.items`), with its low-res input."""
        return self._add_low_res(dataset_item(self.dataset, index, rng))

    def _add_low_res(self, item: dict) -> dict[str, Any]:
        item = dict(item)
        item["low_res"] = make_low_res(item["image"].unsqueeze(0), self.cfg)[0]
        return item

    def __getattr__(self, name: str) -> Any:  # num_classes, class_names, ...
        if name in ("dataset", "cfg"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def with_low_res(dataset: torch.utils.data.Dataset, cfg: Config) -> torch.utils.data.Dataset:
    """The training dataset of `cfg`: upsamplers get items with their low-res input."""
    return WithLowRes(dataset, cfg.upsample) if cfg.model.upsample else dataset
