"""The signals that stop a training run, and the data-loader workers' immunity to them.

Schedulers (SLURM, Kubernetes, `timeout`) and a closed terminal signal the whole process group,
data-loader workers included. A worker killed by SIGTERM makes the trainer die with "DataLoader
worker is killed by signal" in the middle of a step, saving nothing. So every loader's workers
ignore these signals (`ignore_stop_signals`, their worker_init_fn): the trainer alone decides when
to stop (diffusion.training.stop), saves, and then shuts them down.
"""
from __future__ import annotations

import contextlib
import os
import signal
import stat
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """A data-loader worker's worker_init_fn: ignore the signals the trainer handles, so a signal to
    the process group does not kill the worker (the trainer would then die with a worker error and
    save nothing). The worker may have been forked while they were blocked (`blocked_stop_signals`):
    set them ignored first, then unblock."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def blocked_stop_signals() -> Iterator[None]:
    """Block the stop signals in this thread while data-loader workers may be forked (any next() on a
    loader may start them), so no worker runs a moment with the default action before its
    worker_init_fn ignores them. A signal that arrives meanwhile is delivered when this ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def detach_from_terminal() -> None:
    """After SIGHUP the terminal is gone and writing to it fails: send stdout and stderr that went to a
    terminal to /dev/null instead, so the progress bar and the final message cannot break the save."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            try:
                if stat.S_ISCHR(os.fstat(fd).st_mode):
                    os.dup2(null, fd)
            except OSError:
                continue
    finally:
        os.close(null)
