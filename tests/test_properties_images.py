"""The one image reader (`data.common.read_image`) against expectations computed here, independently:
every PIL mode and file format a user may hand over, odd sizes, EXIF orientations 1-8, alpha, 8 and
16 bits; unreadable files and folders, decompression bombs; file-system names written into PNG
metadata, JSON and logs."""
from __future__ import annotations

import builtins
import io
import json
import os
import struct
import time
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from diffusion.data.common import MAX_PIXELS, read_image
from diffusion.data.imagefolder import ImageFolder
from diffusion.errors import UserError
from diffusion.safe_text import NAME_LIMIT, safe_name

TMP = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)


# -- independent expectations -------------------------------------------------------------------------------

def displayed(raw: np.ndarray, orientation: int) -> np.ndarray:
    """What a viewer shows for `raw` (H, W, ...) tagged with EXIF `orientation`, from the EXIF table
    (where the stored 0th row and 0th column go): 1 top/left 2 top/right 3 bottom/right 4 bottom/left
    5 left/top 6 right/top 7 right/bottom 8 left/bottom."""
    h, w = raw.shape[:2]
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    swap = orientation >= 5
    out = np.zeros((w, h, *raw.shape[2:]) if swap else raw.shape, raw.dtype)
    oh, ow = out.shape[:2]
    y, x = {1: (rows, cols), 2: (rows, ow - 1 - cols), 3: (oh - 1 - rows, ow - 1 - cols),
            4: (oh - 1 - rows, cols), 5: (cols, rows), 6: (cols, ow - 1 - rows), 7: (oh - 1 - cols, ow - 1 - rows),
            8: (oh - 1 - cols, rows)}[orientation]
    out[y, x] = raw[rows, cols]
    return out


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, the grey level of a colour mask pixel."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def composite(rgb: np.ndarray, alpha: np.ndarray, background: float) -> np.ndarray:
    a = alpha[..., None] / 255.0
    return rgb * a + background * (1 - a)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png16(array: np.ndarray, exif: bytes | None = None) -> bytes:
    """A 16-bit PNG of uint16 (H, W, C): C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA (PIL cannot write these)."""
    h, w, c = array.shape
    raw = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(h))
    head = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0))
    return (b"\x89PNG\r\n\x1a\n" + head + (chunk(b"eXIf", exif) if exif else b"") + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


# -- every mode, size, orientation and format ----------------------------------------------------------------

# (mode, formats that store it losslessly): a random raw image of the mode is saved, tagged, read back.
MODES = {
    "1": ("PNG", "TIFF", "BMP"), "L": ("PNG", "TIFF", "BMP", "WEBP"), "LA": ("PNG", "TIFF"), "P": ("PNG", "BMP", "GIF"),
    "P+transparency": ("PNG", "GIF"), "P+alpha palette": ("PNG",), "RGB": ("PNG", "TIFF", "BMP", "WEBP"),
    "RGBA": ("PNG", "TIFF", "WEBP"),
    "CMYK": ("TIFF",), "YCbCr": ("TIFF",), "LAB": ("TIFF",), "I;16": ("PNG", "TIFF"), "I": ("TIFF",),
    "F": ("TIFF",), "16-bit RGB": ("PNG",), "16-bit RGBA": ("PNG",), "16-bit LA": ("PNG",),
}


@st.composite
def images(draw):
    mode = draw(st.sampled_from(sorted(MODES)))
    fmt = draw(st.sampled_from(MODES[mode]))
    shape = draw(st.sampled_from(["square", "1x1", "1xN", "Nx1", "wide", "any"]))
    n = draw(st.integers(2, 40))
    w, h = {"square": (n, n), "1x1": (1, 1), "1xN": (1, n), "Nx1": (n, 1), "wide": (n * 7, 2)}.get(
        shape, (draw(st.integers(1, 24)), draw(st.integers(1, 24))))
    orientation = draw(st.integers(1, 8)) if fmt in ("PNG", "WEBP", "TIFF") or mode.startswith("16") else 1
    seed = draw(st.integers(0, 2**32 - 1))
    return mode, fmt, w, h, orientation, seed


def make(mode: str, w: int, h: int, rng: np.random.Generator) -> tuple[Image.Image | np.ndarray, np.ndarray, np.ndarray]:
    """(the raw image or a uint16 array, its expected RGB on white, its expected mask grey on black):
    expectations before orientation, float arrays (H, W, 3) and (H, W)."""
    u8 = lambda *shape: rng.integers(0, 256, (h, w, *shape), dtype=np.uint8)  # noqa: E731
    if mode.startswith("16-bit"):
        c = {"16-bit RGB": 3, "16-bit RGBA": 4, "16-bit LA": 2}[mode]
        arr = rng.integers(0, 65536, (h, w, c), dtype=np.uint16)
        v = arr / 257.0
        rgb = v[..., :3] if c >= 3 else np.repeat(v[..., :1], 3, -1)
        alpha = v[..., -1] if c in (2, 4) else np.full((h, w), 255.0)
        return arr, composite(rgb, alpha, 255), luma(composite(rgb, alpha, 0))
    if mode in ("1", "L"):
        grey = u8() if mode == "L" else rng.integers(0, 2, (h, w), dtype=np.uint8) * 255
        img = Image.fromarray(grey, "L").convert(mode)
        g = grey.astype(float)
        return img, np.repeat(g[..., None], 3, -1), g
    if mode == "LA":
        la = u8(2)
        g, a = la[..., 0].astype(float), la[..., 1].astype(float)
        rgb = np.repeat(g[..., None], 3, -1)
        return Image.fromarray(la, "LA"), composite(rgb, a, 255), composite(rgb, a, 0)[..., 0]
    if mode.startswith("P"):
        palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
        index = rng.integers(0, 256, (h, w), dtype=np.uint8)
        img = Image.fromarray(index, "P")
        img.putpalette(palette.tobytes())
        rgb = palette[index].astype(float)
        alpha = np.full((h, w), 255.0)
        if mode == "P+transparency":
            clear = int(index[0, 0])
            img.info["transparency"] = clear
            alpha = np.where(index == clear, 0.0, 255.0)
        if mode == "P+alpha palette":  # a tRNS chunk with one alpha per palette entry
            alphas = rng.integers(0, 256, 256, dtype=np.uint8)
            img.info["transparency"] = alphas.tobytes()
            alpha = alphas[index].astype(float)
        return img, composite(rgb, alpha, 255), luma(composite(rgb, alpha, 0))
    if mode in ("RGB", "RGBA"):
        arr = u8(len(mode))
        alpha = arr[..., 3].astype(float) if mode == "RGBA" else np.full((h, w), 255.0)
        rgb = arr[..., :3].astype(float)
        return Image.fromarray(arr, mode), composite(rgb, alpha, 255), luma(composite(rgb, alpha, 0))
    if mode in ("CMYK", "YCbCr", "LAB"):  # colour spaces: PIL's own conversion of the upright pixels
        img = Image.frombytes(mode, (w, h), u8(len(mode)).tobytes())
        rgb = np.asarray(img.convert("RGB"), float)
        return img, rgb, luma(rgb)
    if mode in ("I;16", "I"):
        v = rng.integers(0, 65536, (h, w)).astype(np.uint16)
        img = Image.fromarray(v) if mode == "I;16" else Image.fromarray(v.astype(np.int32))
        g = v / 257.0
        return img, np.repeat(g[..., None], 3, -1), g
    v = rng.random((h, w), dtype=np.float32)  # F: 0..1
    g = v.astype(float) * 255
    return Image.fromarray(v), np.repeat(g[..., None], 3, -1), g


def save(source, fmt: str, orientation: int, path: Path) -> None:
    if isinstance(source, np.ndarray):
        path.write_bytes(png16(source, exif_bytes(orientation) if orientation != 1 else None))
        return
    options = {"lossless": True, "exact": True} if fmt == "WEBP" else {}
    if orientation != 1:
        options["exif"] = exif_bytes(orientation)
    if "transparency" in source.info:
        options["transparency"] = source.info["transparency"]
    source.save(path, format=fmt, **options)


@TMP
@given(images())
def test_every_mode_reads_upright_in_range_and_as_computed(tmp_path, case):
    """RGB on white and L (mask) on black, of the displayed size, equal to the expectation computed
    here from the raw pixels (16-bit scaled, alpha composited, EXIF orientation applied)."""
    mode, fmt, w, h, orientation, seed = case
    rng = np.random.default_rng(seed)
    source, rgb, grey = make(mode, w, h, rng)
    path = tmp_path / f"{mode.replace(';', '_').replace(' ', '_')}.{fmt.lower()}"
    save(source, fmt, orientation, path)
    try:
        with Image.open(path) as probe:  # PIL cannot read back some files it writes (YCbCr TIFF at some sizes)
            probe.load()
    except OSError:
        with pytest.raises(UserError, match=f"cannot read image .*{path.name}"):
            read_image(path)
        return
    image, mask = read_image(path), read_image(path, "L", "--mask")
    size = (h, w) if orientation >= 5 else (w, h)
    assert image.mode == "RGB" and mask.mode == "L" and image.size == mask.size == size
    got, got_mask = np.asarray(image, float), np.asarray(mask, float)
    want, want_mask = displayed(rgb, orientation), displayed(grey, orientation)
    # PIL reads 16-bit colour and alpha PNGs as their high bytes (each within 1 of v / 257): a composite of
    # the two is within 2.5 of the exact one
    tolerance = 2.51 if mode.startswith("16-bit") else 1.01
    assert np.abs(got - want).max() <= tolerance, (mode, fmt, orientation)
    assert np.abs(got_mask - want_mask).max() <= tolerance + 1, (mode, fmt, orientation)


@TMP
@given(st.integers(1, 8), st.sampled_from(["JPEG", "PNG", "WEBP"]))
def test_exif_rotated_photo_equals_the_upright_original(tmp_path, orientation, fmt):
    """A photo stored sideways with an orientation tag reads as the upright original: a marker block
    lands where the viewer shows it (JPEG: 8x8 blocks, so compression keeps them)."""
    upright = np.zeros((24, 40), np.uint8)
    upright[0:8, 32:40] = 255  # marker: top-right
    inverse = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 8, 7: 7, 8: 6}[orientation]  # stored = displayed(upright, inverse)
    raw = displayed(upright, inverse)
    assert np.array_equal(displayed(raw, orientation), upright)
    path = tmp_path / f"photo.{fmt.lower()}"
    Image.fromarray(np.repeat(raw[..., None], 3, -1)).save(path, format=fmt, exif=exif_bytes(orientation), quality=95)
    got = np.asarray(read_image(path, "L"), float)
    assert got.shape == upright.shape
    assert np.abs(got - upright).mean() < 8 and got[0:8, 32:40].mean() > 200 and got[16:, :8].mean() < 50


