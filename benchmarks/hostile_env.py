"""The hostile-input drill's shared pieces: what a case is (`Case`, `Result`), the files every case
may use (`Env`, `build_env`: one tiny trained run, image files), the builders of case commands, and
the checks of their results. The cases themselves are in benchmarks/hostile_cases.py.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from tests.conftest import ROOT, TINY


@dataclass
class Result:
    status: int | None  # None: killed at the case's timeout
    out: str
    err: str
    seconds: float = 0.0


@dataclass
class Env:
    """The files every case may use, made once by `build_env`."""

    root: Path
    run: Path = field(init=False)  # a tiny run: checkpoints/step-000002, step-000004, final

    def __post_init__(self):
        self.run = self.root / "run"

    def file(self, name: str) -> Path:
        return self.root / "files" / name

    def copy_run(self, folder: Path, name: str = "run") -> Path:
        target = folder / name
        if not target.exists():
            shutil.copytree(self.run, target)
        return target


@dataclass
class Case:
    group: str
    id: str
    argv: Callable[[Env, Path], list[str]] | None = None
    words: str | None = ""  # the one error line holds these (None: not checked)
    status: int = 2
    check: Callable[[Env, Path, Result], str | None] | None = None
    lost: bool = False  # a failed check or status means training work was lost
    timeout: float = 180
    prepare: Callable[[Env, Path], None] | None = None
    runner: Callable[[Env, Path], Result] | None = None
    quick: bool = True  # answered before any training: tests/test_bad_input.py runs it in-process
    cpu_only: bool = False  # bad input on a CPU-only machine only (fp16 works on a GPU)


STEP4 = "checkpoints/step-000004"
MARKER = "MARKER"  # in Env.root: created by any hostile pickle that gets unpickled


class Payload:
    """Unpickling this runs `touch MARKER`: the case fails if any loader lets it run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


TINY_OPEN_CLIP = {  # an open_clip architecture small enough to build in a moment
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


# -- the shared files -------------------------------------------------------------------------------

def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels (PIL refuses it as a decompression bomb on open)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def picture(path: Path, value: int, size: tuple[int, int] = (12, 12), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "L": 1}[mode]
    array = np.full((size[1], size[0], channels), value, np.uint8)
    Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode=mode).save(path)
    return path


def build_env(root: Path, trained: Path | None = None) -> Env:
    """Train the shared tiny run (4 steps), or copy `trained` (the same run, made already), and write the image files."""
    env = Env(root)
    files = root / "files"
    files.mkdir(parents=True, exist_ok=True)
    if trained is not None and not env.run.exists():
        shutil.copytree(trained, env.run)
    if not (env.run / "final").is_dir():
        subprocess.run([sys.executable, "train.py", "configs/shapes.yaml", *TINY, "train.max_steps=4",
                        f"output_dir={env.run}"], cwd=ROOT, check=True, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    picture(files / "image.png", 90, (16, 12))
    mask = np.zeros((12, 16), np.uint8)
    mask[:, 8:] = 255
    Image.fromarray(mask, mode="L").save(files / "mask.png")
    Image.fromarray(mask[:, :8], mode="L").save(files / "half_mask.png")
    (files / "bomb.png").write_bytes(png_header(20000, 20000))
    (files / "corrupt.png").write_bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(files / "noise.png")
    (files / "truncated.png").write_bytes((files / "noise.png").read_bytes()[:4000])  # half of it
    (files / "notes.txt").write_text("a red circle\n")
    (files / "binary.txt").write_bytes(b"\xff\xfe\x00 not text \xc3")
    (files / "empty.txt").write_text("\n\n")
    (files / "a_file").write_text("not a folder")
    import pickle

    import torch

    (files / "evil.bin").write_bytes(pickle.dumps(Payload(root / MARKER)))
    torch.save(Payload(root / MARKER), files / "evil_archive.bin")  # the zip format torch.save writes, around it
    (files / "garbage.pt2").write_bytes(b"PK\x03\x04 not really a zip archive")
    (files / "tiny-clip.json").write_text(json.dumps(TINY_OPEN_CLIP))
    for i in range(4):
        picture(files / "images" / f"{i}.png", 40 * i, (8, 8))
    fifo = files / "fifo.png"
    if not fifo.exists():
        os.mkfifo(fifo)
    return env


def image_folder(folder: Path, classes: dict[str, int], top: int = 0) -> Path:
    """An image folder with `classes` {name: images} and `top` images at its top level."""
    root = folder / "images"
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            picture(root / name / f"{i}.png", 30 * i)
    for i in range(top):
        picture(root / f"top{i}.png", 20 * i)
    root.mkdir(parents=True, exist_ok=True)
    return root


# -- case builders ----------------------------------------------------------------------------------

def train_argv(*extra: str, steps: int = 2, config: str = "configs/shapes.yaml") -> Callable[[Env, Path], list[str]]:
    """train.py on the tiny config into the case's folder; values may name {run}, {files}, {folder}."""
    def argv(env: Env, folder: Path) -> list[str]:
        fill = {"run": env.run, "files": env.root / "files", "folder": folder}
        return ["train", config, *TINY, f"train.max_steps={steps}", f"output_dir={folder / 'out'}",
                *(e.format(**fill) for e in extra)]
    return argv


def sample_argv(*extra: str, checkpoint: str = "{run}") -> Callable[[Env, Path], list[str]]:
    def argv(env: Env, folder: Path) -> list[str]:
        fill = {"run": env.run, "files": env.root / "files", "folder": folder, "copy": folder / "run"}
        return ["sample", "--checkpoint", checkpoint.format(**fill), "--out", str(folder / "samples"),
                "--num-samples", "1", "--steps", "2", *(e.format(**fill) for e in extra)]
    return argv


def config(group: str, override: str, words: str, **kw) -> Case:
    name = override if len(override) < 80 else f"{override[:30]}... ({len(override)} characters)"
    return Case(group, name, train_argv(override), words, **kw)


def config_file(name: str, text: str | bytes, words: str) -> Case:
    """train.py with a config file of this content."""
    def prepare(env: Env, folder: Path) -> None:
        path = folder / "config.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape"))

    def argv(env: Env, folder: Path) -> list[str]:
        return ["train", str(folder / "config.yaml"), f"output_dir={folder / 'out'}", "train.max_steps=1"]
    return Case("config file", name, argv, words, prepare=prepare)


