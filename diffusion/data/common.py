"""Shared image transform and file checks for the on-disk datasets."""
from __future__ import annotations

import contextlib
import os
import random
import re
import struct
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import transforms

from ..errors import UserError, first_line
from ..safe_text import safe_name


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
        raise UserError(f"{what} not found: {shown(path)}")
    try:
        with path.open("rb") as file:
            head = file.read(512).lstrip().lower()
    except PermissionError:
        raise unreadable(what, path) from None
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        raise UserError(f"{path} is an HTML page, not the {what}: download it again from the dataset's site")


# What PIL raises for a file that is not an image it can decode: damaged, truncated, foreign, or a
# "decompression bomb" (a header claiming more than Image.MAX_IMAGE_PIXELS * 2 pixels).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)

MAX_PIXELS = 64_000_000  # width x height read from an image's header; larger images are refused before decoding
IMAGE_BACKGROUND = 255  # images: transparent pixels are composited on white (as viewers show them)
MASK_BACKGROUND = 0  # masks: transparent pixels are black (keep); what is painted opaque counts
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def shown(path: str | Path) -> str:
    """A path as it may appear in a one-line message or a log (see `safe_text.safe_name`)."""
    return safe_name(str(path), limit=400)


def unreadable(what: str, path: str | Path) -> UserError:
    """The error for a file or folder that exists but cannot be read (permissions)."""
    return UserError(f"{what} {shown(path)} exists but cannot be read (permission denied): make it readable "
                     f"(chmod -R a+rX) or remove it")


def listdir(folder: Path, what: str = "folder") -> list[os.DirEntry]:
    """The entries of `folder`; a folder that cannot be read is a UserError, never an empty folder."""
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except PermissionError:
        raise unreadable(what, folder) from None
    except FileNotFoundError:
        raise UserError(f"{what} not found: {shown(folder)}") from None
    except NotADirectoryError:
        raise UserError(f"{what} {shown(folder)} is not a folder") from None


def check_readable(path: Path, what: str = "image") -> None:
    """Refuse a file that exists but cannot be read, at listing time (not halfway through training)."""
    if not os.access(path, os.R_OK):
        raise unreadable(what, path)


@contextlib.contextmanager
def open_image(path: str | Path, what: str = "image") -> Iterator[Image.Image]:
    """The image file `path` opened (its header read, nothing decoded), or a one-line UserError naming
    it: missing, not a regular file (a FIFO named like an image would block forever), unreadable, not an
    image, or more than MAX_PIXELS pixels (a decompression bomb: a 13000x13000 PNG is 164 kB)."""
    path = Path(path)
    if not path.is_file():
        found = path.exists()
        raise UserError(f"{what} {shown(path)} is not a regular file" if found else f"{what} not found: {shown(path)}")
    try:
        file = open(path, "rb")
    except PermissionError:
        raise unreadable(what, path) from None
    except OSError as err:
        raise UserError(f"cannot read {what} {shown(path)}: {first_line(err)}") from None
    with file:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(file)
        except Image.DecompressionBombError as err:  # PIL's own limit (2 x Image.MAX_IMAGE_PIXELS)
            pixels = re.search(r"\((\d+) pixels\)", str(err))
            raise UserError(f"{what} {shown(path)} has {pixels.group(1) if pixels else 'too many'} pixels, over the "
                            f"limit of {MAX_PIXELS}: scale it down first") from None
        except UnidentifiedImageError:
            raise UserError(f"cannot read {what} {shown(path)}: not an image PIL can read (PNG, JPEG, TIFF, WebP, "
                            "...): give an image file") from None
        except IMAGE_ERRORS as err:
            raise UserError(f"cannot read {what} {shown(path)}: {first_line(err)}") from None
        with img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise UserError(f"{what} {shown(path)} is {width}x{height} = {width * height} pixels, over the limit "
                                f"of {MAX_PIXELS} (MAX_PIXELS): scale it down first")
            yield img


def _sixteen_to_8bit(img: Image.Image, path: Path, what: str) -> Image.Image:
    """An "I;16*", "I" (read as 16-bit, 0..65535, as PNG and TIFF hold it) or "F" (read as 0..1) image
    as "L", scaled (v * 255 / 65535, rounded), not clipped as PIL's convert would (to white)."""
    values = np.asarray(img)
    if img.mode == "F":
        if not np.isfinite(values).all() or values.min(initial=0) < 0 or values.max(initial=0) > 1:
            raise UserError(f"{what} {shown(path)} holds floating-point pixels outside 0..1: save it as an 8- or "
                            "16-bit image")
        return Image.fromarray(np.rint(values * 255).astype(np.uint8))
    if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
        raise UserError(f"{what} {shown(path)} holds 32-bit pixel values outside 0..65535: save it as an 8- or "
                        "16-bit image")
    grey = Image.fromarray(np.rint(values.astype(np.float64) / 257).astype(np.uint8))
    if "transparency" in img.info and isinstance(img.info["transparency"], int):  # tRNS: one grey level
        grey.putalpha(Image.fromarray(((values != img.info["transparency"]) * 255).astype(np.uint8)))
    return grey


def _decode(img: Image.Image, mode: str, path: Path, what: str) -> Image.Image:
    """The opened image upright (EXIF/XMP orientation applied) and in `mode`, transparency composited."""
    upright = ImageOps.exif_transpose(img)
    if upright.mode in (*SIXTEEN_BIT, "I", "F"):
        upright = _sixteen_to_8bit(upright, path, what)
    has_alpha = "A" in upright.getbands() or "a" in upright.getbands() or "transparency" in upright.info
    if not has_alpha:
        return upright.convert(mode)
    rgba = upright.convert("RGBA")
    background = IMAGE_BACKGROUND if mode == "RGB" else MASK_BACKGROUND
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (background,) * 3 + (255,)), rgba).convert(mode)


def read_image(path: str | Path, mode: str = "RGB", what: str = "image") -> Image.Image:
    """The image file `path` as it is displayed, in `mode` ("RGB" for images, "L" for masks), or a
    one-line UserError naming the file. The one reader of every image file (CLIs, datasets, demo,
    evaluation), so that every PIL mode and file means the same thing everywhere:

    - orientation: the EXIF (or XMP) orientation tag is applied, so pixels are where a viewer shows them;
    - 16-bit ("I;16", PNG/TIFF) and 32-bit integer ("I") pixels are 0..65535, scaled to 8 bits
      (v * 255 / 65535, rounded); float ("F") pixels are 0..1; values outside those ranges are refused.
      PIL itself reads 16-bit colour and grey+alpha PNGs as 8-bit, keeping each value's high byte
      (within 1 of the scaled value);
    - transparency (alpha, a palette's or a tRNS colour) is composited: images on white
      (IMAGE_BACKGROUND), masks on black (MASK_BACKGROUND), so on a mask what is painted opaque
      counts and what is transparent is keep (black); a partly transparent stroke is a grey level;
    - 1, L, P, CMYK, YCbCr, LAB, HSV ... convert with PIL's conversions; the first frame of an animation;
    - at most MAX_PIXELS pixels, checked from the header before anything is decoded.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"read_image makes RGB or L images, not {mode}")
    path = Path(path)
    with open_image(path, what) as img:
        try:
            return _decode(img, mode, path, what)
        except PermissionError:
            raise unreadable(what, path) from None
        except IMAGE_ERRORS as err:
            raise UserError(f"cannot read {what} {shown(path)}: {first_line(err)}") from None


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