def test_sixteen_bit_scales_rather_than_clips(tmp_path):
    """A 16-bit grey gradient (PNG and TIFF, as "I;16") and 16-bit RGB read as v * 255 / 65535, not white."""
    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    Image.fromarray(ramp).save(tmp_path / "g.png")
    Image.fromarray(ramp).save(tmp_path / "g.tif")
    (tmp_path / "c.png").write_bytes(png16(np.stack([ramp, ramp[::-1], np.full_like(ramp, 32896)], -1)))
    for name in ("g.png", "g.tif", "c.png"):
        got = np.asarray(read_image(tmp_path / name), float)[..., 0]
        assert np.abs(got - ramp / 257).max() <= 1, name
        assert 120 < got.mean() < 135, name  # a clipped read is almost all 255


def test_alpha_rules_for_images_and_masks(tmp_path):
    """Transparent pixels: white in an image, black (keep) in a mask; an opaque stroke counts."""
    layer = np.zeros((4, 4, 4), np.uint8)
    layer[:, 2:] = (255, 255, 255, 255)  # a white stroke on a transparent layer
    Image.fromarray(layer, "RGBA").save(tmp_path / "layer.png")
    assert np.asarray(read_image(tmp_path / "layer.png")).min() == 255
    mask = np.asarray(read_image(tmp_path / "layer.png", "L"))
    assert (mask[:, :2] == 0).all() and (mask[:, 2:] == 255).all()