def edited_copy(edit: Callable[[Path, Env], None], restamp: bool = False) -> Callable[[Env, Path], None]:
    """A copy of the shared run whose newest checkpoint `edit` changes (then re-digested, if `restamp`,
    as someone planting a file would)."""
    def prepare(env: Env, folder: Path) -> None:
        run = env.copy_run(folder)
        edit(run / STEP4, env)
        if restamp:
            from diffusion.checkpoints import store

            info = json.loads((run / STEP4 / store.INFO_FILE).read_text())
            info[store.DIGESTS] = store.file_digests(run / STEP4)
            (run / STEP4 / store.INFO_FILE).write_text(json.dumps(info))
    return prepare


def set_info(**changes) -> Callable[[Path, Env], None]:
    def edit(checkpoint: Path, env: Env) -> None:
        info = json.loads((checkpoint / "info.json").read_text())
        info.update(changes)
        (checkpoint / "info.json").write_text(json.dumps(info))
    return edit


def keep_digests(count: int) -> Callable[[Path, Env], None]:
    def edit(checkpoint: Path, env: Env) -> None:
        info = json.loads((checkpoint / "info.json").read_text())
        info["sha256"] = dict(list(info["sha256"].items())[:count])
        (checkpoint / "info.json").write_text(json.dumps(info))
    return edit


def flip_byte(name: str) -> Callable[[Path, Env], None]:
    def edit(checkpoint: Path, env: Env) -> None:
        data = bytearray((checkpoint / name).read_bytes())
        data[-3] ^= 0x10
        (checkpoint / name).write_bytes(bytes(data))
    return edit


def replace_text(name: str, old: str, new: str) -> Callable[[Path, Env], None]:
    def edit(checkpoint: Path, env: Env) -> None:
        (checkpoint / name).write_text((checkpoint / name).read_text().replace(old, new))
    return edit


def write_file(name: str, content: bytes | str) -> Callable[[Path, Env], None]:
    """Replace a file of the checkpoint by `content`, or by the shared file named `content` (a str)."""
    def edit(checkpoint: Path, env: Env) -> None:
        data = content if isinstance(content, bytes) else env.file(content).read_bytes()
        (checkpoint / name).write_bytes(data)
    return edit


def no_code_ran(env: Env, folder: Path, result: Result) -> str | None:
    return "a hostile pickle ran (MARKER exists)" if (env.root / MARKER).exists() else None


def remove(name: str) -> Callable[[Path, Env], None]:
    def edit(checkpoint: Path, env: Env) -> None:
        (checkpoint / name).unlink()
    return edit


def resume_argv(*extra: str, resume: str = "auto") -> Callable[[Env, Path], list[str]]:
    def argv(env: Env, folder: Path) -> list[str]:
        return ["train", "configs/shapes.yaml", *TINY, "train.max_steps=6", f"output_dir={folder / 'run'}", *extra,
                "--resume", resume.format(run=folder / "run")]
    return argv


def resumed(env: Env, folder: Path, result: Result) -> str | None:
    return None if "resumed from" in result.out else "did not resume"


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".lock"}


def unchanged_run(env: Env, folder: Path, result: Result) -> str | None:
    return None if tree(folder / "run") == tree(env.run) else "the existing run's files changed"


def moved_aside(env: Env, folder: Path, result: Result) -> str | None:
    if tree(folder / "run.previous-1") != tree(env.run):
        return "the old run was not moved aside whole"
    return None if (folder / "run" / "final").is_dir() else "no new run"


def no_stale_samples(env: Env, folder: Path, result: Result) -> str | None:
    """The folder holds this call's images only (it says how many it wrote)."""
    wrote = int(re.search(r"wrote (\d+) samples", result.out).group(1))
    found = len(list((folder / "samples").glob("sample_*.png")))
    return None if found == wrote else f"{found} images in --out, this call wrote {wrote}"


def stale_samples(env: Env, folder: Path) -> None:
    for i in range(4):
        picture(folder / "samples" / f"sample_{i:04d}.png", 10 * i)


def no_final(env: Env, folder: Path, result: Result) -> str | None:
    return "final/ was exported from a diverged run" if (folder / "out" / "final").exists() else None


def class_count(expected: int) -> Callable[[Env, Path, Result], str | None]:
    def check(env: Env, folder: Path, result: Result) -> str | None:
        names = json.loads((folder / "out" / "final" / "info.json").read_text())["class_names"]
        return None if len(names) == expected else f"{len(names)} classes ({names}), expected {expected}"
    return check
