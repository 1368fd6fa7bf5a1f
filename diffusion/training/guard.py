"""Stop a diverging run before it overwrites its good checkpoints with bad ones.

Two signs, checked at each logging step (where the loss is already on the host):
- a non-finite loss (lr=1e8): the weights are lost;
- a loss spike (lr=0.05 on shapes: the loss climbs from 0.45 back above its starting value and stays
  there, without ever turning NaN): the mean loss over the last `WINDOW` steps or more rises above
  `train.loss_spike` times the lowest such mean of the run so far (or since it resumed). The
  warm-up counts too: a learning rate that is too high diverges during its warm-up.
Either way the run raises Diverged (exit status 3) without saving, naming the last checkpoint it
saved before the loss rose past the threshold. Averaging over WINDOW steps keeps the noise of small
batches (and of `train.log_every: 1`) from tripping it.
"""
from __future__ import annotations

import math
from collections import deque
from pathlib import Path

from ..config import Config
from ..errors import Diverged

WINDOW = 50  # optimizer steps the compared loss is averaged over (at least)


class LossGuard:
    def __init__(self, cfg: Config, saved: Path | None, start_step: int):
        self.cfg = cfg
        self.factor = cfg.train.loss_spike
        self.windows: deque[tuple[int, float]] = deque()  # (steps, mean loss) of the recent logging windows
        self.current: float | None = None  # the mean over the last WINDOW steps or more
        self.lowest: tuple[float, int] | None = None  # (lowest such mean, its step)
        self.good: tuple[Path, int] | None = (saved, start_step) if saved is not None else None

    def advice(self) -> str:
        lr, clip = self.cfg.train.lr, self.cfg.train.grad_clip
        fix = (f"lower train.lr (now {lr:g}; train.grad_clip is already {clip:g})" if clip > 0
               else f"lower train.lr (now {lr:g}) or set train.grad_clip (e.g. 1.0)")
        if self.good is None:
            return f"no checkpoint was saved before it; {fix} and start again"
        path, step = self.good
        return f"the last good checkpoint is {path} (step {step}); {fix} and resume from it with --resume {path}"

    def check(self, step: int, mean_loss: float, steps: int) -> None:
        """The mean loss of the `steps` steps that end at `step`; raises Diverged on either sign."""
        if not math.isfinite(mean_loss):
            raise Diverged(f"the loss is {mean_loss} at step {step}: training diverged, so nothing was saved; "
                           + self.advice())
        self.windows.append((steps, mean_loss))
        while sum(n for n, _ in self.windows) - self.windows[0][0] >= WINDOW:  # the oldest is not needed
            self.windows.popleft()
        covered = sum(n for n, _ in self.windows)
        if covered < WINDOW:
            self.current = None
            return
        self.current = sum(n * loss for n, loss in self.windows) / covered
        if self.lowest is None or self.current < self.lowest[0]:
            self.lowest = (self.current, step)
        if self.factor and self.current > self.factor * self.lowest[0]:
            raise Diverged(
                f"the loss rose to {self.current:.4g} (mean of steps {step - covered + 1}-{step}), "
                f"{self.current / self.lowest[0]:.1f} times its lowest ({self.lowest[0]:.4g} at step {self.lowest[1]}; "
                f"train.loss_spike={self.factor:g}): training is diverging, so it stopped without saving; "
                + self.advice())

    def saved(self, path: Path, step: int) -> None:
        """A checkpoint was written at `step`: the loss was within the threshold at the last check."""
        self.good = (path, step)