def test_float_and_32_bit_images_out_of_range_are_refused(tmp_path):
    Image.fromarray(np.full((2, 2), 7.5, np.float32)).save(tmp_path / "f.tif")
    Image.fromarray(np.full((2, 2), 70000, np.int32)).save(tmp_path / "i.tif")
    for name in ("f.tif", "i.tif"):
        with pytest.raises(UserError, match=f"{name} holds .* outside"):
            read_image(tmp_path / name)


# -- training data: a 16-bit image folder -------------------------------------------------------------------

def test_sixteen_bit_image_folder_trains_on_its_pixels(tmp_path):
    """Items of an ImageFolder of 16-bit PNGs hold the pictures (a clipped read made them all white)."""
    for label, value in (("dark", 8000), ("mid", 30000)):
        (tmp_path / label).mkdir()
        for i in range(2):
            ramp = (np.linspace(0, 1, 64).reshape(8, 8) * value + 1000 * i).astype(np.uint16)
            Image.fromarray(ramp).save(tmp_path / label / f"{i}.png")
    data = ImageFolder(str(tmp_path), 8)
    assert data.class_names == ("dark", "mid")
    for index in range(len(data)):
        item = data[index]["image"]
        value = 8000 if data.samples[index][1] == 0 else 30000
        assert item.shape == (3, 8, 8) and float(item.max()) < 0.99 and float(item.std()) > 0.01
        expected_mean = ((value / 2 + 1000 * (index % 2)) / 65535) * 2 - 1
        assert abs(float(item.mean()) - expected_mean) < 0.03


