"""Checks that a run can start, made before the model, data and accelerate are loaded: the output
folder lies inside no other run (diffusion.io.check_output_path), is writable and holds no other run
(unless --resume or --overwrite), the --resume checkpoint is complete and in the expected file formats,
and the device can do the requested mixed precision. Each failure is one UserError line.

train.py runs them before its slow imports, so torch is imported only by the checks that need it.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

from ..checkpoints.run_folder import check_new_run
from ..config import Config
from ..errors import UserError, first_line
from ..io import check_output_dir, check_output_path

STATE_DIR = "accelerate"  # accelerator.save_state's folder in a checkpoint
REQUIRED_STATE = ("model.safetensors", "optimizer.bin")


def check_state_file(path: Path) -> None:
    """Refuse a training-state file not in the format accelerate writes, before anything unpickles it:
    `.safetensors` must parse as safetensors; `.bin` and `.pkl` must be torch.save zip archives."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as err:  # SafetensorError, OSError: a damaged or foreign file
            first = first_line(err, 120)
            raise UserError(f"cannot resume: {path} is not a safetensors file ({first})") from None
    elif path.suffix in (".bin", ".pkl") and not zipfile.is_zipfile(path):
        raise UserError(f"cannot resume: {path} is not a torch.save archive (a bare pickle or a damaged file); "
                        "refusing to load it")


def check_resume_checkpoint(path: Path) -> None:
    """A checkpoint --resume can continue from: info.json plus accelerate's model and optimizer state."""
    from ..checkpoints.store import INFO_FILE

    if not (path / INFO_FILE).is_file():
        raise UserError(f"--resume {path}: not a checkpoint directory (no {INFO_FILE})")
    state = path / STATE_DIR
    missing = [name for name in REQUIRED_STATE if not (state / name).is_file()]
    if missing:
        raise UserError(f"--resume {path} has no training state ({STATE_DIR}/{missing[0]} is missing): an exported "
                        f"model such as RUN/final holds only weights; resume from RUN/checkpoints/step-N or "
                        f"--resume auto, or start a new run from its weights with init_from={path}")
    for file in sorted(state.iterdir()):
        check_state_file(file)


def find_resume(cfg: Config, resume: str | None) -> Path | None:
    """The checkpoint to resume from: None, the newest of output_dir ('auto'), or the given folder."""
    if resume is None:
        return None
    if resume == "auto":
        from ..checkpoints.store import newest_checkpoint

        path = newest_checkpoint(cfg.output_dir)
    else:
        path = Path(resume)
    if path is not None:
        check_resume_checkpoint(path)
        from ..checkpoints.settings import check_resume_settings
        from ..checkpoints.store import read_config

        check_resume_settings(path, read_config(path), cfg)
    return path


def preflight(cfg: Config, resume: str | None, overwrite: bool = False) -> Path | None:
    """Every check above; returns the checkpoint to resume from, if any."""
    check_output_path(cfg.output_dir, "output_dir", run=True)  # before check_output_dir creates it
    check_output_dir(cfg.output_dir)
    check_new_run(cfg.output_dir, resume, overwrite)
    path = find_resume(cfg, resume)
    from ..device import check_mixed_precision, pick_device

    check_mixed_precision(cfg.train.mixed_precision, pick_device())
    return path
