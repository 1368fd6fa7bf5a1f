"""Shared image transform and file checks for the on-disk datasets."""
from __future__ import annotations

import random
import struct
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms

from ..errors import UserError, first_line


def image_transform(resolution: int) -> transforms.Compose:
    """Resize the short side, centre-crop, to a tensor in [-1, 1]. The training flip is drawn per item
    (`items.random_hflip`), so it is not a transform here."""
    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(resolution),
        transforms.ToTensor(),
        transforms.Normalize([0.5] * 3, [0.5] * 3),
    ])


def check_text_file(path: Path, what: str) -> None:
    """Refuse a missing file or an HTML page saved in its place (a failed download)."""
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    head = path.read_bytes()[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        raise UserError(f"{path} is an HTML page, not the {what}: download it again from the dataset's site")


# What PIL raises for a file that is not an image it can decode: damaged, truncated, foreign, or a
# "decompression bomb" (a header claiming more than Image.MAX_IMAGE_PIXELS * 2 pixels).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


def read_image(path: str | Path, mode: str = "RGB", what: str = "image") -> Image.Image:
    """The image file `path` converted to `mode`, or a one-line UserError naming the file. Only regular
    files are opened: a FIFO named like an image would block the read forever."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} is not a regular file" if path.exists() else f"{what} not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except IMAGE_ERRORS as err:
        raise UserError(f"cannot read {what} {path}: {first_line(err)}") from None


def load_rgb(path: Path) -> Image.Image:
    return read_image(path)


def sample_dict(image: torch.Tensor, label: int, caption: str) -> dict:
    return {"image": image, "label": label, "caption": caption}


# CLIP-style caption templates: varied wording around a class name, so caption models learn the
# class word rather than one fixed sentence.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of {a} {name}", "a blurry photo of {a} {name}", "a close-up photo of {a} {name}",
    "a bright photo of {a} {name}", "a dark photo of {a} {name}", "a cropped photo of {a} {name}",
    "a low resolution photo of {a} {name}", "a good photo of {a} {name}", "a photo of the {name}",
    "a photo of a small {name}", "a photo of a large {name}", "{a} {name}", "an image of {a} {name}",
)


def template_caption(name: str, rng: random.Random | None = None) -> str:
    """A caption for a class name from a random template ("a blurry photo of a cat", "an airplane");
    datasets pass their item's generator, so the choice is a function of (seed, epoch, index)."""
    template = (rng or random).choice(CAPTION_TEMPLATES)
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return template.format(a=article, name=name.replace("_", " "))
