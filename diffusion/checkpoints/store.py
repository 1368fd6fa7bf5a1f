"""Checkpoint files: atomic directories holding accelerate state, EMA weights and the resolved config.

Layout of `RUN/checkpoints/step-000100/`:
  accelerate/          accelerator.save_state: model, optimizer, RNG states (all loaded with weights_only=True)
  ema.safetensors      EMA weights of the whole model, for sampling and (its parameters) for resuming
  ema.json             the EMA's counters and settings (EMAModel.state_dict() without the tensors)
  config.yaml          the resolved config: enough to rebuild the model
  info.json            step, data position, class names, and the sha256 of every other file
A checkpoint is written under a temporary name, fsynced and renamed into place, so the newest
complete checkpoint is never half-written; the digests catch files damaged after that.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from ..config import Config, from_dict, read_yaml, save_config
from ..errors import UserError, first_line
from ..io import atomic_write, atomic_write_text, replace_dir, sha256_file
from ..structured import StructuredFileError, load_json

STEP_DIR = re.compile(r"^step-(\d+)$")
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.yaml"
INFO_FILE = "info.json"
EMA_STATE_FILE = "ema.json"
DIGESTS = "sha256"  # info.json key: {file path relative to the checkpoint: hex digest}
# Optional info.json entries beside TrainState's: a post-hoc EMA reconstruction's sigma_rel and snapshots
# (diffusion.ema), read by whoever needs them and ignored by read_info.
EXTRA_INFO = ("posthoc_ema",)
POSTHOC_DIR = "posthoc"  # RUN/posthoc: snapshots/ (diffusion.training.phema) and reconstructions
TEMPORARY = re.compile(r"^\.(tmp|old)-")  # folders a killed save leaves (see finish_checkpoint)


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    class_names: list[str] = field(default_factory=list)


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def run_dir_of(checkpoint: Path) -> Path:
    """The run a checkpoint belongs to: RUN/checkpoints/step-N or RUN/final -> RUN."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def list_checkpoints(run_dir: str | Path, complete: bool = True) -> list[Path]:
    """Complete checkpoints of a run (with info.json; all `step-N` folders if not `complete`), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and p.is_dir() and (not complete or (p / INFO_FILE).is_file())]
    return [p for _, p in sorted(found)]


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run, for --resume auto and sampling a run folder. A newer `step-N`
    without info.json (a save never leaves one: it was damaged or copied in part) is refused in one
    line rather than skipped: falling back to an older checkpoint without a word would lose steps."""
    every = list_checkpoints(run_dir, complete=False)
    if every and not (every[-1] / INFO_FILE).is_file():
        complete = list_checkpoints(run_dir)
        older = f"pass an older one explicitly (the newest complete one is {complete[-1]})" if complete else "no older one is complete"
        raise UserError(f"the newest checkpoint {every[-1]} has no {INFO_FILE} (damaged, or copied in part); "
                        f"{older}, or move it away")
    return every[-1] if every else None


