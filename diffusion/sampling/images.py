"""Samples as files: uint8 pixels, PNGs that carry their generation settings, and grids."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, PngImagePlugin
from torchvision.utils import make_grid, save_image

from ..io import atomic_write


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] to uint8, exactly the values a saved PNG holds (FID scores these)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(to_uint8(image).permute(1, 2, 0).cpu().numpy())


def png_info(meta: dict[str, str]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value in meta.items():
        info.add_text(key, str(value))
    return info


def save_png(image: torch.Tensor, path: Path, meta: dict[str, str]) -> None:
    """Write one sample as PNG with its generation settings as text chunks."""
    atomic_write(path, lambda tmp: to_pil(image).save(tmp, format="PNG", pnginfo=png_info(meta)))


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> None:
    nrow = nrow or max(1, int(len(images) ** 0.5 + 0.999))
    grid = make_grid(images.float(), nrow=nrow, normalize=True, value_range=(-1, 1), padding=2)
    atomic_write(path, lambda tmp: save_image(grid, str(tmp), format="PNG"))
