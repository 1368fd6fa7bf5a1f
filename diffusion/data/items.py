"""Per-item randomness as a pure function of (seed, epoch, index).

Every random choice made for one training item (horizontal flip, caption template, in-painting
mask, word drop) comes from a generator seeded by a hash of (seed, epoch, index). Data-loader
workers then hold no random state worth saving: a resumed run, with any `data.num_workers`, sees
exactly the items an uninterrupted run would. The sampler passes (epoch, index) keys, so persistent
workers learn the epoch from the keys themselves.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any, Callable, Iterator

import torch


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed from (seed, epoch, index); neighbouring keys give unrelated streams."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class ItemRandom:
    """The random sources of one item: a torch generator and a Python `random.Random`, one seed."""

    def __init__(self, seed: int):
        self.torch = torch.Generator().manual_seed(seed)
        self.py = random.Random(seed)

    @classmethod
    def of(cls, seed: int, epoch: int, index: int) -> "ItemRandom":
        return cls(item_seed(seed, epoch, index))

    def coin(self, prob: float = 0.5) -> bool:
        return bool(torch.rand((), generator=self.torch) < prob)


def random_hflip(image: torch.Tensor, hflip: bool, rng: ItemRandom) -> torch.Tensor:
    """Mirror the (C, H, W) image with probability 1/2 when `hflip` (RandomHorizontalFlip, seeded per item)."""
    return image.flip(-1) if hflip and rng.coin() else image


def dataset_item(dataset: torch.utils.data.Dataset, index: int, rng: ItemRandom) -> dict:
    """`dataset.item(index, rng)` where the dataset draws per item, else `dataset[index]`."""
    item = getattr(dataset, "item", None)
    return item(index, rng) if item is not None else dataset[index]


class EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, index) keys: a permutation seeded by seed + epoch (or in order, without shuffle)."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:  # accelerate's DataLoaderShard.set_epoch calls this
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = range(self.size)
        return iter([(self.epoch, i) for i in order])


class EpochItems(torch.utils.data.Dataset):
    """Items keyed by (epoch, index), each drawn with `ItemRandom.of(seed, epoch, index)`, then `augment`ed."""

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int,
                 augment: Callable[[dict, ItemRandom], dict] | None = None):
        self.dataset, self.seed, self.augment = dataset, seed, augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = ItemRandom.of(self.seed, epoch, index)
        item = dataset_item(self.dataset, index, rng)
        return self.augment(dict(item), rng) if self.augment is not None else item

    def __getattr__(self, name: str) -> Any:  # num_classes, class_names, ...
        if name in ("dataset", "seed", "augment"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
