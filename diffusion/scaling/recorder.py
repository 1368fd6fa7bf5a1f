"""Evaluations during training: validation loss at log-spaced steps, written to RUN/scaling/evals.jsonl.

One JSON row per evaluation point: step, images seen, training FLOPs so far, training wall
seconds (evaluation time excluded; time lost to a kill is not counted), mean train loss since
the previous point, and the fixed validation loss overall and per timestep bucket (EMA weights).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..io import atomic_write_text
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


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
