"""Reference image sets for FID/KID and their cached feature statistics.

A reference is a dataset name (`shapes`, `cifar10`, `celeba`, `imagefolder`, optionally `NAME:SPLIT`)
or a directory of images. Images are resized (bicubic, short side) and centre-cropped to the
samples' resolution, as the training data was, then scored as uint8. Statistics are computed once
per dataset, split, resolution, image count and feature extractor, and cached under a key that
names all of these (recorded in the report), so a change in any of them computes afresh.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from ..config import CHOICES, DataConfig
from ..data import build_dataset
from ..errors import UserError
from ..sampling.images import to_uint8
from .extractors import Extractor
from .feature_stats import KID_MAX, FeatureStats, accumulate

CACHE_VERSION = 1
DATASETS = CHOICES["data.name"]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "diffusion" / "fid"


def reference_config(spec: str | None, split: str | None, root: str | None, trained_on: DataConfig | None,
                     resolution: int) -> DataConfig:
    """The data config of a reference: a directory, `NAME[:SPLIT]`, or (None) the checkpoint's own data."""
    if spec is None:
        if trained_on is None:
            raise UserError("--reference is needed when --samples is a directory (a dataset name or an image directory)")
        cfg = dataclasses.replace(trained_on)
    elif Path(spec).is_dir():
        return DataConfig(name="imagefolder", root=str(Path(spec).resolve()), resolution=resolution, split=split or "train")
    else:
        name, _, spec_split = spec.partition(":")
        if name not in DATASETS:
            raise UserError(f"--reference {spec}: neither an image directory nor a dataset "
                            f"({', '.join(DATASETS)}; NAME:SPLIT picks a split)")
        if name == "imagefolder" and root is None:
            raise UserError("--reference imagefolder needs --reference-root DIR (or pass the directory as --reference)")
        same = trained_on is not None and trained_on.name == name
        cfg = dataclasses.replace(trained_on) if same else DataConfig(name=name)
        split = split or spec_split or None
    cfg.root = str(Path(root if root is not None else cfg.root).resolve())
    cfg.split = split or "train"
    cfg.resolution, cfg.hflip = resolution, False
    return cfg


def describe(cfg: DataConfig) -> str:
    if cfg.name == "shapes":
        return f"shapes:{cfg.split} (size {cfg.shapes_size}, seed {cfg.shapes_seed})"
    return f"{cfg.name}:{cfg.split} ({cfg.root})"


def files_fingerprint(dataset) -> str | None:
    """Names, sizes and times of an image folder's files: edits to the folder change the key."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return None
    digest = hashlib.sha256()
    for path, _ in samples:
        stat = Path(path).stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cache_key(cfg: DataConfig, dataset, count: int, extractor: Extractor) -> dict:
    key = {"version": CACHE_VERSION, "dataset": cfg.name, "split": cfg.split, "resolution": cfg.resolution,
           "count": count, "extractor": extractor.key, "kid_max": KID_MAX, "scored_as": "uint8"}
    if cfg.name == "shapes":
        key.update(shapes_size=cfg.shapes_size, shapes_seed=cfg.shapes_seed)
    else:
        key["root"] = cfg.root
    fingerprint = files_fingerprint(dataset)
    if fingerprint:
        key["files"] = fingerprint
    return key


def cache_path(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{key['dataset']}-{key['split']}-{key['resolution']}px-{digest}.pt"


def jpeg_warning(dataset) -> str | None:
    samples = getattr(dataset, "samples", None) or []
    jpegs = sum(Path(p).suffix.lower() in (".jpg", ".jpeg") for p, _ in samples)
    if jpegs:
        return (f"note: {jpegs} of {len(samples)} reference images are JPEG; compression artefacts shift FID, "
                "so compare only with numbers computed on the same files")
    return None


def dataset_batches(dataset, batch_size: int, workers: int) -> Iterator[torch.Tensor]:
    """uint8 (B, 3, H, W) batches of a dataset, in order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    for batch in loader:
        yield to_uint8(batch["image"])


def reference_stats(cfg: DataConfig, limit: int, extractor: Extractor, cache_dir: Path, batch_size: int,
                    workers: int) -> tuple[FeatureStats, dict]:
    """Statistics of the first `limit` images (0 = all) of a reference, from the cache when possible."""
    dataset = build_dataset(cfg, cfg.split)
    count = len(dataset) if limit <= 0 else min(limit, len(dataset))
    if count < 2:
        raise UserError(f"the reference {describe(cfg)} has {len(dataset)} images; FID needs at least 2")
    key = cache_key(cfg, dataset, count, extractor)
    path = cache_path(cache_dir, key)
    info = {"reference": describe(cfg), "split": cfg.split, "resolution": cfg.resolution, "n": count,
            "cache_key": key, "cache_file": str(path)}
    stats = FeatureStats.load(path, key) if path.is_file() else None
    if stats is not None:
        print(f"reference statistics: cached {path}")
        return stats, {**info, "cached": True}
    warning = jpeg_warning(dataset)
    if warning:
        print(warning)
    subset = torch.utils.data.Subset(dataset, range(count)) if count < len(dataset) else dataset
    batches = tqdm(dataset_batches(subset, batch_size, workers), total=-(-count // batch_size),
                   desc="reference features", leave=False)
    stats = accumulate((extractor(images) for images in batches), count)
    stats.save(path, key)
    print(f"reference statistics: computed from {count} images, cached in {path}")
    return stats, {**info, "cached": False}
