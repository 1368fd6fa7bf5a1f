"""One training process per run folder: an exclusive flock on RUN/.lock, held while the run trains.

The kernel drops a flock when its process dies, so the lock file a killed run leaves never blocks
the next run."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import UserError

LOCK_FILE = ".lock"


class RunLock:
    def __init__(self, run_dir: str | Path):
        """Take the lock, or raise UserError if another process holds it."""
        self.path = Path(run_dir) / LOCK_FILE
        try:
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:  # no permission, a read-only or full file system (no inode left)
            self._fd = None
            raise UserError(f"cannot create the lock file {self.path} ({err.strerror or err}): make output_dir "
                            "writable, free space on its disk, or choose another output_dir") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            self._fd = None
            raise UserError(f"output_dir {run_dir} is in use by another training run (process {holder} holds "
                            f"{self.path}): wait for it to finish, stop it, or choose another output_dir") from None
        try:  # the holder's pid, for the message above: a convenience, so a full disk does not stop the run here
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, str(os.getpid()).encode(), 0)
        except OSError:
            pass

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.release()
