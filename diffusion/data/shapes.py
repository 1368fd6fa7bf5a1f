"""A procedural dataset of coloured shapes, and a pixel-reading detector that scores samples.

Needs no download, is deterministic for a seed, and renders at any resolution. Each image is
one shape on a black background; the class is (shape, colour), the caption says it in words.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image, ImageDraw

from .items import ItemRandom, random_hflip

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 230),
    "yellow": (230, 210, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 0.45, "large": 0.7}  # side length as a fraction of the image
COLOUR_NAMES = tuple(COLOURS)
CLASS_NAMES: tuple[str, ...] = tuple(f"{c} {s}" for s in SHAPES for c in COLOUR_NAMES)
SUPERSAMPLE = 4


def class_index(colour: str, shape: str) -> int:
    return SHAPES.index(shape) * len(COLOURS) + COLOUR_NAMES.index(colour)


def class_attributes(label: int) -> tuple[str, str]:
    """(colour, shape) of a class index."""
    return COLOUR_NAMES[label % len(COLOURS)], SHAPES[label // len(COLOURS)]


def sample_attributes(seed: int, index: int) -> dict:
    rng = random.Random(seed * 1_000_003 + index)
    return {
        "colour": rng.choice(COLOUR_NAMES),
        "shape": rng.choice(SHAPES),
        "size": rng.choice(tuple(SIZES)),
        "dx": rng.uniform(-0.12, 0.12),
        "dy": rng.uniform(-0.12, 0.12),
        "say_size": rng.random() < 0.5,  # drawn last: the image attributes above do not change
    }


def caption(attrs: dict) -> str:
    """The exact caption, e.g. "a small red circle"; half of the images leave the size out, so a
    prompt without a size word ("a red circle") is a caption the model has seen."""
    size = f"{attrs['size']} " if attrs.get("say_size", True) else ""
    return f"a {size}{attrs['colour']} {attrs['shape']}"


def render(attrs: dict, resolution: int) -> np.ndarray:
    """Draw one shape, supersampled and downscaled for smooth edges; returns HxWx3 uint8."""
    big = resolution * SUPERSAMPLE
    img = Image.new("RGB", (big, big), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    side = SIZES[attrs["size"]] * big
    cx, cy = big * (0.5 + attrs["dx"]), big * (0.5 + attrs["dy"])
    x0, y0, x1, y1 = cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2
    fill = COLOURS[attrs["colour"]]
    if attrs["shape"] == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif attrs["shape"] == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return np.array(img, dtype=np.uint8)


class ShapesDataset(torch.utils.data.Dataset):
    """`size` procedural images; the test split uses a different seed stream than train."""

    class_names = CLASS_NAMES
    num_classes = len(CLASS_NAMES)

    def __init__(self, resolution: int = 32, size: int = 10000, seed: int = 0, split: str = "train",
                 hflip: bool = False):
        self.resolution, self.hflip = resolution, hflip  # a mirrored shape keeps its class and caption
        self.size = size
        self.seed = seed if split == "train" else seed + 7919
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.size

    def attributes(self, index: int) -> dict:
        return sample_attributes(self.seed, index)

    def __getitem__(self, index: int) -> dict:
        return self.item(index, ItemRandom.of(0, 0, index))

    def item(self, index: int, rng: ItemRandom) -> dict:
        """Item `index`, its flip (data.hflip) drawn from `rng`."""
        attrs = self.attributes(index)
        pixels = self._cache.get(index)
        if pixels is None:
            pixels = self._cache[index] = render(attrs, self.resolution)
        image = random_hflip(torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0, self.hflip, rng)
        return {
            "image": image,
            "label": class_index(attrs["colour"], attrs["shape"]),
            "caption": caption(attrs),
        }


def detect(image: torch.Tensor) -> tuple[str | None, str | None]:
    """Read (colour, shape) straight from the pixels of one image in [-1, 1], shape (3, H, W).

    The shape is drawn in a saturated colour on black: foreground = bright pixels. Its colour is
    the nearest palette entry to their mean; its shape comes from how much of its bounding box it
    fills (square 1.0, circle pi/4, triangle 0.5). Returns None where nothing is readable.
    """
    rgb = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).numpy()
    brightness = rgb.max(axis=0)
    peak = np.percentile(brightness, 99.5)
    if peak < 100:
        return None, None
    coverage = np.clip(brightness / peak, 0, 1)
    coverage[coverage < 0.1] = 0
    fg = coverage > 0.5
    if fg.sum() < max(4, fg.size * 0.01):
        return None, None
    mean = rgb[:, fg].mean(axis=1)
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    colour = COLOUR_NAMES[int(np.argmin(((palette - mean) ** 2).sum(axis=1)))]
    # Soft extents, measured in the foreground's bounding box plus a 1-pixel rim: partial edge
    # pixels count by how much of them the shape covers, and faint noise elsewhere does not.
    rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
    box = coverage[max(rows[0] - 1, 0):rows[-1] + 2, max(cols[0] - 1, 0):cols[-1] + 2]
    width, height = box.max(axis=0).sum(), box.max(axis=1).sum()
    fill = box.sum() / (width * height)
    shape = "triangle" if fill < 0.64 else "circle" if fill < 0.89 else "square"
    return colour, shape


def detect_label(image: torch.Tensor) -> int:
    """Class index read from the pixels, or -1 if nothing is readable."""
    colour, shape = detect(image)
    return -1 if colour is None or shape is None else class_index(colour, shape)
