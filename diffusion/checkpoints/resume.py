"""Load a checkpoint's training state to resume a run: check the files against their sha256, load
accelerate's state with torch.load(weights_only=True) only, and restore the EMA without pickles."""
from __future__ import annotations

import pickle
import sys
import tempfile
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import load as accelerate_load
from diffusers.training_utils import EMAModel

from ..errors import UserError, first_line
from ..training.preflight import STATE_DIR
from . import store
from .ema_state import load_ema_state

RNG_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")
LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, ValueError, KeyError, TypeError, EOFError, OSError)


def check_random_states(path: Path, process_index: int) -> str | None:
    """accelerate skips an unreadable RNG file silently and the resume is then not exact: refuse a
    damaged one; for a missing one (e.g. a checkpoint from fewer processes) return a one-line warning."""
    file = path / STATE_DIR / f"random_states_{process_index}.pkl"
    if not file.is_file():
        return (f"warning: {file} is missing: resuming with fresh random states, so the run will not match "
                "an uninterrupted one exactly")
    try:
        states = accelerate_load(file, weights_only=True)  # as accelerate loads it, with its safe numpy types
        absent = [key for key in RNG_KEYS if key not in states]
    except LOAD_ERRORS as err:
        raise UserError(f"cannot resume from {path}: {file.name} is damaged ({first_line(err)}); "
                        "use an earlier checkpoint") from None
    if absent:
        raise UserError(f"cannot resume from {path}: {file.name} lacks {absent[0]}; use an earlier checkpoint")
    return None


def load_training_state(path: Path, accelerator: Accelerator, ema: EMAModel, model) -> store.TrainState:
    """Restore model, optimizer, RNG and EMA state from checkpoint `path`; returns its TrainState.

    Nothing here unpickles with weights_only=False: accelerate's load_state uses weights_only=True for
    every file it reads as long as no object is registered for checkpointing (it would reload those
    with weights_only=False), and the EMA is read from safetensors and JSON."""
    if accelerator._custom_objects:  # noqa: SLF001 - the one thing that would unpickle freely
        raise RuntimeError("objects registered for checkpointing would be loaded with weights_only=False")
    info = store.read_info(path)
    store.verify_digests(path)  # every file, before anything is loaded
    warning = check_random_states(path, accelerator.process_index)
    state_dir = path / STATE_DIR
    legacy = sorted(state_dir.glob("custom_checkpoint_*.pkl"))  # the EMA pickle of older checkpoints: never read
    try:
        if legacy:
            _load_state_ignoring(accelerator, state_dir, legacy)
        else:
            accelerator.load_state(str(state_dir))
    except LOAD_ERRORS as err:  # damaged or foreign files
        raise UserError(f"cannot resume from {path}: {first_line(err)}") from None
    load_ema_state(path, ema, model, info.step, accelerator.device)
    if warning:  # once everything else loaded: a failed resume says only why it failed
        print(warning, file=sys.stderr)
    return info


def _load_state_ignoring(accelerator: Accelerator, state_dir: Path, legacy: list[Path]) -> None:
    """load_state for an older checkpoint, whose custom_checkpoint_N.pkl accelerate would count against
    the (no longer) registered objects: load the other files from a folder of links to them."""
    with tempfile.TemporaryDirectory(prefix="resume-") as tmp:
        for file in state_dir.iterdir():
            if file not in legacy:
                (Path(tmp) / file.name).symlink_to(file.resolve())
        accelerator.load_state(tmp)
