"""Atomic file writes (a killed run never leaves a half-written file under the final name), the one
check every output path goes through (`check_output_path`), the writable-folder check for a run's
output_dir, and the one-line answer to a full disk (`write_failures`)."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError, first_line, preview


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


def check_output_path(path: str | Path, what: str, *, run: bool = False, within: str | Path | None = None) -> Path:
    """Normalise an output path and refuse, in one line, one that cannot be written safely. Every writer
    calls it: train.py's output_dir and each sweep run folder (`run=True`), sample.py's --out and the
    evaluations' outputs (`run=False`). Refused: an empty path; a path that leaves `within` (a sweep's
    output_dir: a grid value holding `../..`); a path inside a checkpoint folder, or inside a run's
    `checkpoints/` or `final/` (their files are digest-checked: one more file and the checkpoint no
    longer loads); for a run (`run=True`), a path inside any other run at all. Symlinks are followed,
    so a link into a checkpoint is refused too. Returns the path as a Path (`a/./b/` -> `a/b`)."""
    from .checkpoints.run_folder import protected_ancestor

    text = os.fspath(path)
    if not text.strip():
        raise UserError(f"{what} is empty: give a folder")
    if "\0" in text:
        raise UserError(f"{what} {preview(text)} holds a NUL byte: give another folder")
    normal = Path(text)  # `a/./b/` -> `a/b`; `..` is kept: after a symlink it is not the lexical parent
    real = Path(os.path.realpath(text))
    if within is not None:
        parent = Path(os.path.realpath(within))
        if real == parent or parent not in real.parents:
            raise UserError(f"{what} {preview(text)} is not inside {within}: rename the value that leads out of it")
    found = protected_ancestor(real, run)
    if found is not None:
        holder, kind, why = found
        where = "is" if holder == real else "is inside"
        raise UserError(f"{what} {preview(text)} {where} {kind} {holder}: {why}; choose a folder outside it")
    return normal


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


# A write that fails for lack of room or a failing file system, as each writer reports it: an OSError
# (open, write, PIL), a SafetensorError ("... No space left on device (os error 28)") or torch.save's
# RuntimeError ("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534").
WRITE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file too large for the file system", errno.EROFS: "the file system is read-only",
                errno.EIO: "input/output error (a failing disk?)"}
WRITE_ERROR_TEXT = {"No space left on device": "no space left on device", "os error 28": "no space left on device",
                    "Disk quota exceeded": "disk quota exceeded", "os error 122": "disk quota exceeded",
                    "Read-only file system": "the file system is read-only"}
TORCH_WRITE_TEXT = ("PytorchStreamWriter", "inline_container.cc", "file write failed")


def write_failure(err: BaseException) -> str | None:
    """Why a write failed, in words, when `err` is a full disk, a quota, or a read-only or failing file
    system, however the writer reported it; None for any other error (a bug: its traceback is kept)."""
    if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
        return WRITE_ERRNOS[err.errno]
    text = str(err)
    for needle, reason in WRITE_ERROR_TEXT.items():
        if needle in text:
            return reason
    if isinstance(err, RuntimeError) and any(needle in text for needle in TORCH_WRITE_TEXT):
        return f"torch.save could not write ({first_line(err, 80)}), most likely no space left on device"
    return None


def free_space(path: str | Path) -> str:
    """', N MB free there' for the file system holding `path` (its nearest existing folder), or ''."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f", {shutil.disk_usage(path).free / 2**20:.1f} MB free there"
    except OSError:
        return ""


@contextlib.contextmanager
def write_failures(what: str, where: str | Path, fix: str | Callable[[], str],
                   cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Turn a full disk (or a quota, a read-only file system) while writing `what` into one line: a
    UserError naming what was being written, why it failed, the space left at `where`, and `fix` (or
    what `fix()` says after the cleanup). `cleanup` (e.g. deleting a half-written folder) runs first,
    whatever the error. Other errors pass unchanged."""
    try:
        yield
    except BaseException as err:
        if cleanup is not None:
            cleanup()
        reason = write_failure(err)
        if reason is None:
            raise
        raise UserError(f"cannot write {what}: {reason}{free_space(where)}; {fix if isinstance(fix, str) else fix()}") from None
