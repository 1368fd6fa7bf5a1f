"""Seeded, nested subsets of a split: every smaller subset lies inside every larger one.

The indices of a subset of size n are the first n of one seeded permutation of the split, so
for a fixed seed the subsets of a data-size sweep are prefixes of the same ordering.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from .items import ItemRandom, dataset_item


def nested_subset_indices(total: int, size: int, seed: int) -> list[int]:
    """The first `size` entries of a permutation of range(total) seeded by `seed`."""
    if not 0 < size <= total:
        raise UserError(f"data.subset_size={size} must be between 1 and the split's {total} images")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return perm[:size].tolist()


class NestedSubset(torch.utils.data.Dataset):
    """A subset that keeps the base dataset's class names and count."""

    def __init__(self, base: torch.utils.data.Dataset, size: int, seed: int):
        self.base = base
        self.indices = nested_subset_indices(len(base), size, seed)
        self.class_names = getattr(base, "class_names", ())
        self.num_classes = getattr(base, "num_classes", 0)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.base[self.indices[index]]

    def item(self, index: int, rng: ItemRandom) -> dict:
        return dataset_item(self.base, self.indices[index], rng)
