"""Where sample.py's images go, and how they arrive there.

- Without --out, each call writes a fresh folder named after the checkpoint's run: `samples/RUN`,
  then `samples/RUN-2`, `samples/RUN-3`, ... (the first name that does not exist), so a repeated
  command never fails on, nor mixes with, an earlier call's images.
- An explicit --out that holds an earlier call's images is refused unless --overwrite.
- Every call writes its images into a scratch folder beside --out (inside it when --out is a mount
  point), and only when the whole set is written moves it in: into a new --out in one rename, or
  over the earlier call's images file by file, with the stop signals held off. A Ctrl-C, a full disk
  or a bad option found late leaves the earlier images as they were and removes the scratch folder.

Torch-free: sample.py answers bad --out values before its slow imports.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from ..errors import UserError, preview
from ..io import check_output_path, fsync_path, fsync_tree
from ..signals import blocked_stop_signals

OUTPUTS = ("sample_*.png", "strip_*.png", "bicubic_*.png", "lowres_*.png", "grid.png")  # what sample.py writes
DEFAULT_ROOT = Path("samples")  # default --out: DEFAULT_ROOT / run name (numbered)
SCRATCH = ".sampling-"  # prefix of the scratch folder beside --out
STEP = re.compile(r"^step-\d+$")
UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")


def earlier_outputs(out: Path) -> list[Path]:
    """The PNGs an earlier call wrote in --out; refused unless --overwrite (mixed with this call's, an
    earlier call's extra images would pass for this one's)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: choose another --out")
    return sorted(p for pattern in OUTPUTS for p in out.glob(pattern)) if out.is_dir() else []


def check_out(out: Path, overwrite: bool) -> None:
    old = earlier_outputs(out)
    if old and not overwrite:
        raise UserError(f"--out {out} already holds {len(old)} images from an earlier call ({old[0].name}, ...): "
                        "pass --overwrite to replace them, leave --out out (a new folder under samples/), "
                        "or choose another --out")


def run_name(checkpoint: str | Path) -> str:
    """The name of the run a --checkpoint belongs to (RUN for RUN, RUN/final, RUN/checkpoints/step-N),
    as one safe file name."""
    path = Path(os.path.realpath(checkpoint))
    if path.name == "final" or (STEP.match(path.name) and path.parent.name == "checkpoints"):
        path = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return UNSAFE.sub("_", path.name).lstrip(".")[:100] or "run"


def numbered(base: Path) -> Path:
    """`base`, or `base-2`, `base-3`, ...: the first that does not exist yet."""
    n, out = 1, base
    while os.path.lexists(out):
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def choose_out(out: str | None, checkpoint: str, overwrite: bool) -> tuple[Path, Path | None]:
    """(the folder this call writes, the base of its numbered name when it is the default one),
    checked: an explicit --out goes through check_output_path (not inside a checkpoint) and check_out
    (no earlier images unless --overwrite)."""
    if out is None:
        base = DEFAULT_ROOT / run_name(checkpoint)
        return check_output_path(numbered(base), "--out (default)"), base
    path = check_output_path(out, "--out")
    check_out(path, overwrite)
    return path, None


def make_scratch(out: Path) -> Path:
    """A new hidden folder for this call's images, on --out's file system (so moving them in is a
    rename): beside --out, or inside it when --out is a mount point."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        inside = out.is_dir() and os.stat(out).st_dev != os.stat(out.parent).st_dev
        return Path(tempfile.mkdtemp(prefix=f"{SCRATCH}{out.name[:60]}-", dir=out if inside else out.parent))
    except OSError as err:
        raise UserError(f"--out {preview(str(out))} cannot be written ({err.strerror or err}): choose another --out") from None


def publish(scratch: Path, out: Path, base: Path | None = None) -> Path:
    """Move the complete set of images in `scratch` to `out`; returns where they went. A new --out
    arrives whole in one rename (a default one, numbered from `base`, that another call took
    meanwhile: the next free number); into an existing --out each new file replaces its namesake and
    the earlier call's other images are deleted. The stop signals wait until this is done."""
    with blocked_stop_signals():
        fsync_tree(scratch)
        while True:
            if not os.path.lexists(out):
                try:
                    os.rename(scratch, out)
                    break
                except OSError:
                    if not (base is not None and os.path.lexists(out)):
                        raise
            if base is not None:  # another call took this name after we chose it
                out = numbered(base)
                continue
            new = {p.name for p in scratch.iterdir()}
            for path in sorted(scratch.iterdir()):
                os.replace(path, out / path.name)
            for path in earlier_outputs(out):
                if path.name not in new:
                    path.unlink()
            scratch.rmdir()
            break
        try:  # the images are in place now: a failing flush of the folder entries is not worth an error
            fsync_path(out)
            fsync_path(out.parent)
        except OSError:
            pass
    return out


def remove_scratch(scratch: Path | None) -> None:
    if scratch is not None and scratch.exists():
        shutil.rmtree(scratch, ignore_errors=True)
