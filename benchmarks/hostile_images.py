"""Round 3 of the hostile-input drill, images and masks (issue #34): one reader (`data.common.read_image`)
for every image file. 16-bit pictures as --image and as training data, an EXIF-rotated photo with a mask
drawn as it is displayed, unreadable class folders and images, decompression bombs as --image, --mask,
--low-res and training data. benchmarks/hostile_cases.py appends ROUND3_IMAGES to the drill."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from benchmarks.hostile_env import Case, Env, Result, class_count, image_folder, sample_argv, train_argv
from tests.conftest import UP, tiny_config

FOLDER = ("data.name=imagefolder", "data.root={folder}/images", "train.batch_size=2")
GREY16 = 32896  # 128 * 257: reads as 128; a clipping reader made it 255


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb(path: Path, side: int = 13000) -> Path:
    """A real side x side grey PNG of zeros: 164 kB on disk for 13000, 169 MB once decoded."""
    packer = zlib.compressobj(9)
    row = b"\0" * (side + 1)
    data = b"".join([packer.compress(row) for _ in range(side)] + [packer.flush()])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))
    return path


def grey16(path: Path, size: tuple[int, int] = (16, 12), value: int = GREY16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, np.uint16)).save(path)  # a 16-bit greyscale PNG ("I;16")
    return path


def sideways(path: Path, mask: bool = False) -> Path:
    """Stored 12x16 with EXIF orientation 6 (rotate 90 clockwise to view): displayed 16x12 with its right
    half white, where {files}/mask.png (16x12, right half white) marks the region to generate."""
    stored = np.zeros((16, 12), np.uint8)
    stored[:8] = 255  # the stored top half is the displayed right half
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored if mask else np.repeat(stored[..., None], 3, -1)).save(path, exif=exif)
    return path


def upsampler(folder: Path) -> Path:
    """An untrained 8 -> 16 upsampler checkpoint (a --low-res image is read before any sampling)."""
    from diffusion.checkpoints import store as ckpt
    from diffusion.config import save_config
    from diffusion.models import Denoiser

    cfg = tiny_config(folder, *UP, "model.num_classes=12")
    target = folder / "up"
    target.mkdir(parents=True)
    ckpt.write_weights(target / ckpt.EMA_FILE, ckpt.named_weights(Denoiser(cfg.model, 16, 12)))
    save_config(cfg, target / ckpt.CONFIG_FILE)
    ckpt.write_info(target, ckpt.TrainState())
    return target


def strip_panels(folder: Path) -> list[np.ndarray] | str:
    """The three panels (input, mask overlay, result) of sample.py's strip_0000.png, as float arrays."""
    path = folder / "samples" / "strip_0000.png"
    if not path.is_file():
        return f"{path.name} was not written"
    with Image.open(path) as picture:
        strip = np.asarray(picture.convert("RGB"), float)
    side = strip.shape[0]  # square panels side by side, a gap between them
    gap = (strip.shape[1] - 3 * side) // 2
    return [strip[:, i * (side + gap): i * (side + gap) + side] for i in range(3)]


def input_grey_is(value: float) -> Callable[[Env, Path, Result], str | None]:
    def check(env: Env, folder: Path, result: Result) -> str | None:
        panels = strip_panels(folder)
        if isinstance(panels, str):
            return panels
        mean = float(panels[0].mean())
        return None if abs(mean - value) <= 4 else f"the input panel's mean is {mean:.1f}, expected {value} (not clipped)"
    return check


def upright_and_aligned(env: Env, folder: Path, result: Result) -> str | None:
    """The input panel shows the photo upright (right half white) and the mask's red tint covers that half."""
    panels = strip_panels(folder)
    if isinstance(panels, str):
        return panels
    image, overlay = panels[0], panels[1]
    half = image.shape[1] // 2
    if not (image[:, half + 2:].mean() > 200 and image[:, : half - 2].mean() < 55):
        return f"the input is not upright: left {image[:, :half].mean():.0f}, right {image[:, half:].mean():.0f}"
    tint = overlay[..., 0] - overlay[..., 1]  # red minus green: the region to generate
    if not (tint[:, half + 2:].mean() > 60 and abs(tint[:, : half - 2].mean()) < 10):
        return "the mask's region is not where the photo's white half is displayed"
    return None


def items_not_blank(env: Env, folder: Path, result: Result) -> str | None:
    """The 16-bit image folder's items hold the grey level of the files, not white."""
    from diffusion.data.imagefolder import ImageFolder

    data = ImageFolder(str(folder / "images"), 8)
    means = [float(data[i]["image"].mean()) for i in range(len(data))]
    want = GREY16 / 65535 * 2 - 1
    bad = [m for m in means if abs(m - want) > 0.03]
    return class_count(2)(env, folder, result) or (f"item means {bad}, expected {want:.3f}" if bad else None)


