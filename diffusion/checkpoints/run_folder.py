"""A run's output_dir is never overwritten by accident: a new run (no --resume) in a folder that
already holds a run is refused in one line, unless `--overwrite` asks to move the old run aside whole.

Without this, a second `train.py` on a finished run's folder replaced `final/` and `step-N`, cut
`metrics.csv`, and left the old run's later checkpoints for a later `--resume auto` to mix in.
Torch-free, so train.py can refuse before its slow imports.
"""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from ..errors import UserError

# What a training run writes into its folder (a folder holding only `.lock` or other files is free).
RUN_ENTRIES = ("config.yaml", "metrics.csv", "checkpoints", "final", "samples", "tensorboard", "diagnostics", "posthoc")
STEP = re.compile(r"^step-(\d+)$")


# What marks a folder as a run (config.yaml beside any of these) or as a checkpoint (config.yaml beside
# ema.safetensors or info.json): check_output_path keeps other runs' outputs out of them.
RUN_MARKERS = ("checkpoints", "final", "metrics.csv", ".lock")
CHECKPOINT_MARKERS = ("ema.safetensors", "info.json")
SAVED = ("checkpoints", "final", "posthoc")  # a run's folders whose files are digest-checked (and .tmp-*/.old-*
# saves); posthoc/: post-hoc EMA snapshots and reconstructions (diffusion.ema writes there itself)


def is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and any((path / name).exists() for name in RUN_MARKERS)


def is_checkpoint_folder(path: Path) -> bool:
    return (path / "config.yaml").is_file() and any((path / name).is_file() for name in CHECKPOINT_MARKERS)


CHANGES_FILES = "writing there would change its files (it would no longer load)"
NESTED_RUN = "a run inside another run's folder would be moved aside, cleaned up and listed with it"


def protected_ancestor(path: Path, run: bool) -> tuple[Path, str, str] | None:
    """(folder, 'the run' or 'the checkpoint', why) when writing into the absolute path `path` would
    change a saved run: `path` is a checkpoint folder or lies inside one, or lies in a run's
    `checkpoints/`, `final/` or an unfinished save (`.tmp-*`, `.old-*`); with `run` (a new training
    run's folder), also when it lies anywhere inside another run. None when it is free."""
    if is_checkpoint_folder(path) and not run:
        return path, "the checkpoint", CHANGES_FILES
    child = path
    for folder in path.parents:
        if is_checkpoint_folder(folder):
            return folder, "the checkpoint", CHANGES_FILES
        if is_run(folder):
            if child.name in SAVED or child.name.startswith((".tmp-", ".old-")):
                return folder, "the run", CHANGES_FILES.replace("load", "resume or load")
            if run:
                return folder, "the run", NESTED_RUN
        child = folder
    return None


def checkpoint_steps(path: Path) -> list[int]:
    """The steps of the `checkpoints/step-N` folders in run folder `path`, in order."""
    return sorted(int(m.group(1)) for p in (path / "checkpoints").glob("step-*") if (m := STEP.match(p.name)))


def existing_run(path: str | Path) -> str | None:
    """A short description of the run in folder `path` ("checkpoints up to step 20, final/"), or None."""
    path = Path(path)
    if not path.is_dir():
        return None
    found = [name for name in RUN_ENTRIES if (path / name).exists()]
    if not found:
        return None
    steps = checkpoint_steps(path)
    parts = [f"checkpoints up to step {steps[-1]}" if steps else "no checkpoint"]
    if "final" in found:
        parts.append("final/")
    if "metrics.csv" in found:
        parts.append("metrics.csv")
    return ", ".join(parts)


def aside_name(path: Path) -> Path:
    """The first free `NAME.previous-N` beside the folder `path`."""
    n = 1
    while (candidate := path.with_name(f"{path.name}.previous-{n}")).exists():
        n += 1
    return candidate


def check_new_run(path: str | Path, resume: str | None, overwrite: bool) -> None:
    """Refuse to start a fresh run over an existing one unless asked (`--resume` continues it,
    `--overwrite` moves it aside); refuse `--overwrite` where moving the folder is unsafe."""
    path = Path(path)
    if overwrite and resume is not None:
        raise UserError("--overwrite starts a new run and --resume continues one: give one of them")
    run = existing_run(path)
    if overwrite:
        here = Path.cwd().resolve()
        if run is not None and (path.resolve() == here or path.resolve() in here.parents):
            raise UserError(f"--overwrite cannot move output_dir {path} aside: it holds the current folder; "
                            "choose another output_dir")
        if run is not None and os.path.ismount(path):
            raise UserError(mount_point_message(path))
        return
    if run is None:
        return
    if resume is None:
        raise UserError(f"output_dir {path} already holds a run ({run}): continue it with --resume auto, start "
                        f"over with --overwrite (moves it to {aside_name(path).name}), or choose another output_dir")
    if resume == "auto" and not checkpoint_steps(path) and (path / "final").exists():
        raise UserError(f"--resume auto: output_dir {path} holds a finished run's final/ but no checkpoint to continue "
                        f"from; start over with --overwrite (moves it to {aside_name(path).name}) or choose another output_dir")


def mount_point_message(path: Path) -> str:
    """--overwrite on a mount point: the run cannot be renamed aside whole (a mount point cannot be
    renamed), and moving its files one by one would not be the one atomic step --overwrite promises."""
    return (f"--overwrite cannot move output_dir {path} aside: it is a mount point, which cannot be renamed; "
            "move the old run's files out of it yourself, or choose another output_dir")


def move_aside(path: Path) -> Path | None:
    """Rename the run in `path` to `NAME.previous-N` (whole, in one rename) and recreate `path` empty;
    returns where it went, or None when there was no run. Call it holding the run's lock. A folder that
    cannot be renamed (a mount point: EBUSY; no permission on its parent) is refused in one line."""
    if existing_run(path) is None:
        return None
    aside = aside_name(path)
    try:
        os.rename(path, aside)
    except OSError as err:
        if err.errno in (errno.EBUSY, errno.EXDEV):
            raise UserError(mount_point_message(path)) from None
        raise UserError(f"--overwrite cannot move output_dir {path} aside to {aside.name} "
                        f"({err.strerror or err}): choose another output_dir") from None
    path.mkdir()
    return aside
