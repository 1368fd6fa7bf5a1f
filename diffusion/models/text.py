"""Captions to embeddings: open_clip's BPE tokenizer and a GLIDE-style transformer text encoder.

The tokenizer's vocabulary ships inside the open_clip package, so tokenising works offline.
A caption becomes [SOT, tokens..., EOT, 0, 0, ...]; everything after the first EOT is padding.
The encoder is trained jointly with the U-Net (GLIDE, Nichol et al. 2021): it returns every
token's embedding (for the U-Net's attention) and the final token's (EOT) embedding (projected
and added to the timestep embedding). Padding is masked out of its self-attention, so a caption
padded to any length gives the same embeddings for its real tokens.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

from ..config import TextConfig

EMPTY_CAPTION = ""  # the unconditional input: captions are dropped to it in training


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> SimpleTokenizer:
    """open_clip's CLIP BPE tokenizer (vocabulary bundled with the package: no download)."""
    return SimpleTokenizer()


def tokenize(texts: str | list[str], context_length: int) -> torch.Tensor:
    """(N, context_length) token ids; captions that do not fit are cut and end with EOT."""
    return get_tokenizer()([texts] if isinstance(texts, str) else list(texts), context_length=context_length)


def token_count(text: str) -> int:
    """Tokens a caption needs, SOT and EOT included."""
    return len(get_tokenizer().encode(text)) + 2


def empty_tokens_like(tokens: torch.Tensor) -> torch.Tensor:
    """The empty caption [SOT, EOT, pad...] with the shape, dtype and device of `tokens`."""
    tok = get_tokenizer()
    empty = torch.zeros_like(tokens)
    empty[..., 0], empty[..., 1] = tok.sot_token_id, tok.eot_token_id
    return empty


def real_token_mask(tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) True for real tokens: everything up to and including the first EOT.

    Found from the EOT position rather than `tokens != 0`, because id 0 is also a real token ("!").
    """
    is_eot = tokens == get_tokenizer().eot_token_id
    before_eot = is_eot.long().cumsum(dim=1) - is_eot.long() == 0
    return before_eot


@dataclass
class TextEmbedding:
    tokens: torch.Tensor  # (B, L, width): every token, for the U-Net's attention
    pooled: torch.Tensor  # (B, width): the final (EOT) token, for the timestep embedding
    mask: torch.Tensor  # (B, L) bool, True = real token


class TextEncoder(ModelMixin, ConfigMixin):
    """GLIDE's text transformer: token + position embeddings, pre-LN transformer, final LayerNorm.

    Bidirectional self-attention with padding keys masked out. A diffusers ModelMixin, so the
    export's `text_encoder/` folder loads with `TextEncoder.from_pretrained(path)`.
    """

    @register_to_config
    def __init__(self, width: int = 128, layers: int = 2, heads: int = 4, context_length: int = 32,
                 vocab_size: int = 49408):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.final_ln = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    @classmethod
    def from_text_config(cls, cfg: TextConfig) -> "TextEncoder":
        return cls(cfg.width, cfg.layers, cfg.heads, cfg.context_length, get_tokenizer().vocab_size)

    def forward(self, tokens: torch.Tensor) -> TextEmbedding:
        length = tokens.shape[1]
        if length > self.config.context_length:
            raise ValueError(f"{length} tokens exceed the text encoder's context length {self.config.context_length}")
        mask = real_token_mask(tokens)
        h = self.token_embedding(tokens) + self.positional_embedding[:length]
        h = self.final_ln(self.transformer(h, src_key_padding_mask=~mask))
        last = mask.long().sum(dim=1) - 1  # index of the EOT token
        pooled = h[torch.arange(h.shape[0], device=h.device), last]
        return TextEmbedding(tokens=h, pooled=pooled, mask=mask)
