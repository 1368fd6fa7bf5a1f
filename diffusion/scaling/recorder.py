"""Evaluations during training: validation loss at log-spaced steps, written to RUN/scaling/evals.jsonl.

One JSON row per evaluation point: step, images seen, training FLOPs so far, training wall
seconds (evaluation time excluded; time lost to a kill is not counted), mean train loss since
the previous point, and the fixed validation loss overall and per timestep bucket (EMA weights).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..errors import preview
from ..io import atomic_write_text
from ..structured import StructuredFileError, load_json, load_jsonl
from .flops import training_flops
from .valloss import ValLossConfig, build_valset, validation_loss

EVALS_FILE = "evals.jsonl"
META_FILE = "meta.json"
DONE_FILE = "done.json"


def eval_steps(max_steps: int, points: int, first_step: int) -> list[int]:
    """About `points` log-spaced steps from `first_step` to `max_steps` (always included)."""
    first = min(max(1, first_step), max_steps)
    steps = np.unique(np.round(np.geomspace(first, max_steps, max(points, 1))).astype(int))
    return sorted({int(s) for s in steps} | {max_steps})


DAMAGED = "the sweep wrote it, so it was edited or damaged: delete the run's folder to train that point again"
EVAL_FIELDS = {"step": 1, "images_seen": 0, "flops": 0, "wall_s": None, "val_loss": 0}  # required: lower bound (exclusive; None: >= 0)
META_FIELDS = {"params": 0, "dataset_size": 0, "forward_flops": 0, "max_steps": 1}
ROW_FIELDS = {"run", "finished", *META_FIELDS}  # a row of sweep.csv: these from meta.json, then values, then the evaluation


def _number_problem(row: dict, key: str, above: float | None) -> str:
    """'' if row[key] is a finite number above `above` (>= 0 when None; a whole number where the bound is 1)."""
    value = row.get(key)
    if key not in row:
        return f"'{key}' is missing"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"'{key}' must be a finite number, got {preview(value)}"
    if above == 1 and not isinstance(value, int):
        return f"'{key}' must be a whole number, got {preview(value)}"
    if (value < 0) if above is None else (value < 1 if above == 1 else value <= above):
        return f"'{key}' must be {'>= 0' if above is None else '>= 1' if above == 1 else '> 0'}, got {preview(value)}"
    return ""


def check_fields(row: dict, fields: dict[str, float | None], label: str) -> None:
    """A StructuredFileError naming `label` for the first required field that is missing or no usable number,
    or for a field meta.json gives (an evaluation row would override it)."""
    clash = sorted(ROW_FIELDS & set(row))
    if clash:
        raise StructuredFileError(label, f"is not a usable row: it holds '{clash[0]}', a field of meta.json", DAMAGED)
    for key, above in fields.items():
        problem = _number_problem(row, key, above)
        if problem:
            raise StructuredFileError(label, f"is not a usable row: {problem}", DAMAGED)


def read_jsonl(path: Path) -> list[dict]:
    """The evaluation rows of RUN/scaling/evals.jsonl ([] if there is none), through the shared loader:
    a damaged file or row (truncated, not UTF-8, a missing, NaN or wrongly typed field) is one UserError
    naming the file and line."""
    if not path.exists():
        return []
    return load_jsonl(path, shape=dict, expected="a JSON object (one evaluation)", fix=DAMAGED,
                      check=lambda row, label: check_fields(row, EVAL_FIELDS, label))


def read_meta(path: Path) -> dict:
    """RUN/scaling/meta.json (run name, grid values, N, D, forward FLOPs) through the shared loader, its
    fields checked; a truncated, empty, binary or edited file is one UserError naming it."""
    meta = load_json(path, shape=dict, expected="a JSON object (the run's name, values and sizes)", fix=DAMAGED)
    if not isinstance(meta.get("run"), str) or not meta["run"]:
        raise StructuredFileError(str(path), f"is not usable: 'run' must be the run's name, got {preview(meta.get('run'))}",
                                  DAMAGED)
    if not isinstance(meta.get("values"), dict):
        raise StructuredFileError(str(path), "is not usable: 'values' must be a mapping of the grid point's settings, "
                                             f"got {preview(meta.get('values'))}", DAMAGED)
    clash = sorted((ROW_FIELDS | set(EVAL_FIELDS)) & set(meta["values"]))
    problem = next((p for key, above in META_FIELDS.items() if (p := _number_problem(meta, key, above))), "")
    problem = problem or (f"'values' holds '{clash[0]}', a field of every row" if clash else "")
    if problem:
        raise StructuredFileError(str(path), f"is not usable: {problem}", DAMAGED)
    return meta


class EvalRecorder:
    """The trainer's `on_step` hook: evaluates at chosen steps and keeps one row per step."""

    def __init__(self, cfg: Config, vcfg: ValLossConfig, steps: list[int], forward_flops: int):
        self.cfg, self.vcfg, self.steps = cfg, vcfg, set(steps)
        self.path = Path(cfg.output_dir) / "scaling" / EVALS_FILE
        self.forward_flops = forward_flops
        self.rows = {r["step"]: r for r in read_jsonl(self.path)}
        self.valset = None
        self.loss_sum, self.loss_count = 0.0, 0
        self.wall = 0.0
        self.tick: float | None = None

    def _start(self, step: int) -> None:
        """First call: drop rows past the resumed step (they are recomputed) and continue the wall clock."""
        self.rows = {s: r for s, r in self.rows.items() if s < step}
        self.wall = max((r["wall_s"] for r in self.rows.values()), default=0.0)
        self.valset = build_valset(self.cfg, self.vcfg)
        self.tick = time.perf_counter()

    def __call__(self, trainer, loss: torch.Tensor) -> None:
        step = trainer.state.step
        if self.tick is None:
            self._start(step)
        self.loss_sum = self.loss_sum + loss.detach().float()  # no device sync per step
        self.loss_count += 1
        if step not in self.steps:
            return
        now = time.perf_counter()
        self.wall += now - self.tick
        if trainer.accelerator.is_main_process:
            result: dict = {}
            trainer.with_ema_weights(lambda core: result.update(
                validation_loss(core, self.cfg, self.valset, self.vcfg.batch_size, trainer.task.scheduler)))
            images = step * self.cfg.train.batch_size * self.cfg.train.grad_accum
            self.rows[step] = {
                "step": step, "images_seen": images, "flops": training_flops(self.forward_flops, images),
                "wall_s": round(self.wall, 3), "eval_s": round(time.perf_counter() - now, 3),
                "train_loss": float(self.loss_sum) / max(self.loss_count, 1), **result,
            }
            text = "".join(json.dumps(self.rows[s]) + "\n" for s in sorted(self.rows))
            atomic_write_text(self.path, text)
        trainer.accelerator.wait_for_everyone()
        self.loss_sum, self.loss_count = 0.0, 0
        self.tick = time.perf_counter()
