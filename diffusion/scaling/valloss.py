"""A fixed validation loss: held-out images x seeded (t, noise) pairs, stratified over timesteps.

Every run of a sweep sees exactly the same pairs, so losses compare across runs; the same weights
give the same value bit for bit (fixed pairs, fixed batch order, float64 sums, eval mode). edm runs
(diffusion.formulation: edm) are scored with their own training loss at sigmas stratified over the
training log-normal (bucket k holds its k-th quantile slice), so across formulations the numbers are
each model's own objective, not one figure.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ..config import Config
from ..data.subset import nested_subset_indices
from ..sampling.schedule import EDMSchedule, build_schedule, build_train_scheduler, training_target

EDM_POSITIONS = 1000  # edm pairs: quantile positions of the training log-normal


@dataclass
class ValLossConfig:
    split: str = "test"
    num_images: int = 128
    repeats: int = 8  # (t, noise) pairs per image
    buckets: int = 8  # timestep buckets: equal slices of [0, T)
    seed: int = 0
    batch_size: int = 256


@dataclass
class ValSet:
    """The fixed pairs: pair i uses image i // repeats, timestep t[i] (in bucket[i]) and noise[i]."""

    images: torch.Tensor  # (M, 3, H, W)
    t: torch.Tensor  # (P,) timesteps (ddpm) or sigmas (edm)
    bucket: torch.Tensor  # (P,)
    noise: torch.Tensor  # (P, 3, H, W)
    repeats: int
    buckets: int


def stratified_timesteps(pairs: int, buckets: int, num_timesteps: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair i gets bucket i % buckets and a uniform timestep inside that bucket's slice of [0, T)."""
    bucket = torch.arange(pairs) % buckets
    edges = torch.linspace(0, num_timesteps, buckets + 1)
    lo, hi = edges[bucket], edges[bucket + 1]
    t = (lo + torch.rand(pairs, generator=generator) * (hi - lo)).floor().long().clamp(0, num_timesteps - 1)
    return t, bucket


def build_valset(cfg: Config, vcfg: ValLossConfig) -> ValSet:
    """Held-out images (a seeded choice from `vcfg.split`, no flips) and seeded (t, noise) pairs."""
    from ..data import build_dataset

    data_cfg = dataclasses.replace(cfg.data, hflip=False, subset_size=0)
    dataset = build_dataset(data_cfg, vcfg.split)
    idx = nested_subset_indices(len(dataset), min(vcfg.num_images, len(dataset)), vcfg.seed)
    images = torch.stack([dataset[i]["image"] for i in idx])
    gen = torch.Generator().manual_seed(vcfg.seed + 1)
    pairs = len(idx) * vcfg.repeats
    edm = cfg.diffusion.formulation == "edm"
    t, bucket = stratified_timesteps(pairs, vcfg.buckets, EDM_POSITIONS if edm else cfg.diffusion.num_train_timesteps, gen)
    if edm:  # position -> the (position + 1/2) / POSITIONS quantile of ln(sigma) ~ N(p_mean, p_std^2)
        normal = torch.erfinv(2 * (t.double() + 0.5) / EDM_POSITIONS - 1) * 2 ** 0.5
        t = (cfg.diffusion.p_mean + cfg.diffusion.p_std * normal).exp().float()
    noise = torch.randn(pairs, *images.shape[1:], generator=gen)
    return ValSet(images, t, bucket, noise, vcfg.repeats, vcfg.buckets)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, cfg: Config, valset: ValSet, batch_size: int = 256,
                    scheduler=None) -> dict[str, float]:
    """Mean squared error on the fixed pairs: `val_loss` overall and `val_loss_b{k}` per timestep bucket.

    Unconditional: class models get the null label, caption models the empty caption (the
    model's own default when no condition is passed).
    """
    scheduler = scheduler or build_train_scheduler(cfg.diffusion)
    schedule = build_schedule(cfg.diffusion)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    per_pair = np.zeros(len(valset.t), dtype=np.float64)
    try:
        for start in range(0, len(valset.t), batch_size):
            sl = slice(start, start + batch_size)
            t = valset.t[sl]
            x0 = valset.images[torch.arange(start, start + len(t)) // valset.repeats]
            noise = valset.noise[sl]
            if isinstance(schedule, EDMSchedule):
                x_t, t_in, target = schedule.training_example(x0, noise, t)
            else:
                x_t, t_in, target = scheduler.add_noise(x0, noise, t), t, training_target(scheduler, x0, noise, t)
            kwargs = {}
            if getattr(model, "extra_channels", 0):  # in-painting: all-unknown mask, i.e. plain generation
                kwargs["channels"] = torch.zeros(len(t), model.extra_channels, *x0.shape[2:], device=device)
            pred = model(x_t.to(device), t_in.to(device), **kwargs).float().cpu()
            target = target.float()
            per_pair[sl] = ((pred - target) ** 2).mean(dim=(1, 2, 3)).double().numpy()
    finally:
        model.train(was_training)
    out = {"val_loss": float(per_pair.mean())}
    bucket = valset.bucket.numpy()
    for b in range(valset.buckets):
        out[f"val_loss_b{b}"] = float(per_pair[bucket == b].mean()) if (bucket == b).any() else float("nan")
    return out


def load_ema_model(checkpoint: str, cfg: Config) -> torch.nn.Module:
    """The denoiser of a checkpoint directory with its EMA weights (CPU)."""
    from pathlib import Path

    from ..checkpoints.store import read_weights
    from ..models import build_denoiser

    model = build_denoiser(cfg.model, cfg.data.resolution, max(cfg.model.num_classes, 1))
    model.load_state_dict(read_weights(Path(checkpoint)))  # sha256-checked
    return model
