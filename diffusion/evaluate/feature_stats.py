"""Feature statistics of an image set, and FID/KID between two sets, computed by torchmetrics.

FID needs only the feature sum, the sum of outer products and the count, which torchmetrics'
FrechetInceptionDistance accumulates; these are what we cache for a reference set. KID needs raw
features; we keep a fixed, seeded subset of at most `kid_max` rows per set (KID draws subsets of
`subset_size` <= 1000 rows from them anyway).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from ..io import atomic_write

KID_MAX = 10_000
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


class PrecomputedFeatures(torch.nn.Module):
    """Identity 'extractor': the metrics receive features we extracted (and cached) ourselves."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_metric(dim: int) -> FrechetInceptionDistance:
    return FrechetInceptionDistance(feature=PrecomputedFeatures(dim), reset_real_features=False)


@dataclass
class FeatureStats:
    total: torch.Tensor  # (D,) float64, sum of features
    outer: torch.Tensor  # (D, D) float64, sum of feature outer products
    count: int
    kid: torch.Tensor  # (<= KID_MAX, D) float32, a seeded subset of the features

    @property
    def dim(self) -> int:
        return self.total.shape[0]

    def save(self, path: Path, key: dict) -> None:
        payload = {"key": key, "total": self.total, "outer": self.outer, "count": self.count, "kid": self.kid}
        atomic_write(path, lambda tmp: torch.save(payload, tmp))

    @classmethod
    def load(cls, path: Path, key: dict) -> "FeatureStats | None":
        """The cached statistics, or None when missing, unreadable or made under another key."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError):
            return None
        if not isinstance(payload, dict) or payload.get("key") != key:
            return None
        return cls(payload["total"], payload["outer"], int(payload["count"]), payload["kid"])


def kid_rows(total: int, kid_max: int, seed: int) -> torch.Tensor:
    """(total,) bool: which rows of a set of `total` feature rows KID keeps."""
    keep = torch.zeros(total, dtype=torch.bool)
    keep[torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:kid_max]] = True
    return keep


def accumulate(batches: Iterable[torch.Tensor], total: int, kid_max: int = KID_MAX, seed: int = 0) -> FeatureStats:
    """Statistics of a set whose (B, D) feature batches arrive in order; `total` rows in all."""
    keep = kid_rows(total, kid_max, seed)
    metric, kept, start = None, [], 0
    for features in batches:
        if metric is None:
            metric = fid_metric(features.shape[1])
        metric.update(features.double(), real=True)
        kept.append(features[keep[start:start + len(features)]].float())
        start += len(features)
    if metric is None or start < 2:
        raise ValueError("FID needs at least two images per set")
    return FeatureStats(metric.real_features_sum.clone(), metric.real_features_cov_sum.clone(),
                        int(metric.real_features_num_samples), torch.cat(kept))


def scores(reference: FeatureStats, samples: FeatureStats, subsets: int = KID_SUBSETS,
           subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> dict[str, float]:
    """FID and KID (mean, std over subsets) of `samples` against `reference`."""
    if reference.dim != samples.dim:
        raise ValueError(f"feature sizes differ: {reference.dim} vs {samples.dim}")
    fid = fid_metric(reference.dim)
    for prefix, stats in (("real", reference), ("fake", samples)):  # torchmetrics' own states
        setattr(fid, f"{prefix}_features_sum", stats.total.double())
        setattr(fid, f"{prefix}_features_cov_sum", stats.outer.double())
        setattr(fid, f"{prefix}_features_num_samples", torch.tensor(stats.count))
    fid.orig_dtype = torch.float64  # compute() casts to the dtype update() saw; we bypassed update()
    size = min(subset_size, len(reference.kid), len(samples.kid))
    with warnings.catch_warnings():  # "KID keeps all features in memory": we hand it a bounded subset
        warnings.simplefilter("ignore")
        kid = KernelInceptionDistance(feature=PrecomputedFeatures(reference.dim), subsets=subsets, subset_size=size)
    kid.update(reference.kid, real=True)
    kid.update(samples.kid, real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # KID's subsets come from the global generator
        kid_mean, kid_std = kid.compute()
    with warnings.catch_warnings():  # "compute before update": the states were loaded, not updated
        warnings.simplefilter("ignore")
        value = float(fid.compute())
    return {"fid": value, "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "kid_subsets": subsets, "kid_subset_size": size}