# -- unreadable files and folders ---------------------------------------------------------------------------

def deny(monkeypatch, locked: Path) -> None:
    """Make `locked` unreadable as chmod 000 does for a user other than root (tests run as root)."""
    real_scandir, real_access, real_open = os.scandir, os.access, builtins.open

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    def access(path, mode, *args, **kw):
        return False if Path(path) == locked else real_access(path, mode, *args, **kw)

    def opener(file, *args, **kw):
        if isinstance(file, (str, Path)) and Path(file) == locked:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kw)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(io, "open", opener)  # Path.open and Path.read_text


def picture_folder(root: Path, classes=("a", "b"), count: int = 2) -> Path:
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (40 * i, 90, 200)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("what", ["class folder", "image", "nested folder", "top folder", "metadata"])
def test_unreadable_file_or_folder_is_an_error_not_a_skip(tmp_path, monkeypatch, what):
    root = picture_folder(tmp_path / "data")
    (root / "b" / "deeper").mkdir()
    Image.new("RGB", (8, 8)).save(root / "b" / "deeper" / "x.png")
    (root / "metadata.jsonl").write_text('{"file_name": "a/0.png", "text": "hi"}\n')
    locked = {"class folder": root / "b", "image": root / "a" / "1.png", "nested folder": root / "b" / "deeper",
              "top folder": root, "metadata": root / "metadata.jsonl"}[what]
    deny(monkeypatch, locked)
    with pytest.raises(UserError, match="cannot be read .*chmod") as err:
        ImageFolder(str(root), 8)
    assert str(locked) in str(err.value) and "\n" not in str(err.value)


def test_unreadable_image_for_every_reader(tmp_path, monkeypatch):
    from diffusion.cli.upsample import load_low_res
    from diffusion.conditioning.inpaint import files
    from diffusion.evaluate import fid

    folder = picture_folder(tmp_path / "data", ("a",))
    image = folder / "a" / "0.png"
    deny(monkeypatch, image)
    for call in (lambda: files.load_image(image, 8), lambda: files.load_mask(image, 8), lambda: load_low_res(image, 8),
                 lambda: fid.image_header(image), lambda: list(fid.image_batches([image], 1))):
        with pytest.raises(UserError, match="cannot be read"):
            call()
    monkeypatch.undo()
    deny(monkeypatch, folder / "a")
    for call in (lambda: files.load_image_folder(folder / "a", 8), lambda: fid.image_files(folder / "a")):
        with pytest.raises(UserError, match="cannot be read"):
            call()


# -- decompression bombs ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """A real 13000 x 13000 grey PNG of zeros: 164 kB on disk, 169 MB decoded."""
    w = h = 13000
    packer = zlib.compressobj(9)
    row = b"\0" * (w + 1)
    data = b"".join([packer.compress(row) for _ in range(h)] + [packer.flush()])
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    assert path.stat().st_size < 200_000
    return path


