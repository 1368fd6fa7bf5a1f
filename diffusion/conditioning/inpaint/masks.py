"""Random masks for training in-painting models, and seeded ones for demos and evaluation.

Generators return hole masks (N, 1, R, R), 1 = pixel to generate; `training_keep_masks` mixes the
types as `cfg.inpaint` says and returns keep-masks (1 = known), the internal convention. All draws
come from one torch generator on the CPU (the global one in training, which the trainer seeds),
so a mask is reproducible from its seed.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from ...config import InpaintConfig
from ...config_checks import MASK_TYPES, check_inpaint as check_mask_config  # noqa: F401 - re-exported
from ...errors import UserError

MaskFn = Callable[[int, int, InpaintConfig, "torch.Generator | None"], torch.Tensor]


def _uniform(shape: tuple[int, ...], lo: float, hi: float, gen: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen)


def _grid(resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in [0, 1], each (1, R, R): (y, x)."""
    c = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution
    return c.view(1, -1, 1).expand(1, resolution, resolution), c.view(1, 1, -1).expand(1, resolution, resolution)


def box_holes(n: int, resolution: int, cfg: InpaintConfig, gen: torch.Generator | None = None) -> torch.Tensor:
    """1 to `max_boxes` rectangles, each side a `box_size` fraction of the image side."""
    lo, hi = cfg.box_size
    count = torch.randint(1, cfg.max_boxes + 1, (n, 1), generator=gen)
    size = _uniform((n, cfg.max_boxes, 2), lo, hi, gen)  # (h, w)
    corner = torch.rand((n, cfg.max_boxes, 2), generator=gen) * (1 - size)
    y, x = _grid(resolution)
    y, x = y.unsqueeze(1), x.unsqueeze(1)  # (1, 1, R, R)
    top, left = corner[..., 0, None, None], corner[..., 1, None, None]
    h, w = size[..., 0, None, None], size[..., 1, None, None]
    inside = (y >= top) & (y < top + h) & (x >= left) & (x < left + w)  # (n, boxes, R, R)
    active = (torch.arange(cfg.max_boxes).view(1, -1) < count).view(n, cfg.max_boxes, 1, 1)
    return (inside & active).any(1, keepdim=True).float()


def stroke_holes(n: int, resolution: int, cfg: InpaintConfig, gen: torch.Generator | None = None) -> torch.Tensor:
    """1 to `max_strokes` free-form brush strokes: random walks of thick, round-jointed lines."""
    strokes, vertices = cfg.max_strokes, cfg.stroke_vertices
    count = torch.randint(1, strokes + 1, (n,), generator=gen)
    start = torch.rand((n, strokes, 1, 2), generator=gen)
    angle = _uniform((n, strokes, vertices, 1), 0.0, 2 * math.pi, gen)
    length = _uniform((n, strokes, vertices, 1), 0.1, 0.3, gen)
    steps = torch.cat([torch.cos(angle), torch.sin(angle)], -1) * length
    points = (torch.cat([start, start + steps.cumsum(2)], 2).clamp(0, 1) * resolution).tolist()  # (x, y) pixels
    widths = (_uniform((n, strokes), *cfg.stroke_width, gen) * resolution).clamp_min(1).tolist()
    holes = torch.zeros(n, 1, resolution, resolution)
    for i in range(n):
        canvas = Image.new("L", (resolution, resolution), 0)
        draw = ImageDraw.Draw(canvas)
        for k in range(int(count[i])):
            line, width = [tuple(p) for p in points[i][k]], widths[i][k]
            draw.line(line, fill=255, width=round(width), joint="curve")
            for x, y in (line[0], line[-1]):  # round caps
                draw.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=255)
        holes[i, 0] = torch.from_numpy(np.asarray(canvas) > 127)
    return holes


def half_holes(n: int, resolution: int, cfg: InpaintConfig, gen: torch.Generator | None = None) -> torch.Tensor:
    """The left, right, top or bottom half of the image."""
    side = torch.randint(0, 4, (n,), generator=gen)
    y, x = _grid(resolution)
    halves = torch.stack([x < 0.5, x >= 0.5, y < 0.5, y >= 0.5]).squeeze(1)  # (4, R, R)
    return halves[side].unsqueeze(1).float()


def border_holes(n: int, resolution: int, cfg: InpaintConfig, gen: torch.Generator | None = None) -> torch.Tensor:
    """Out-painting: a frame of unknown pixels, each side `border_size` wide, around a known centre."""
    width = _uniform((n, 4, 1, 1), *cfg.border_size, gen)  # top, bottom, left, right
    y, x = _grid(resolution)
    frame = (y < width[:, 0]) | (y >= 1 - width[:, 1]) | (x < width[:, 2]) | (x >= 1 - width[:, 3])
    return frame.unsqueeze(1).float()


HOLES: dict[str, MaskFn] = {"box": box_holes, "strokes": stroke_holes, "half": half_holes, "border": border_holes}


def training_keep_masks(n: int, resolution: int, cfg: InpaintConfig, gen: torch.Generator | None = None) -> torch.Tensor:
    """Keep-masks (n, 1, R, R), 1 = known: all-known, all-unknown, or one weighted mask type each.
    `cfg` must have passed `check_mask_config` (done once, when the training data is set up)."""
    u = torch.rand((n,), generator=gen)
    weights = torch.tensor([getattr(cfg, kind) for kind in MASK_TYPES], dtype=torch.float32)
    kind = torch.multinomial(weights, n, replacement=True, generator=gen)
    holes = torch.zeros(n, 1, resolution, resolution)
    for k, name in enumerate(MASK_TYPES):
        index = (kind == k).nonzero().flatten()
        if len(index):
            holes[index] = HOLES[name](len(index), resolution, cfg, gen)
    holes[u < cfg.all_known] = 0.0
    holes[(u >= cfg.all_known) & (u < cfg.all_known + cfg.all_unknown)] = 1.0
    return 1.0 - holes


def seeded_keep_mask(kind: str, resolution: int, seed: int, cfg: InpaintConfig | None = None) -> torch.Tensor:
    """One keep-mask (1, 1, R, R) of a given type, reproducible from `seed` (demos, evaluation)."""
    if kind not in HOLES:
        raise UserError(f"unknown mask type '{kind}': choose from {', '.join(MASK_TYPES)}")
    gen = torch.Generator().manual_seed(int(seed))
    return 1.0 - HOLES[kind](1, resolution, cfg or InpaintConfig(), gen)


def seeded_mask_grid(kinds: list[str], num_images: int, resolution: int, seed: int) -> torch.Tensor:
    """Keep-masks (num_images * len(kinds), 1, R, R): every kind for image 0, then image 1, ...

    Mask j is drawn from seed + j, so a demo and an evaluation with the same seed use the same masks.
    """
    kinds_per_image = [kind for _ in range(num_images) for kind in kinds]
    return torch.cat([seeded_keep_mask(kind, resolution, seed + j) for j, kind in enumerate(kinds_per_image)])
