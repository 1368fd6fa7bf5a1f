"""FLOPs measured with torch.utils.flop_counter at a run's resolution and conditioning.

Convolution cost scales with H*W, so 6N is wrong for a U-Net: we count the forward pass of the
actual model on one image and charge training 3x forward (forward + backward) per image seen.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..config import Config

TRAIN_MULTIPLIER = 3  # backward costs about twice the forward


def count_forward_flops(model: torch.nn.Module, *args: torch.Tensor, **kwargs: torch.Tensor) -> int:
    """FLOPs (multiply and add counted separately) of one `model(*args, **kwargs)` call."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(*args, **kwargs)
    return int(counter.get_total_flops())


def example_condition(model: torch.nn.Module, cfg: Config) -> dict[str, torch.Tensor]:
    """Conditioning tensors for one image, as training feeds them (labels, tokens, extra channels)."""
    cond: dict[str, torch.Tensor] = {}
    res = cfg.data.resolution
    if cfg.model.condition == "class":
        cond["labels"] = torch.zeros(1, dtype=torch.long)
    if cfg.model.condition == "text":
        cond["tokens"] = model.tokenize(["a photo of a cat"])
    if getattr(model, "extra_channels", 0):
        cond["channels"] = torch.zeros(1, model.extra_channels, res, res)
    return cond


def denoiser_forward_flops(cfg: Config, model: torch.nn.Module | None = None) -> int:
    """Forward FLOPs per image of the run's denoiser at its resolution and conditioning."""
    if model is None:
        from ..models import build_denoiser

        model = build_denoiser(cfg.model, cfg.data.resolution, max(cfg.model.num_classes, 1))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, cfg.data.resolution, cfg.data.resolution, device=device)
    t = torch.full((1,), cfg.diffusion.num_train_timesteps // 2, dtype=torch.long, device=device)
    cond = {k: v.to(device) for k, v in example_condition(model, cfg).items()}
    try:
        return count_forward_flops(model, x, t, **cond)
    finally:
        model.train(was_training)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def training_flops(forward_per_image: float, images_seen: float) -> float:
    """C = 3 x forward FLOPs per image x images seen."""
    return TRAIN_MULTIPLIER * forward_per_image * images_seen
