"""Datasets: every item is {"image": (3,H,W) in [-1, 1], "label": int, "caption": str}."""
from __future__ import annotations

from typing import Callable

import torch

from ..config import DataConfig
from ..signals import ignore_stop_signals
from .celeba import CelebA
from .cifar import Cifar10
from .imagefolder import ImageFolder
from .items import EpochItems, EpochSampler, ItemRandom
from .shapes import ShapesDataset
from .subset import NestedSubset


def build_dataset(cfg: DataConfig, split: str | None = None) -> torch.utils.data.Dataset:
    """The dataset named by `cfg.name`; it has `num_classes` and `class_names`.

    Without `split` this is the training set as configured: `data.subset_size` > 0 keeps a seeded,
    nested subset of `cfg.split` (see `subset.py`). An explicit split is always whole.
    """
    if split is None and cfg.subset_size > 0:
        return NestedSubset(_build_split(cfg, cfg.split), cfg.subset_size, cfg.subset_seed)
    return _build_split(cfg, split or cfg.split)


def _build_split(cfg: DataConfig, split: str) -> torch.utils.data.Dataset:
    if cfg.name == "shapes":
        return ShapesDataset(cfg.resolution, cfg.shapes_size, cfg.shapes_seed, split, cfg.hflip)
    if cfg.name == "cifar10":
        return Cifar10(cfg.root, cfg.resolution, split, cfg.hflip, cfg.download)
    if cfg.name == "celeba":
        return CelebA(cfg.root, cfg.resolution, split, cfg.hflip, cfg.celeba_attributes, cfg.celeba_captions, cfg.cache)
    if cfg.name == "imagefolder":
        return ImageFolder(cfg.root, cfg.resolution, split, cfg.hflip)
    raise ValueError(f"unknown dataset {cfg.name}")


def pins_memory(cfg: DataConfig) -> bool:
    """Pinned host memory (and non-blocking copies) when asked and a GPU can use it; elsewhere it only warns."""
    return cfg.pin_memory and torch.cuda.is_available()


def build_dataloader(dataset: torch.utils.data.Dataset, cfg: DataConfig, batch_size: int, shuffle: bool = True,
                     drop_last: bool = True, seed: int = 0, augment: Callable[[dict, ItemRandom], dict] | None = None,
                     collate_fn: Callable[[list[dict]], dict] | None = None) -> torch.utils.data.DataLoader:
    """A loader whose order and per-item draws (flip, caption template, `augment`) are functions of
    (seed, epoch, index) (see `items.py`), so any worker count resumes exactly. It has its own generator,
    so starting an iterator never draws from the global RNG (which would make a resumed run's noise
    differ from an uninterrupted one's). Set the epoch with the loader's `set_epoch` (accelerate's).
    Workers ignore the signals that stop a run (`diffusion.signals`): the main process handles them."""
    return torch.utils.data.DataLoader(
        EpochItems(dataset, seed, augment), batch_size=batch_size, sampler=EpochSampler(len(dataset), seed, shuffle),
        drop_last=drop_last, num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
        pin_memory=pins_memory(cfg), collate_fn=collate_fn, worker_init_fn=ignore_stop_signals,
        generator=torch.Generator().manual_seed(seed),
    )
