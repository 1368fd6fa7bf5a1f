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


def png_text(meta: dict[str, str]) -> dict[str, str]:
    """The text chunks written for `meta`: values made printable UTF-8 (`safe_text.safe_name`; newlines
    and tabs kept), since a class or file name may hold bytes no PNG text chunk can take."""
    from ..safe_text import safe_name

    return {key: safe_name(str(value), limit=None, keep="\n\t") for key, value in meta.items()}


def png_info(meta: dict[str, str]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value in png_text(meta).items():
        info.add_text(key, value)
    return info


def save_png(image: torch.Tensor, path: Path, meta: dict[str, str]) -> None:
    """Write one sample as PNG with its generation settings as text chunks."""
    atomic_write(path, lambda tmp: to_pil(image).save(tmp, format="PNG", pnginfo=png_info(meta)))


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> None:
    nrow = nrow or max(1, int(len(images) ** 0.5 + 0.999))
    grid = make_grid(images.float(), nrow=nrow, normalize=True, value_range=(-1, 1), padding=2)
    atomic_write(path, lambda tmp: save_image(grid, str(tmp), format="PNG"))
