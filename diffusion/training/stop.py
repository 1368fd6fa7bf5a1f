"""Stop requests (Ctrl-C, SIGTERM, SIGHUP) turned into a flag that every process agrees on.

A signal reaches each rank at its own moment, maybe while rank 0 alone is in the preview or
checkpoint code. If each rank acted on its own flag, the others would already wait in the next
all-reduce and the job would hang until the NCCL timeout. So the loop asks `agreed` only at
gradient-sync points (after an optimizer step), where every rank takes part in one max-reduce:
all ranks stop after the same step, and never inside a gradient accumulation.

Schedulers (SLURM, Kubernetes, `timeout`) and a closed terminal signal the whole process group,
data-loader workers included; the workers ignore these signals (see `diffusion.signals`).
Only a second Ctrl-C stops at once without saving; a repeated SIGTERM or SIGHUP (a scheduler that
signals twice, a launcher that forwards the signal it got) changes nothing.
"""
from __future__ import annotations

import signal

import torch
from accelerate import Accelerator

from ..signals import STOP_SIGNALS, detach_from_terminal


class StopRequest:
    """Turns SIGINT/SIGTERM/SIGHUP into a flag so the loop can checkpoint before exiting. A signal the
    process was started with ignored (`nohup` ignores SIGHUP) stays ignored."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._interrupts = 0  # Ctrl-Cs so far
        self._previous = {}
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, self._handle)

    @property
    def requested(self) -> bool:
        """This process was signalled (other ranks may not have been)."""
        return self.signum is not None

    def agreed(self, accelerator: Accelerator) -> bool:
        """True on every rank when any rank was signalled. A collective: call it on all ranks at the same point."""
        if accelerator.num_processes == 1:  # nothing to agree on: no device sync per step
            return self.requested
        local = torch.tensor([self.signum or 0], device=accelerator.device)
        signum = int(accelerator.reduce(local, reduction="max").item())
        if signum and self.signum is None:  # another rank was signalled: stop for its reason here too
            self.signum = signum
        return bool(signum)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGHUP:  # the terminal is gone: writing to it would fail
            detach_from_terminal()
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:  # a second Ctrl-C stops at once
                raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