def is_checkpoint(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / EMA_FILE).is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint or a run directory (its newest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if is_checkpoint(path):
        return path
    newest = newest_checkpoint(path)
    if newest is not None:
        return newest
    if is_checkpoint(path / "final"):
        return path / "final"
    raise UserError(f"{path} is neither a checkpoint nor a run directory with checkpoints (looked for {CONFIG_FILE} and {EMA_FILE})")


def named_weights(module: torch.nn.Module, params: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """State dict of `module`, with its parameters replaced by `params` (e.g. EMA shadows) if given."""
    state = {k: v.detach() for k, v in module.state_dict().items()}
    if params is not None:
        for (name, _), value in zip(module.named_parameters(), params):
            state[name] = value.detach()
    return {k: v.to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone() for k, v in state.items()}


def describe_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor],
                      fits: Callable[[str, torch.Tensor, torch.Tensor], bool] = lambda name, found, expected: False) -> str:
    """'' when `found` has `expected`'s names and shapes (or ones `fits` accepts), else what differs, in one line."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [k for k in expected if k in found and found[k].shape != expected[k].shape
                  and not fits(k, found[k], expected[k])]
    problems = [f"{len(missing)} parameters missing from it (e.g. {missing[0]})" if missing else "",
                f"{len(unexpected)} it has that this model lacks (e.g. {unexpected[0]})" if unexpected else "",
                (f"{len(mismatched)} of another shape (e.g. {mismatched[0]}: {tuple(found[mismatched[0]].shape)} "
                 f"there, {tuple(expected[mismatched[0]].shape)} here)") if mismatched else ""]
    return "; ".join(p for p in problems if p)


def write_weights(path: Path, weights: dict[str, torch.Tensor]) -> None:
    atomic_write(path, lambda tmp: save_file(weights, str(tmp)))


def file_digests(path: Path) -> dict[str, str]:
    """sha256 of every file in the checkpoint folder `path` but info.json, by relative path."""
    return {name: sha256_file(path / name) for name in file_digests_names(path)}


def write_info(path: Path, state: TrainState, digests: dict[str, str] | None = None,
               extra: dict[str, Any] | None = None) -> None:
    """info.json: `state`, the `extra` entries (EXTRA_INFO keys) and the sha256 of every other file
    (`digests`, computed here if not given)."""
    digests = file_digests(path) if digests is None else digests
    atomic_write_text(path / INFO_FILE, json.dumps({**state.__dict__, **(extra or {}), DIGESTS: digests}, indent=2))


def _read_info_json(path: Path) -> dict[str, Any]:
    """info.json's object through the shared loader (diffusion/structured.py), a damaged file reported
    as the damaged-checkpoint message: 'cannot read PATH/info.json: <what is wrong>'."""
    try:
        return load_json(path / INFO_FILE, shape=dict, expected="a JSON object")
    except StructuredFileError as err:
        raise UserError(f"cannot read {path / INFO_FILE}: {err.reason}; the file was edited or damaged") from None
    except UserError as err:  # not a regular file, or unreadable (permissions)
        raise UserError(f"cannot read {path / INFO_FILE}: {err}") from None


# Unverifiable checkpoints (no info.json, no or partial sha256 list) are refused unless the command
# was given --trust-checkpoint, which sets this for the process (every loader below reads it).
_trusted = False


def trust_checkpoints(on: bool = True) -> None:
    """--trust-checkpoint: load checkpoints whose files info.json does not (all) list. Files it lists
    are still checked."""
    global _trusted
    _trusted = on


TRUST_HINT = "pass --trust-checkpoint only if you trust where it came from"


def read_info(path: Path) -> TrainState:
    """info.json's training state, its fields checked against their kinds and against the folder name."""
    if not (path / INFO_FILE).is_file() and _trusted:
        return TrainState()
    data = _read_info_json(path)
    for key in (DIGESTS, *EXTRA_INFO):
        data.pop(key, None)
    try:
        state = TrainState(**data)
    except TypeError as err:
        raise UserError(f"cannot read {path / INFO_FILE}: {first_line(err)}") from None
    counters = {"step": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch}
    wrong = [k for k, v in counters.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    if wrong or not isinstance(state.class_names, list) or not all(isinstance(n, str) for n in state.class_names):
        what = f"'{wrong[0]}' is not a whole number >= 0" if wrong else "'class_names' is not a list of names"
        raise UserError(f"cannot read {path / INFO_FILE}: {what}; the file was edited or damaged")
    named = STEP_DIR.match(path.name)
    if named and int(named.group(1)) != state.step:
        raise UserError(f"{path / INFO_FILE} says step {state.step} but the checkpoint is {path.name}: info.json was "
                        "edited or moved; use an earlier checkpoint")
    return state


def verify_digests(path: Path, names: list[str] | None = None) -> None:
    """Refuse a checkpoint whose files (`names`: the ones the caller reads; default every file info.json
    lists and every file of the checkpoint) differ from the sha256 recorded when it was saved: a flipped
    byte in weights would otherwise load and train or sample without complaint. Fails closed: a file to
    be read that info.json does not list, or a checkpoint with no info.json or no digests, is refused
    too (unless --trust-checkpoint); a listed file that is missing always is."""
    if not (path / INFO_FILE).is_file():
        if _trusted:
            return
        raise UserError(f"checkpoint {path} has no {INFO_FILE}, so its files cannot be checked; use a checkpoint "
                        f"train.py wrote, or {TRUST_HINT}")
    digests = _read_info_json(path).get(DIGESTS) or {}
    if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
        raise UserError(f"cannot read {path / INFO_FILE}: its {DIGESTS} entry is not a mapping of file to digest")
    if not digests and not _trusted:
        raise UserError(f"checkpoint {path} records no sha256 of its files (saved by an older version, or its "
                        f"{INFO_FILE} was edited), so they cannot be checked; {TRUST_HINT}")
    if names is None:
        names = sorted({*digests, *file_digests_names(path)})
    for name in names:
        expected = digests.get(name)
        if not (path / name).is_file():
            if expected is None and _trusted:
                continue
            raise UserError(f"checkpoint {path} is incomplete: {name} is missing; use an earlier checkpoint")
        if expected is None:
            if _trusted:
                continue
            raise UserError(f"checkpoint {path}: {INFO_FILE} records no sha256 for {name} (added, or its digest "
                            f"removed, after the save); use an earlier checkpoint, or {TRUST_HINT}")
        if sha256_file(path / name) != expected:
            raise UserError(f"checkpoint {path} is damaged: sha256 mismatch in {name} (it changed after it was "
                            "saved); use an earlier checkpoint (RUN/checkpoints/step-N)")


def file_digests_names(path: Path) -> list[str]:
    """The files `file_digests` would list: every file of the checkpoint folder but info.json."""
    return [p.relative_to(path).as_posix() for p in sorted(path.rglob("*")) if p.is_file() and p != path / INFO_FILE]


def read_config(path: Path, check: bool = True) -> Config:
    """The checkpoint's config.yaml, after checking its sha256 (an edited prediction_type would
    otherwise sample with the wrong parameterisation)."""
    if check:
        verify_digests(path, [CONFIG_FILE])
    return from_dict(Config, read_yaml(path / CONFIG_FILE))


def read_weights(path: Path, check: bool = True) -> dict[str, torch.Tensor]:
    """The EMA weights of checkpoint `path`, after checking their sha256 (`check=False`: the caller
    has just verified every file of the checkpoint)."""
    if check:
        verify_digests(path, [EMA_FILE])
    try:
        return load_file(str(path / EMA_FILE))
    except Exception as err:
        raise UserError(f"cannot read weights {path / EMA_FILE}: {err}") from None


def finish_checkpoint(tmp: Path, final: Path, cfg: Config, state: TrainState, keep: int,
                      extra: dict[str, Any] | None = None) -> None:
    """Write config and info (with every file's sha256, and `extra` entries) into `tmp`, fsync it, move
    it into place (replacing an old `final` atomically), and prune old checkpoints: all but the newest
    `keep`, except the steps listed in train.keep_checkpoint_steps (e.g. an early autoguidance guide)."""
    save_config(cfg, tmp / CONFIG_FILE)
    write_info(tmp, state, file_digests(tmp), extra)
    replace_dir(tmp, final)
    if keep > 0:
        for old in prunable(list_checkpoints(final.parent.parent), keep, cfg.train.keep_checkpoint_steps):
            shutil.rmtree(old, ignore_errors=True)


def prunable(checkpoints: list[Path], keep: int, kept_steps: list[int]) -> list[Path]:
    """The checkpoints (oldest first) that rotation deletes: all but the newest `keep`, less the listed steps."""
    listed = set(kept_steps)
    return [p for p in checkpoints[:-keep] if int(STEP_DIR.match(p.name).group(1)) not in listed]


def remove_crash_residue(run_dir: str | Path) -> list[Path]:
    """Delete the `.tmp-*` folders a killed save left in a run (and its checkpoints folder); put back an
    `.old-NAME` folder whose replacement never arrived, else delete it. Only while no other process
    writes the run (under its lock). Returns what was removed."""
    removed = []
    for parent in (Path(run_dir), checkpoint_root(run_dir), Path(run_dir) / POSTHOC_DIR,
                   Path(run_dir) / POSTHOC_DIR / "snapshots"):
        if not parent.is_dir():
            continue
        for path in sorted(parent.iterdir()):
            if not (path.is_dir() and TEMPORARY.match(path.name)):
                continue
            original = path.with_name(path.name[len(".old-"):])
            if path.name.startswith(".old-") and not original.exists():
                path.rename(original)
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def load_payload(path: Path) -> dict[str, Any]:
    return {"config": read_config(path), "info": read_info(path), "weights": read_weights(path)}