def test_bomb_is_refused_from_its_header_before_decoding(bomb, tmp_path, monkeypatch):
    from diffusion.cli.upsample import load_low_res
    from diffusion.conditioning.inpaint import files
    from diffusion.evaluate import fid

    real_load = ImageFile.ImageFile.load

    def no_decoding(self, *args, **kw):
        assert self.size[0] * self.size[1] <= MAX_PIXELS, "decoded a bomb"
        return real_load(self, *args, **kw)

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    huge = tmp_path / "huge.png"  # past PIL's own limit (it refuses these on open)
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    small = tmp_path / "small.png"
    Image.new("L", (8, 8)).save(small)
    for path in (bomb, huge):
        for what, call in (("--image", lambda: files.load_image(path, 8)), ("--mask", lambda: files.load_mask(path, 8)),
                           ("--low-res", lambda: load_low_res(path, 8)),
                           ("--mask", lambda: files.load_image_and_mask(small, path, 8)),
                           ("sample", lambda: fid.image_header(path))):
            start = time.perf_counter()
            with pytest.raises(UserError) as err:
                call()
            message = str(err.value)
            assert time.perf_counter() - start < 1.0
            assert message.startswith(what) and str(path) in message and str(MAX_PIXELS) in message, message
            assert ("13000x13000" in message) if path == bomb else ("1600000000" in message)


# -- file-system names in metadata, JSON and logs -----------------------------------------------------------

def clean(text: str) -> bool:
    """No control, format, surrogate, private, unassigned or line-break character: safe in a log line,
    a PNG text chunk (as UTF-8) and JSON."""
    return all(unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") for c in text)


names = st.binary(min_size=1, max_size=250).filter(
    lambda b: b"/" not in b and b"\0" not in b and not b.startswith(b".") and b not in (b".", b".."))


@TMP
@given(names)
def test_class_folder_names_are_safe_in_png_metadata_json_and_logs(tmp_path_factory, raw):
    """Any folder name (newlines, escapes, non-UTF-8 bytes, 250 bytes) becomes a class name that is
    printable UTF-8, at most NAME_LIMIT long, distinct from the other class, and survives a PNG text
    chunk and a JSON file unchanged."""
    from diffusion.sampling.images import save_png
    import torch

    root = tmp_path_factory.mktemp("names")
    name = os.fsdecode(raw)
    assume(name != "plain")
    for folder in (name, "plain"):
        (root / folder).mkdir()
        Image.new("RGB", (4, 4), (9, 99, 199)).save(root / folder / "0.png")
    data = ImageFolder(str(root), 4)
    assert len(data.class_names) == 2 and len(set(data.class_names)) == 2
    for cls in data.class_names:
        cls.encode("utf-8")  # no lone surrogates
        assert len(cls) <= NAME_LIMIT and clean(cls) and safe_name(cls) == cls
        assert clean(data.caption(0))
        png = root / "sample.png"
        save_png(torch.zeros(3, 4, 4), png, {"class_name": cls})
        with Image.open(png) as img:
            assert img.text["class_name"] == cls
        assert json.loads(json.dumps({"class_names": [cls]}, ensure_ascii=False).encode("utf-8"))["class_names"] == [cls]
    try:
        strict = raw.decode("utf-8")
    except UnicodeDecodeError:
        strict = None
    if strict is not None and clean(strict) and len(strict) <= NAME_LIMIT:
        assert strict in data.class_names  # printable UTF-8 names are kept as they are


@given(st.text(st.characters(exclude_categories=()), max_size=300))
def test_safe_name_is_printable_bounded_and_idempotent(text):
    safe = safe_name(text)
    safe.encode("utf-8")
    assert clean(safe) and len(safe) <= NAME_LIMIT and safe_name(safe) == safe
    if clean(text) and len(text) <= NAME_LIMIT:
        assert safe == text


def test_png_metadata_from_an_old_checkpoint_with_raw_names(tmp_path):
    """A class name already stored raw (a lone surrogate, a newline) still writes a sample PNG."""
    import torch

    from diffusion.sampling.images import save_png

    meta = {"class_name": "caf\udce9\x1b[31m", "prompt": "two\nlines"}
    save_png(torch.zeros(3, 4, 4), tmp_path / "s.png", meta)
    with Image.open(tmp_path / "s.png") as img:
        assert img.text == {"class_name": "caf\\xe9\\x1b[31m", "prompt": "two\nlines"}
