"""The denoiser: a diffusers U-Net plus the conditioning that feeds it.

Conditioning travels as keyword tensors so every feature plugs in the same way:
- `labels` (B,) class indices; index `num_classes` is the learned "null" class (unconditional);
- `channels` (B,k,H,W) extra input channels concatenated to x_t (in-painting: masked RGB + keep-mask;
  later the upsampler's low-resolution image);
- `tokens` (B,L) caption token ids (open_clip tokenizer); the empty caption is the unconditional input.

Caption models use diffusers' UNet2DConditionModel. GLIDE feeds the text tokens to the U-Net either
as extra keys/values of its self-attention or through cross-attention; we use cross-attention
(CrossAttn*Block2D) because it is diffusers' maintained path, it honours `encoder_attention_mask`
(padding masked out), and the exported U-Net loads in plain diffusers. The final token's
embedding is projected by one linear layer and added to the timestep embedding, as in GLIDE:
that is diffusers' `class_embed_type="simple_projection"`, fed the pooled text embedding.

Upsamplers (model.upsample) read the bilinearly upsampled low-res image as 3 extra channels and
the noise-augmentation level `aug_level` (B,) in 0..T (0 = clean low-res; edm models: c_noise of the
augmentation sigma, see diffusion/conditioning/upsample.py). The level is embedded
like a timestep (sinusoidal features + MLP, `LevelEmbedding`) and added to the U-Net's timestep
embedding through a forward hook on `unet.time_embedding`. That leaves diffusers' class-embedding
slot to class labels (UNet2DModel) or the pooled caption (UNet2DConditionModel), so the level
combines with either, and the U-Net's parameter names stay those of a base model (init_from). Its
last layer starts at zero: a fresh level embedding changes nothing. The plain-diffusers export
(`unet/`) does not include it.
"""
from __future__ import annotations

import math

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from ..config import ModelConfig
from .text import TextEncoder, empty_tokens_like, tokenize

INPAINT_CHANNELS = 4  # masked RGB (known pixels, zeros elsewhere) + keep-mask
UPSAMPLE_CHANNELS = 3  # the low-res image, upsampled to the model's resolution


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


