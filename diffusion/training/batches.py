"""Training-time work per item and per batch, done in the data-loader workers, not the training loop.

In-painting keep-masks and caption word drop are drawn per item from the item's generator
(`diffusion.data.items`: a function of (seed, epoch, index)); captions are tokenised in the
collate function. The batch then reaches the GPU as pinned tensors with non-blocking copies
(accelerate's DataLoaderConfiguration(non_blocking=...)), and the loop only moves it.
"""
from __future__ import annotations

import torch
from torch.utils.data import default_collate

from ..conditioning.inpaint.masks import check_mask_config, training_keep_masks
from ..config import Config, InpaintConfig
from ..data.items import ItemRandom
from ..models.text import tokenize


def drop_words(captions: list[str], prob: float, gen: torch.Generator | None = None) -> list[str]:
    """Caption augmentation (train.caption_word_drop): each word but the first dropped with probability
    `prob`, so long captions (CelebA's attribute lists) also teach their partial descriptions."""
    if prob <= 0:
        return list(captions)
    out = []
    for caption in captions:
        words = caption.split()
        keep = torch.rand(len(words), generator=gen) >= prob
        keep[0] = True
        out.append(" ".join(w for w, k in zip(words, keep.tolist()) if k))
    return out


class TrainingAugment:
    """Per-item training draws: the in-painting keep-mask ("keep", (1, R, R)) and caption word drop."""

    def __init__(self, inpaint: InpaintConfig | None, word_drop: float):
        if inpaint is not None:
            check_mask_config(inpaint)  # once, here, rather than on every batch
        self.inpaint, self.word_drop = inpaint, word_drop

    def __call__(self, item: dict, rng: ItemRandom) -> dict:
        if self.inpaint is not None:
            item["keep"] = training_keep_masks(1, item["image"].shape[-1], self.inpaint, rng.torch)[0]
        if self.word_drop > 0:
            item["caption"] = drop_words([item["caption"]], self.word_drop, rng.torch)[0]
        return item


class TokenizingCollate:
    """default_collate plus "tokens" (B, context_length): the batch's captions, tokenised in the worker."""

    def __init__(self, context_length: int):
        self.context_length = context_length

    def __call__(self, items: list[dict]) -> dict:
        batch = default_collate(items)
        batch["tokens"] = tokenize(list(batch["caption"]), self.context_length)
        return batch


def training_augment(cfg: Config) -> TrainingAugment | None:
    inpaint = cfg.inpaint if cfg.task == "denoiser" and cfg.model.inpaint else None
    word_drop = cfg.train.caption_word_drop if cfg.task == "clip" else 0.0
    return TrainingAugment(inpaint, word_drop) if inpaint is not None or word_drop > 0 else None


def training_collate(cfg: Config) -> TokenizingCollate | None:
    reads_text = cfg.task == "clip" or (cfg.task == "denoiser" and cfg.model.condition == "text")
    return TokenizingCollate(cfg.model.text.context_length) if reads_text else None
