"""Metric logs: a CSV file and TensorBoard, written by the main process only.

A resumed run logs again the steps after its checkpoint, so on start both logs drop what lies past
the step the run starts from: metrics.csv is rewritten atomically without those rows, and
TensorBoard's writer purges them (`purge_step`). No step is then listed twice.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from ..io import atomic_write_text


def trim_csv(path: Path, last_step: int) -> list[str] | None:
    """Drop the rows of `path` whose step is past `last_step` (atomically); return the header, if any."""
    if not path.exists():
        return None
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return None
    header, body = rows[0], rows[1:]
    kept = [row for row in body if row and _step(row) <= last_step]
    if len(kept) != len(body):
        out = io.StringIO()
        csv.writer(out).writerows([header, *kept])
        atomic_write_text(path, out.getvalue())
    return header


def _step(row: list[str]) -> float:
    try:
        return float(row[0])
    except ValueError:  # a torn last line from a kill: drop it
        return float("inf")


class MetricLogger:
    def __init__(self, run_dir: Path, enabled: bool, start_step: int = 0):
        """`start_step`: the step the run starts from (the resumed checkpoint's, 0 for a new run)."""
        self.enabled = enabled
        self.path = run_dir / "metrics.csv"
        self.writer = None
        self.columns: list[str] | None = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
            self.columns = trim_csv(self.path, start_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **metrics}
        if self.columns is None:
            self.columns = list(row)
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(self.columns)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(row)
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
