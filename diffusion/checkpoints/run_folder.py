"""A run's output_dir is never overwritten by accident: a new run (no --resume) in a folder that
already holds a run is refused in one line, unless `--overwrite` asks to move the old run aside whole.

Without this, a second `train.py` on a finished run's folder replaced `final/` and `step-N`, cut
`metrics.csv`, and left the old run's later checkpoints for a later `--resume auto` to mix in.
Torch-free, so train.py can refuse before its slow imports.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import UserError

# What a training run writes into its folder (a folder holding only `.lock` or other files is free).
RUN_ENTRIES = ("config.yaml", "metrics.csv", "checkpoints", "final", "samples", "tensorboard", "diagnostics")
STEP = re.compile(r"^step-(\d+)$")


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
        return
    if run is None:
        return
    if resume is None:
        raise UserError(f"output_dir {path} already holds a run ({run}): continue it with --resume auto, start "
                        f"over with --overwrite (moves it to {aside_name(path).name}), or choose another output_dir")
    if resume == "auto" and not checkpoint_steps(path) and (path / "final").exists():
        raise UserError(f"--resume auto: output_dir {path} holds a finished run's final/ but no checkpoint to continue "
                        f"from; start over with --overwrite (moves it to {aside_name(path).name}) or choose another output_dir")


def move_aside(path: Path) -> Path | None:
    """Rename the run in `path` to `NAME.previous-N` (whole, in one rename) and recreate `path` empty;
    returns where it went, or None when there was no run. Call it holding the run's lock."""
    if existing_run(path) is None:
        return None
    aside = aside_name(path)
    os.rename(path, aside)
    path.mkdir()
    return aside