def cross_attention_kwargs(cfg: ModelConfig, resolution: int) -> dict:
    """`unet_kwargs` for UNet2DConditionModel: attention levels become cross-attention blocks.

    Its `attention_head_dim` argument is (for legacy reasons) the number of heads, so it is
    computed per level from our per-head width.
    """
    kwargs = unet_kwargs(cfg, resolution)
    rename = {"AttnDownBlock2D": "CrossAttnDownBlock2D", "AttnUpBlock2D": "CrossAttnUpBlock2D"}
    kwargs["down_block_types"] = tuple(rename.get(b, b) for b in kwargs["down_block_types"])
    kwargs["up_block_types"] = tuple(rename.get(b, b) for b in kwargs["up_block_types"])
    kwargs["attention_head_dim"] = tuple(max(1, c // cfg.attention_head_dim) for c in kwargs["block_out_channels"])
    return kwargs


def extra_input_channels(cfg: ModelConfig) -> int:
    return INPAINT_CHANNELS if cfg.inpaint else UPSAMPLE_CHANNELS if cfg.upsample else 0


class LevelEmbedding(nn.Module):
    """The noise-augmentation level (B,) as a vector added to the timestep embedding; zero at init."""

    def __init__(self, features: int, width: int):
        super().__init__()
        self.proj = Timesteps(features, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = TimestepEmbedding(features, width)
        nn.init.zeros_(self.mlp.linear_2.weight)
        nn.init.zeros_(self.mlp.linear_2.bias)

    def forward(self, level: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.proj(level).to(self.mlp.linear_1.weight.dtype))


class Denoiser(nn.Module):
    """Predicts the diffusion target (epsilon or v) from x_t, t and the conditioning."""

    def __init__(self, cfg: ModelConfig, resolution: int, num_classes: int):
        super().__init__()
        self.condition = cfg.condition
        self.num_classes = num_classes
        self.extra_channels = extra_input_channels(cfg)
        self.preview_prompts: list[str] = []  # captions for training previews (default: the first batch's)
        if cfg.condition == "text":
            self.context_length = cfg.text.context_length
            self.text_encoder = TextEncoder.from_text_config(cfg.text)
            self.unet = UNet2DConditionModel(
                sample_size=resolution,
                in_channels=3 + self.extra_channels,
                out_channels=3,
                cross_attention_dim=cfg.text.width,
                class_embed_type="simple_projection",
                projection_class_embeddings_input_dim=cfg.text.width,
                **cross_attention_kwargs(cfg, resolution),
            )
        elif cfg.unet_config:  # a pretrained diffusers U-Net's own layout (init_from a diffusers folder)
            from ..checkpoints.pretrained_checks import parse_unet_config

            config = {k: v for k, v in parse_unet_config(cfg.unet_config).items() if not k.startswith("_")}
            self.unet = UNet2DModel.from_config({**config, "sample_size": resolution,
                                                 "in_channels": 3 + self.extra_channels, "out_channels": 3})
        else:
            self.unet = UNet2DModel(
                sample_size=resolution,
                in_channels=3 + self.extra_channels,
                out_channels=3,
                num_class_embeds=num_classes + 1 if cfg.condition == "class" else None,
                **unet_kwargs(cfg, resolution),
            )
        self.upsample = cfg.upsample
        self.clean_aug_level: int | float = 0  # what `aug_level` the clean low-res is (the formulation's)
        self._level: torch.Tensor | None = None  # the level embedding of the current forward call
        if self.upsample:
            width = self.unet.time_embedding.linear_2.out_features
            self.level_embedding = LevelEmbedding(self.unet.config.block_out_channels[0], width)
            self.unet.time_embedding.register_forward_hook(self._add_level)

    def _add_level(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return output if self._level is None else output + self._level.to(output.dtype)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def tokenize(self, captions: str | list[str]) -> torch.Tensor:
        """(N, context_length) token ids of captions, cut to this model's context length."""
        return tokenize(captions, self.context_length)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                channels: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                aug_level: torch.Tensor | None = None) -> torch.Tensor:
        if self.extra_channels:
            if channels is None:
                raise ValueError("this model needs `channels` (in-painting: masked image + keep-mask; "
                                 "upsampler: the upsampled low-res image)")
            x = torch.cat([x, channels.to(x.dtype)], dim=1)
        if not self.upsample:
            return self._unet(x, t, labels, tokens)
        if aug_level is None:  # the clean low-res (edm models read c_noise: build_model sets their clean level)
            aug_level = torch.full((x.shape[0],), self.clean_aug_level, device=x.device)
        self._level = self.level_embedding(aug_level.expand(x.shape[0]))
        try:
            return self._unet(x, t, labels, tokens)
        finally:
            self._level = None

    def _unet(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
              tokens: torch.Tensor | None) -> torch.Tensor:
        if self.condition == "text":
            if tokens is None:
                tokens = self.tokenize([""] * x.shape[0]).to(x.device)
            text = self.text_encoder(tokens)
            return self.unet(x, t, encoder_hidden_states=text.tokens, class_labels=text.pooled,
                             encoder_attention_mask=text.mask).sample
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
        if "tokens" in cond:
            out["tokens"] = empty_tokens_like(cond["tokens"])
        return out

    def drop_condition(self, cond: dict[str, torch.Tensor], drop: torch.Tensor) -> dict[str, torch.Tensor]:
        """Replace the condition by the null one where `drop` (B,) is True (CFG training)."""
        out = dict(cond)
        if "labels" in cond:
            out["labels"] = torch.where(drop, torch.full_like(cond["labels"], self.null_label), cond["labels"])
        if "tokens" in cond:
            out["tokens"] = torch.where(drop[:, None], empty_tokens_like(cond["tokens"]), cond["tokens"])
        return out

    def preview_condition(self, index: int) -> dict[str, torch.Tensor]:
        """Condition for the index-th image of a training preview grid (classes cycled).

        In-painting models get an all-unknown mask (zero channels), i.e. plain generation.
        """
        cond: dict[str, torch.Tensor] = {}
        if self.condition == "class":
            cond = {"labels": torch.tensor([index % self.num_classes])}
        if self.condition == "text":
            prompts = self.preview_prompts or [""]
            cond = {"tokens": self.tokenize(prompts[index % len(prompts)])}
        if self.extra_channels:
            size = self.unet.config.sample_size
            cond["channels"] = torch.zeros(1, self.extra_channels, size, size)
        return cond

    def condition_from_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        """The conditioning tensors this model reads from a data batch."""
        if self.condition == "class":
            return {"labels": batch["label"]}
        if self.condition == "text":
            captions = list(batch["caption"])
            if not self.preview_prompts:
                self.preview_prompts = captions
            tokens = batch["tokens"] if "tokens" in batch else self.tokenize(captions)  # training: tokenised in workers
            return {"tokens": tokens.to(batch["image"].device)}
        return {}


def build_denoiser(cfg: ModelConfig, resolution: int, num_classes: int) -> Denoiser:
    return Denoiser(cfg, resolution, num_classes)
