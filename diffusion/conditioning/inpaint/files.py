"""Mask files, input images and in-painting pictures.

Mask convention: mask files (what users draw) are white = region to generate, black = keep, as in
diffusers and most editors; `--invert-mask` flips a file drawn the other way. Files are read by
`data.common.read_image` (EXIF orientation applied to image and mask alike; 16-bit scaled); a mask's
transparent pixels are black (keep): strokes painted opaque on a transparent layer are what counts. Internally a keep-mask
(B, 1, H, W) holds 1 = known pixel, 0 = to generate, as in GLIDE.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms

from ...data.common import image_transform, listdir, read_image, shown
from ...errors import UserError

ALMOST = 0.02  # warn when less than this fraction of the mask is black (or white)
OVERLAY_COLOUR = (1.0, -1.0, -1.0)  # red, in [-1, 1]


# -- the mask convention ------------------------------------------------------------------------

def keep_from_file_mask(white: torch.Tensor, invert: bool = False) -> torch.Tensor:
    """Keep-mask (1 = known) from a mask file's grey levels in [0, 1] (white = generate)."""
    generate = white > 0.5
    if invert:
        generate = ~generate
    return (~generate).float()


def mask_image(keep: torch.Tensor) -> Image.Image:
    """The mask file for a keep-mask (1, H, W) or (H, W): white = generate, black = keep."""
    white = (keep.reshape(keep.shape[-2:]) < 0.5).to(torch.uint8) * 255
    return Image.fromarray(white.cpu().numpy(), mode="L")


def geometry(resolution: int) -> list:
    """Resize the short side and centre-crop: the same for the image and its mask."""
    return [transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
            transforms.CenterCrop(resolution)]


def load_image(path: str | Path, resolution: int) -> torch.Tensor:
    """(1, 3, R, R) in [-1, 1], resized and centre-cropped like the training data."""
    return image_transform(resolution)(read_image(path, what="--image")).unsqueeze(0)


def mask_tensor(grey: Image.Image, resolution: int, invert: bool = False) -> torch.Tensor:
    """Keep-mask (1, 1, R, R) from a mask picture (white = generate), with the image's geometry."""
    white = transforms.Compose([*geometry(resolution), transforms.ToTensor()])(grey)
    return keep_from_file_mask(white, invert).unsqueeze(0)


def load_mask(path: str | Path, resolution: int, invert: bool = False) -> torch.Tensor:
    """Keep-mask (1, 1, R, R) from a mask file (white = generate), with the image's geometry."""
    return mask_tensor(read_image(path, "L", "--mask"), resolution, invert)


def load_image_and_mask(image_path: str | Path, mask_path: str | Path, resolution: int,
                        invert: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The image (1, 3, R, R) and its keep-mask (1, 1, R, R). A mask of another size than its image is
    refused: resized and cropped on its own, its region would move against the image."""
    image, grey = read_image(image_path, what="--image"), read_image(mask_path, "L", "--mask")
    if image.size != grey.size:
        raise UserError(f"--mask {shown(mask_path)} is {grey.size[0]}x{grey.size[1]} but --image {shown(image_path)} is "
                        f"{image.size[0]}x{image.size[1]} (as displayed, EXIF orientation applied): draw the mask "
                        "at the image's size")
    return image_transform(resolution)(image).unsqueeze(0), mask_tensor(grey, resolution, invert)


def coverage_warning(keep: torch.Tensor) -> str | None:
    """A warning when a mask leaves (almost) nothing to generate or (almost) nothing known."""
    unknown = 1.0 - float(keep.float().mean())
    if unknown > 1 - ALMOST:
        return (f"the mask is almost all white ({unknown:.0%} to generate): nearly the whole image will be "
                "generated; white marks the region to generate, pass --invert-mask if yours marks what to keep")
    if unknown < ALMOST:
        return (f"the mask is almost all black ({unknown:.1%} to generate): the result will be nearly the input; "
                "white marks the region to generate, pass --invert-mask if yours marks what to keep")
    return None


def warn_coverage(keep: torch.Tensor) -> None:
    message = coverage_warning(keep)
    if message:
        print(f"warning: {message}", file=sys.stderr)


def load_image_folder(folder: str | Path, resolution: int, limit: int | None = None) -> tuple[torch.Tensor, list[Path]]:
    """The first `limit` images of a folder (sorted by name), as (N, 3, R, R) in [-1, 1]. A folder that
    cannot be read is a UserError (listdir), as is any image in it that cannot (read_image)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder not found: {shown(folder)}")
    files = sorted(Path(e.path) for e in listdir(folder, "image folder")
                   if Path(e.name).suffix.lower() in IMG_EXTENSIONS)[:limit]
    if not files:
        raise UserError(f"no images ({', '.join(IMG_EXTENSIONS)}) in {shown(folder)}")
    return torch.cat([load_image(f, resolution) for f in files]), files


# -- pictures -----------------------------------------------------------------------------------

def overlay(image: torch.Tensor, keep: torch.Tensor, alpha: float = 0.55) -> torch.Tensor:
    """The image with the region to generate tinted red: (3, H, W) in [-1, 1]."""
    colour = torch.tensor(OVERLAY_COLOUR, dtype=image.dtype, device=image.device).view(3, 1, 1)
    tinted = (1 - alpha) * image + alpha * colour
    return torch.where(keep.reshape(1, *image.shape[-2:]).to(image.device) > 0.5, image, tinted)


def strip(image: torch.Tensor, keep: torch.Tensor, result: torch.Tensor, pad: int = 1) -> torch.Tensor:
    """input | mask overlay | result, side by side: (3, H, 3W + 2 pad) in [-1, 1]."""
    gap = torch.ones(3, image.shape[-2], pad, dtype=image.dtype)
    parts = [image.reshape(3, *image.shape[-2:]).cpu(), overlay(image.reshape(3, *image.shape[-2:]), keep).cpu(),
             result.cpu().to(image.dtype)]
    return torch.cat([parts[0], gap, parts[1], gap, parts[2]], dim=-1)


def upscale(image: torch.Tensor, min_height: int = 128) -> torch.Tensor:
    """Nearest-neighbour enlargement of a small (3, H, W) picture, so 16-64 px images stay visible."""
    factor = max(1, min_height // image.shape[-2])
    return image.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
