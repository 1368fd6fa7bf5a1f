"""Shared image transform and file checks for the on-disk datasets."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms

from ..errors import UserError


def image_transform(resolution: int, hflip: bool) -> transforms.Compose:
    """Resize the short side, centre-crop, optional flip, to a tensor in [-1, 1]."""
    steps = [
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(resolution),
    ]
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
    return transforms.Compose(steps)


def check_text_file(path: Path, what: str) -> None:
    """Refuse a missing file or an HTML page saved in its place (a failed download)."""
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    head = path.read_bytes()[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        raise UserError(f"{path} is an HTML page, not the {what}: download it again from the dataset's site")


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read image {path}: {err}") from None


def sample_dict(image: torch.Tensor, label: int, caption: str) -> dict:
    return {"image": image, "label": label, "caption": caption}
