"""Atomic file writes (a killed run never leaves a half-written file under the final name) and the
writable-folder check for a run's output_dir."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import UserError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` then rename the temporary file over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        fsync_path(Path(tmp))
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def check_output_dir(path: str | Path) -> None:
    """Create the run folder `path` if needed and prove it takes files (permissions alone do not tell,
    e.g. for root or a read-only mount); refuse a file, a path below a file, or no permission."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"output_dir {path} is a file, not a folder: choose another output_dir")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"output_dir {path} is below {blocker}, which is a file: choose another output_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"output_dir {path} is not writable ({err.strerror or err}): choose another output_dir") from None


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk, so a rename after it cannot expose missing data
    after a power loss or a kill of the machine."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder below `root` (and `root` itself), deepest first."""
    for folder, _, names in os.walk(root, topdown=False):
        for name in names:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder `tmp` to `final`, replacing any old one without a moment where a kill
    leaves neither: the old one is renamed aside, the new one renamed in, then the old one deleted.
    A kill between the two renames leaves `.old-NAME`, which `remove_crash_residue` puts back."""
    fsync_tree(tmp)
    old = final.with_name(f".old-{final.name}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    fsync_path(final.parent)
    if old.exists():
        shutil.rmtree(old)


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks (hashlib.file_digest needs Python 3.11)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
