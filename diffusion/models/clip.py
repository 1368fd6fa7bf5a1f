"""The noise-aware CLIP of GLIDE: open_clip towers whose image side sees x_t and t.

`task: clip` trains it contrastively (open_clip's ClipLoss) on (x_t, caption) pairs from any
captioned dataset (diffusion/training/tasks.py). Its gradient d/dx_t [f(x_t, t) . g(c)] then means
something at every noise level, which is what CLIP-guided sampling (diffusion/conditioning/clip.py)
needs; diffusion/evaluate/clip.py measures its retrieval accuracy per timestep bucket.
"""
from __future__ import annotations

import open_clip
import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from torch import nn

from ..config import Config
from ..errors import UserError
from .text import tokenize


class NoisyCLIP(nn.Module):
    """An open_clip CLIP (small ViT image tower, transformer text tower) conditioned on the timestep.

    Timestep embedding: an added bias on the patch tokens. The sinusoidal embedding of t goes
    through an MLP to the ViT width and is added to every patch token right after the patch
    convolution, before the class token and positional embeddings are attached. Why a bias and
    not an extra token: every token carries the noise level from the first layer on (like the
    per-block time bias of a U-Net), rather than learning it only through attention to one token;
    and the open_clip tower is left as it is (same sequence length, positional table and
    state-dict keys), so it is built and loaded by open_clip unchanged. The bias enters through a
    forward hook on `visual.conv1` that reads the embedding set by `encode_image`.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        res, vision, text = cfg.data.resolution, cfg.model.vision, cfg.model.text
        if res % vision.patch_size:
            raise UserError(f"model.vision.patch_size={vision.patch_size} must divide data.resolution={res}")
        if vision.width % vision.head_width:
            raise UserError(f"model.vision.width={vision.width} must be a multiple of "
                            f"model.vision.head_width={vision.head_width}")
        self.context_length = text.context_length
        self.clip = open_clip.CLIP(
            embed_dim=cfg.model.embed_dim,
            vision_cfg=CLIPVisionCfg(layers=vision.layers, width=vision.width, head_width=vision.head_width,
                                     patch_size=vision.patch_size, image_size=res),
            text_cfg=CLIPTextCfg(context_length=text.context_length, width=text.width, heads=text.heads,
                                 layers=text.layers),
        )
        self.time_proj = Timesteps(vision.width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(vision.width, vision.width)
        self._time_bias: torch.Tensor | None = None
        self.clip.visual.conv1.register_forward_hook(self._add_time_bias)

    def _add_time_bias(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if self._time_bias is None:
            raise RuntimeError("NoisyCLIP's image tower needs the timestep: call encode_image(x_t, t)")
        return output + self._time_bias[:, :, None, None].to(output.dtype)

    def encode_image(self, x: torch.Tensor, t: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image embeddings (B, embed_dim) of noisy images x_t at integer timesteps t (B,)."""
        emb = self.time_proj(t.reshape(-1).expand(x.shape[0]))
        self._time_bias = self.time_embed(emb.to(self.time_embed.linear_1.weight.dtype))
        try:
            return self.clip.encode_image(x, normalize=normalize)
        finally:
            self._time_bias = None

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.clip.encode_text(tokens, normalize=normalize)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        device = self.clip.logit_scale.device
        return tokenize(texts, self.context_length).to(device)

    def encode_prompts(self, texts: list[str]) -> torch.Tensor:
        return self.encode_text(self.tokenize(texts))

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def similarity(self, x: torch.Tensor, t: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """logit_scale * cos(f(x_t, t), g(c)) per sample (B,): the contrastive logit, used as log p(c | x_t)."""
        return self.logit_scale * (self.encode_image(x, t) * text_features).sum(-1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image features, text features, logit scale), as open_clip's CLIP returns them."""
        return self.encode_image(x, t), self.encode_text(tokens), self.logit_scale