def sixteen_bit_folder(folder: Path) -> None:
    root = image_folder(folder, {})
    for name in ("a", "b"):
        for i in range(2):
            grey16(root / name / f"{i}.png", (8, 8))


LOCKED = "import os, sys, train\n" \
         "locked = sys.argv.pop(1)\n" \
         "real_scandir, real_access = os.scandir, os.access\n" \
         "def scandir(path='.'):\n" \
         "    if os.fspath(path) == locked: raise PermissionError(13, 'Permission denied', os.fspath(path))\n" \
         "    return real_scandir(path)\n" \
         "os.scandir = scandir\n" \
         "def access(path, mode, *args, **kw):\n" \
         "    return False if os.fspath(path) == locked else real_access(path, mode, *args, **kw)\n" \
         "os.access = access\n" \
         "sys.exit(train.main(sys.argv[1:]))\n"


def locked_train(relative: str) -> Callable[[Env, Path], list[str]]:
    """train.py on an image folder where `relative` exists but cannot be read: the drill runs as root, where
    chmod 000 does not block reads, so this process denies it as the kernel does for any other user."""
    def argv(env: Env, folder: Path) -> list[str]:
        return ["python", "-c", LOCKED, str(folder / "images" / relative), *train_argv(*FOLDER)(env, folder)[1:]]
    return argv


ROUND3_IMAGES = [
    Case("images", "16-bit greyscale --image", sample_argv("--image", "{folder}/grey16.png", "--mask", "{files}/mask.png"),
         status=0, words=None, check=input_grey_is(128), prepare=lambda env, folder: grey16(folder / "grey16.png")),
    Case("images", "16-bit image folder trains on its pixels", train_argv(*FOLDER, steps=1), status=0, words=None,
         check=items_not_blank, prepare=lambda env, folder: sixteen_bit_folder(folder), quick=False),
    Case("images", "EXIF-rotated --image, mask drawn as displayed",
         sample_argv("--image", "{folder}/photo.png", "--mask", "{files}/mask.png"), status=0, words=None,
         check=upright_and_aligned, prepare=lambda env, folder: sideways(folder / "photo.png")),
    Case("images", "EXIF-rotated --mask, upright --image",
         sample_argv("--image", "{folder}/upright.png", "--mask", "{folder}/mask.png"), status=0, words=None,
         check=upright_and_aligned, prepare=lambda env, folder: (
             sideways(folder / "mask.png", mask=True),
             Image.fromarray(np.repeat(np.asarray(Image.open(env.file("mask.png")))[..., None], 3, -1)).save(
                 folder / "upright.png"))),
    Case("images", "unreadable class folder", locked_train("b"), "images/b exists but cannot be read",
         prepare=lambda env, folder: image_folder(folder, {"a": 2, "b": 2}), quick=False),
    Case("images", "unreadable image in a class folder", locked_train("b/1.png"), "b/1.png exists but cannot be read",
         prepare=lambda env, folder: image_folder(folder, {"a": 2, "b": 2}), quick=False),
    Case("images", "13000x13000 PNG bomb (164 kB) as --image",
         sample_argv("--image", "{folder}/bomb.png", "--mask", "{files}/mask.png"), "--image",
         check=lambda env, folder, result: None if "13000x13000" in result.err else "the size is not named",
         prepare=lambda env, folder: bomb(folder / "bomb.png")),
    Case("images", "13000x13000 PNG bomb (164 kB) as --mask",
         sample_argv("--image", "{files}/image.png", "--mask", "{folder}/bomb.png"), "--mask",
         check=lambda env, folder, result: None if "13000x13000" in result.err else "the size is not named",
         prepare=lambda env, folder: bomb(folder / "bomb.png")),
    Case("images", "13000x13000 PNG bomb (164 kB) as --low-res",
         sample_argv("--low-res", "{folder}/bomb.png", checkpoint="{folder}/up"), "--low-res",
         check=lambda env, folder, result: None if "13000x13000" in result.err else "the size is not named",
         prepare=lambda env, folder: (bomb(folder / "bomb.png"), upsampler(folder))),
    Case("images", "13000x13000 PNG bomb (164 kB) in an image folder", train_argv(*FOLDER), "13000x13000",
         prepare=lambda env, folder: bomb(image_folder(folder, {"a": 3}) / "a" / "bomb.png"), quick=False),
]
