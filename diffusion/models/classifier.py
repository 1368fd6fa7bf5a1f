"""The noise-aware classifier p(y | x_t, t) of classifier guidance (Dhariwal & Nichol).

The network is ADM's half U-Net, assembled from diffusers blocks: the denoiser's down blocks
(ResNet blocks with timestep embedding, attention where the denoiser has it, downsampling), its
middle block, then attention or mean pooling to class logits. `task: classifier` trains it on
x_t = q_sample(x_0, t) (diffusion/training/tasks.py); diffusion/conditioning/classifier.py guides with it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import AttentionPooling, TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block
from torch import nn

from ..config import Config, ModelConfig
from ..errors import UserError
from .denoiser import unet_kwargs


class NoisyClassifier(nn.Module):
    """Logits (B, num_classes) of the class of x_0 from a noisy image x_t at timestep t."""

    def __init__(self, cfg: ModelConfig, resolution: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        layout = unet_kwargs(cfg, resolution)
        channels = layout["block_out_channels"]
        groups, head_dim = layout["norm_num_groups"], layout["attention_head_dim"]
        time_dim = channels[0] * 4
        self.num_classes = num_classes
        self.time_proj = Timesteps(channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(channels[0], time_dim)
        self.conv_in = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList()
        previous = channels[0]
        for i, (block_type, width) in enumerate(zip(layout["down_block_types"], channels)):
            self.down_blocks.append(get_down_block(
                block_type, num_layers=layout["layers_per_block"], in_channels=previous, out_channels=width,
                temb_channels=time_dim, add_downsample=i < len(channels) - 1, resnet_eps=1e-5, resnet_act_fn="silu",
                resnet_groups=groups, attention_head_dim=head_dim, downsample_padding=1,
                resnet_time_scale_shift=layout["resnet_time_scale_shift"], dropout=layout["dropout"],
            ))
            previous = width
        self.mid_block = UNetMidBlock2D(
            in_channels=previous, temb_channels=time_dim, dropout=layout["dropout"], resnet_eps=1e-5,
            resnet_act_fn="silu", resnet_time_scale_shift=layout["resnet_time_scale_shift"],
            attention_head_dim=head_dim, resnet_groups=groups,
        )
        self.norm_out = nn.GroupNorm(groups, previous)
        self.pool = AttentionPooling(max(1, previous // head_dim), previous) if cfg.pool == "attention" else None
        self.head = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        temb = self.time_embedding(self.time_proj(t).to(x.dtype))
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(h, temb)
        h = F.silu(self.norm_out(self.mid_block(h, temb)))
        tokens = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        pooled = self.pool(tokens) if self.pool is not None else tokens.mean(dim=1)
        return self.head(pooled)

    def log_prob(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p(labels | x_t, t), shape (B,)."""
        logits = self(x, t).float()
        return logits.log_softmax(dim=-1).gather(1, labels.view(-1, 1).to(logits.device)).squeeze(1)


def build_classifier(cfg: Config) -> NoisyClassifier:
    if cfg.model.num_classes < 2:
        raise UserError(
            f"a classifier needs at least 2 classes; the data has {cfg.model.num_classes} "
            "(for CelebA choose attributes, e.g. data.celeba_attributes=[Smiling])"
        )
    return NoisyClassifier(cfg.model, cfg.data.resolution, cfg.model.num_classes)
