"""The denoiser: a diffusers U-Net plus the conditioning that feeds it.

Conditioning travels as keyword tensors so every feature plugs in the same way:
- `labels` (B,) class indices; index `num_classes` is the learned "null" class (unconditional);
- `channels` (B,k,H,W) extra input channels concatenated to x_t (in-painting: masked RGB + keep-mask;
  later the upsampler's low-resolution image).
"""
from __future__ import annotations

import math

import torch
from diffusers import UNet2DModel
from torch import nn

from ..config import ModelConfig

INPAINT_CHANNELS = 4  # masked RGB (known pixels, zeros elsewhere) + keep-mask


def unet_kwargs(cfg: ModelConfig, resolution: int) -> dict:
    """Block layout shared by the U-Net and the classifier/CLIP encoders built from diffusers blocks."""
    channels = [cfg.base_channels * m for m in cfg.channel_mult]
    with_attention = [resolution // 2**i in cfg.attention_resolutions for i in range(len(channels))]
    return dict(
        block_out_channels=tuple(channels),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in with_attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attention)),
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=math.gcd(32, cfg.base_channels),
        dropout=cfg.dropout,
        resnet_time_scale_shift="scale_shift" if cfg.scale_shift_norm else "default",
    )


def extra_input_channels(cfg: ModelConfig) -> int:
    return INPAINT_CHANNELS if cfg.inpaint else 0


class Denoiser(nn.Module):
    """Predicts the diffusion target (epsilon or v) from x_t, t and the conditioning."""

    def __init__(self, cfg: ModelConfig, resolution: int, num_classes: int):
        super().__init__()
        self.condition = cfg.condition
        self.num_classes = num_classes
        self.extra_channels = extra_input_channels(cfg)
        self.unet = UNet2DModel(
            sample_size=resolution,
            in_channels=3 + self.extra_channels,
            out_channels=3,
            num_class_embeds=num_classes + 1 if cfg.condition == "class" else None,
            **unet_kwargs(cfg, resolution),
        )

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                channels: torch.Tensor | None = None) -> torch.Tensor:
        if self.extra_channels:
            if channels is None:
                raise ValueError("this in-painting model needs `channels` (masked image + keep-mask)")
            x = torch.cat([x, channels.to(x.dtype)], dim=1)
        if self.condition == "class":
            if labels is None:
                labels = torch.full((x.shape[0],), self.null_label, device=x.device, dtype=torch.long)
            return self.unet(x, t, class_labels=labels).sample
        return self.unet(x, t).sample

    def null_condition(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unconditional counterpart of `cond` (null class); extra channels are kept."""
        out = dict(cond)
        if "labels" in cond:
            out["labels"] = torch.full_like(cond["labels"], self.null_label)
        return out

    def drop_condition(self, cond: dict[str, torch.Tensor], drop: torch.Tensor) -> dict[str, torch.Tensor]:
        """Replace the condition by the null one where `drop` (B,) is True (CFG training)."""
        out = dict(cond)
        if "labels" in cond:
            out["labels"] = torch.where(drop, torch.full_like(cond["labels"], self.null_label), cond["labels"])
        return out

    def preview_condition(self, index: int) -> dict[str, torch.Tensor]:
        """Condition for the index-th image of a training preview grid (classes cycled)."""
        if self.condition == "class":
            return {"labels": torch.tensor([index % self.num_classes])}
        return {}

    def condition_from_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        """The conditioning tensors this model reads from a data batch."""
        if self.condition == "class":
            return {"labels": batch["label"]}
        return {}


def build_denoiser(cfg: ModelConfig, resolution: int, num_classes: int) -> Denoiser:
    return Denoiser(cfg, resolution, num_classes)
