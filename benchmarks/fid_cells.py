"""One `python -m diffusion.evaluate fid` run as a benchmark cell, shared by the guidance lab, the
post-hoc EMA benchmark and the EDM comparison: the command (printed, so any cell can be rerun alone),
run at one thread in its own process, and its JSON report read back.

Torch-free, so the scripts' --help stays fast.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

if __name__ == "__main__":
    raise SystemExit(print(__doc__.strip() + "\n\nRun one of the scripts that use it, e.g. python benchmarks/guidance_lab.py --help"))

ROOT = Path(__file__).resolve().parents[1]
# every metric of an `evaluate fid` report: NAME and NAME_ci95, except KID (kid_mean ± kid_std)
METRICS = ("fid", "kid", "precision", "recall", "density", "coverage", "class_accuracy")


class CellFailed(RuntimeError):
    """`evaluate fid` exited non-zero; the message is the end of its stderr."""


def fid_command(samples: str, report: Path, sample_dir: Path, *, reference: str, reference_root: str,
                extractor: str | None, num_samples: int, batch_size: int, options: Sequence[str] = (),
                extra: str = "") -> list[str]:
    """The `evaluate fid` argv sampling from `samples` (a run, checkpoint or folder) into `sample_dir` and
    writing `report`; `options` are sampling flags (--sampler, --guidance-scale, --autoguide, ...)."""
    command = [sys.executable, "-m", "diffusion.evaluate", "fid", "--samples", str(samples),
               "--reference", reference, "--reference-root", str(reference_root),
               "--num-samples", str(num_samples), "--batch-size", str(batch_size), "--workers", "0",
               "--out", str(report), "--sample-dir", str(sample_dir)]
    if extractor:
        command += ["--feature-extractor", str(extractor)]
    return command + [str(o) for o in options] + shlex.split(extra)


def shown(command: Sequence[str]) -> str:
    """The command as a user would paste it (`python` for this interpreter)."""
    return shlex.join(["python", *command[1:]])


def run_fid(command: list[str], report: Path, *, reuse: bool = False, keep_samples: bool = True) -> tuple[dict, float | None]:
    """Run one cell at one thread (skipped when `reuse` and its report exists); return (report, seconds or
    None when reused). keep_samples=False deletes the cell's PNGs once scored. Raises CellFailed."""
    print("$ " + shown(command), flush=True)
    report = Path(report)
    seconds = None
    if not (reuse and report.exists()):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        start = time.perf_counter()
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
        seconds = round(time.perf_counter() - start, 1)
        if done.returncode:
            raise CellFailed(done.stderr.strip()[-2000:] or f"exit status {done.returncode}, no output")
        if not keep_samples:
            shutil.rmtree(command[command.index("--sample-dir") + 1], ignore_errors=True)
    return json.loads(report.read_text()), seconds


def metric(report: dict, name: str) -> tuple[float | None, float | None, float | None]:
    """(value, lo, hi) of one metric of a report: NAME with NAME_ci95, KID as kid_mean ± kid_std; None where
    the report lacks it."""
    if name == "kid":
        value, std = report.get("kid_mean"), report.get("kid_std")
        if value is None or std is None:
            return value, None, None
        return value, value - std, value + std
    lo, hi = report.get(f"{name}_ci95") or (None, None)
    return report.get(name), lo, hi


def fmt(value: tuple, scale: float = 1.0, digits: int = 3) -> str:
    """A metric's (value, lo, hi) as "v [lo, hi]", scaled; "n/a" when the report lacks it."""
    v, lo, hi = value
    if v is None:
        return "n/a"
    if lo is None or hi is None:
        return f"{scale * v:.{digits}f}"
    return f"{scale * v:.{digits}f} [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"
