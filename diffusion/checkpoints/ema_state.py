"""The EMA's training state in a checkpoint without pickles: its shadow parameters are the parameters
in `ema.safetensors` (the file sampling reads), its counters and settings are in `ema.json`.

accelerate's `register_for_checkpointing` would save EMAModel.state_dict() as a pickle and reload it
with torch.load(weights_only=False), so a planted file could run code on resume.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

from ..errors import UserError, first_line, preview
from ..io import atomic_write_text
from ..structured import StructuredFileError, load_json
from . import store

SCALARS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")


def save_ema_state(directory: Path, ema: EMAModel) -> None:
    """Write ema.json: every entry of EMAModel.state_dict() but the tensors (those go in ema.safetensors)."""
    state = ema.state_dict()
    atomic_write_text(directory / store.EMA_STATE_FILE, json.dumps({k: state[k] for k in SCALARS}, indent=2))


def read_ema_scalars(directory: Path, step: int) -> dict:
    """ema.json's entries; for a checkpoint saved before it existed, the counter the EMA had then
    (it steps once per optimizer step from step 0), the rest staying at the config's values."""
    path = directory / store.EMA_STATE_FILE
    if not path.is_file():
        return {"optimization_step": step}
    try:  # the shared loader (diffusion/structured.py): bounded, duplicate keys refused
        scalars = load_json(path, shape=dict, expected="a JSON object")
    except UserError as err:  # damaged (StructuredFileError), or unreadable
        reason = err.reason if isinstance(err, StructuredFileError) else str(err)
        raise UserError(f"cannot resume from {directory}: {path.name} is not readable JSON ({reason})") from None
    return {k: scalars[k] for k in SCALARS if k in scalars}


def load_ema_state(directory: Path, ema: EMAModel, model: torch.nn.Module, step: int, device: torch.device) -> None:
    """Restore `ema` (built over `model`'s parameters) from the checkpoint `directory`, then move it to
    `device`: loaded tensors are on the CPU, and ema.step must not mix devices."""
    weights = store.read_weights(directory, check=False)  # load_training_state verified every file first
    names = [name for name, _ in model.named_parameters()]
    missing = [name for name in names if name not in weights]
    if missing:
        raise UserError(f"cannot resume from {directory}: {store.EMA_FILE} lacks {len(missing)} parameters of "
                        f"this model (e.g. {missing[0]}); resume with the run's own config")
    shadows = [weights[name].to(current.dtype) for name, current in zip(names, ema.shadow_params)]
    wrong = [name for name, value, current in zip(names, shadows, ema.shadow_params) if value.shape != current.shape]
    if wrong:
        raise UserError(f"cannot resume from {directory}: {store.EMA_FILE} has {wrong[0]} of shape "
                        f"{tuple(weights[wrong[0]].shape)}, not this model's; resume with the run's own config")
    scalars = read_ema_scalars(directory, step)
    if scalars.get("optimization_step", step) != step:
        raise UserError(f"cannot resume from {directory}: {store.INFO_FILE} says step {step} but {store.EMA_STATE_FILE} "
                        f"counted {preview(scalars['optimization_step'])} EMA updates; one of them was edited")
    try:
        ema.load_state_dict({**scalars, "shadow_params": shadows})
    except ValueError as err:
        raise UserError(f"cannot resume from {directory}: {store.EMA_STATE_FILE}: {first_line(err)}") from None
    ema.to(device)
