"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2, Section 3 and Appendix C): power-function EMA profiles tracked during training, their
snapshots, and the least-squares solve that reconstructs any other profile from the snapshots.

A power-function EMA at time t averages the weights of times tau in [0, t] with density
p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1). Its relative width sigma_rel (the profile's standard
deviation over t) fixes gamma (`gamma_from_sigma_rel`). Time is counted here in optimizer steps,
t = 1, 2, ... (EDM2 counts images; the profiles and the solve depend only on ratios of times, so the
reconstruction is the same up to that unit). Tracked with beta_t = (1 - 1/t)^(gamma + 1) per step, the
weights theta_s of step s get exactly the mass of p over [s - 1, s]: the discrete EMA *is* the
continuous profile applied to the step-wise constant weight trajectory, which is what makes the
reconstruction exact in the span of the snapshots.

The math is done in float64 (numpy), as EDM2 does.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch

MAX_SIGMA_REL = 1 / math.sqrt(12)  # gamma = 0 (a uniform average); beyond it gamma < 0
SNAPSHOT_DIR = Path("posthoc") / "snapshots"  # inside the run folder
SNAPSHOT_FILE = "phema.safetensors"  # in each RUN/posthoc/snapshots/step-N/, beside info.json
STATE_FILE = "phema.safetensors"  # the live profiles in a checkpoint (float32), beside phema.json
STATE_INFO = "phema.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


# -- the math (float64) ------------------------------------------------------------------------

def sigma_rel_from_gamma(gamma: float) -> float:
    """The relative standard deviation of the power-function profile of exponent `gamma` (EDM2 eq. 123)."""
    g = np.float64(gamma)
    return float(np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))))


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent whose profile has relative width `sigma_rel` (0 < sigma_rel < 1/sqrt(12)): the
    largest real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) (EDM2 eq. 126, Alg. 2)."""
    inv = np.float64(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots.real[np.abs(roots.imag) < 1e-9].max())


def beta(gamma: float, t: int) -> float:
    """The EMA decay at step t (1-based): (1 - 1/t)^(gamma + 1); 0 at t = 1 (the profile starts as the weights)."""
    return float((1.0 - 1.0 / np.float64(t)) ** (np.float64(gamma) + 1.0))


def profile_dot(t_a, g_a, t_b, g_b) -> np.ndarray:
    """Inner products <p_a, p_b> of power-function profiles ending at times t_a, t_b with exponents
    g_a, g_b (broadcast; EDM2 eq. 151): (g_a+1)(g_b+1)/(g_a+g_b+1) * (t_min/t_max)^g_of_t_max / t_max."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, g_a, t_b, g_b))
    t_max = np.maximum(t_a, t_b)
    g_max = np.where(t_a < t_b, g_b, g_a)
    ratio = np.minimum(t_a, t_b) / t_max
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * ratio ** g_max / t_max


def solve_weights(in_t, in_gamma, out_t: float, out_gamma) -> tuple[np.ndarray, np.ndarray, float]:
    """EDM2's Algorithm 3: coefficients X[i, j] of snapshot i for output profile j, the least-squares
    fit of the output profiles by the snapshot profiles in L2, normalised to sum to 1 per output.

    Returns (X, relative residual per output ||sum_i X_ij p_i - p_j|| / ||p_j||, condition number of
    the snapshots' Gram matrix)."""
    in_t = np.asarray(in_t, dtype=np.float64).reshape(-1, 1)
    in_gamma = np.asarray(in_gamma, dtype=np.float64).reshape(-1, 1)
    out_gamma = np.asarray(out_gamma, dtype=np.float64).reshape(1, -1)
    out_t_row = np.full_like(out_gamma, np.float64(out_t))
    gram = profile_dot(in_t, in_gamma, in_t.T, in_gamma.T)
    cross = profile_dot(in_t, in_gamma, out_t_row, out_gamma)
    x = np.linalg.solve(gram, cross)
    x = x / np.sum(x, axis=0, keepdims=True)
    target = profile_dot(out_t_row, out_gamma, out_t_row, out_gamma)[0]
    err2 = np.einsum("ij,ik,kj->j", x, gram, x) - 2 * np.sum(x * cross, axis=0) + target
    residual = np.sqrt(np.maximum(err2, 0.0) / target)
    return x, residual, float(np.linalg.cond(gram))


# -- tracking during training ------------------------------------------------------------------

def profile_key(sigma_rel: float) -> str:
    return f"sigma_rel-{sigma_rel:.3f}"


class PowerEMA:
    """The power-function EMA profiles of a model's parameters (float32 by default, on the model's device)."""

    def __init__(self, params: list[torch.Tensor], sigma_rels: list[float], dtype: torch.dtype = torch.float32):
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [gamma_from_sigma_rel(s) for s in self.sigma_rels]
        self.dtype = dtype
        self.shadows = [[p.detach().to(dtype).clone() for p in params] for _ in self.sigma_rels]
        self.step = 0

    @torch.no_grad()
    def update(self, params: list[torch.Tensor], step: int) -> None:
        """Fold in the weights after optimizer step `step` (1-based)."""
        current = [p.detach().to(self.dtype) for p in params]
        for gamma, shadows in zip(self.gammas, self.shadows):
            torch._foreach_lerp_(shadows, current, 1.0 - beta(gamma, step))
        self.step = step

    def state(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Every profile's tensors by `PROFILE/parameter name`, on the CPU, for a checkpoint."""
        return {f"{profile_key(s)}/{n}": t.detach().cpu().contiguous().clone()
                for s, shadows in zip(self.sigma_rels, self.shadows) for n, t in zip(names, shadows)}

    def info(self) -> dict:
        return {"sigma_rels": self.sigma_rels, "gammas": self.gammas, "step": self.step, "t_unit": "optimizer steps"}

    def load(self, tensors: dict[str, torch.Tensor], names: list[str], step: int) -> None:
        """Restore the profiles from `state()`'s tensors (missing or misshapen ones raise KeyError/ValueError)."""
        for s, shadows in zip(self.sigma_rels, self.shadows):
            for n, shadow in zip(names, shadows):
                value = tensors[f"{profile_key(s)}/{n}"]
                if value.shape != shadow.shape:
                    raise ValueError(f"{profile_key(s)}/{n} has shape {tuple(value.shape)}, not {tuple(shadow.shape)}")
                shadow.copy_(value)
        self.step = step


# -- snapshots in the run folder ---------------------------------------------------------------

def snapshot_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR


def snapshot_steps(run_dir: str | Path, complete: bool = True) -> list[tuple[int, Path]]:
    """(step, folder) of the run's snapshots, oldest first (complete: with info.json)."""
    root = snapshot_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and p.is_dir() and (not complete or (p / "info.json").is_file())]
    return sorted(found)


def remove_snapshots_after(run_dir: str | Path, step: int) -> list[int]:
    """Delete the snapshots a killed run wrote after `step` (the step a resumed run continues from):
    the resumed run writes them again, from the same weights. Returns their steps."""
    removed = []
    for s, path in snapshot_steps(run_dir, complete=False):
        if s > step:
            shutil.rmtree(path)
            removed.append(s)
    return removed


def snapshot_bytes(params: list[torch.Tensor], profiles: int, fp16: bool) -> int:
    """The size of one snapshot's weights on disk (the safetensors header aside)."""
    per_value = 2 if fp16 else 4
    return profiles * sum(p.numel() for p in params) * per_value


def disk_note(params: list[torch.Tensor], sigma_rels: list[float], every: int, max_steps: int, fp16: bool,
              run_dir: Path) -> str:
    """The line training prints at its start: what each snapshot costs on disk, and the whole run."""
    size = snapshot_bytes(params, len(sigma_rels), fp16)
    count = max_steps // every + (1 if max_steps % every else 0)
    profiles = ", ".join(f"{s:.3f}" for s in sigma_rels)
    return (f"post-hoc EMA: sigma_rel {profiles} tracked (t in optimizer steps); a snapshot every {every} steps "
            f"({'fp16' if fp16 else 'fp32'}) takes {size / 1e6:.2f} MB, {count} to step {max_steps}: "
            f"{count * size / 1e6:.1f} MB in {run_dir / SNAPSHOT_DIR}")


def write_snapshot(run_dir: Path, ema: PowerEMA, core: torch.nn.Module, fp16: bool, extra: dict,
                   process_index: int = 0) -> Path:
    """RUN/posthoc/snapshots/step-N/: every profile's full state dict (buffers from `core`) in one
    safetensors file, the config, and info.json with the sha256 of both, written under a temporary
    name and renamed into place. A snapshot of this step must not exist yet (a resume removes the ones
    after its checkpoint), so a second writer fails loudly instead of silently rewriting."""
    from safetensors.torch import save_file

    from ..checkpoints import store

    final = snapshot_root(run_dir) / f"step-{ema.step:06d}"
    if final.exists():
        raise RuntimeError(f"post-hoc EMA snapshot {final} was already written (a second writer?)")
    tmp = final.with_name(f".tmp-{final.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weights = {}
    for sigma_rel, shadows in zip(ema.sigma_rels, ema.shadows):
        named = store.named_weights(core, shadows)
        for name, value in named.items():
            if fp16 and value.is_floating_point():
                value = value.to(torch.float16)
            weights[f"{profile_key(sigma_rel)}/{name}"] = value
    save_file(weights, str(tmp / SNAPSHOT_FILE), metadata={"step": str(ema.step)})
    info = {**extra, **ema.info(), "dtype": "float16" if fp16 else "float32", "process_index": process_index}
    files = [SNAPSHOT_FILE]
    if (run_dir / store.CONFIG_FILE).is_file():
        shutil.copyfile(run_dir / store.CONFIG_FILE, tmp / store.CONFIG_FILE)
        files.append(store.CONFIG_FILE)
    from ..io import atomic_write_text, replace_dir, sha256_file

    info[store.DIGESTS] = {name: sha256_file(tmp / name) for name in files}
    atomic_write_text(tmp / store.INFO_FILE, json.dumps(info, indent=2))
    replace_dir(tmp, final)
    return final


def save_state(directory: Path, ema: PowerEMA, names: list[str]) -> None:
    """The live profiles into a checkpoint folder (its info.json's sha256 list then covers them)."""
    from ..checkpoints.store import write_weights
    from ..io import atomic_write_text

    write_weights(directory / STATE_FILE, ema.state(names))
    atomic_write_text(directory / STATE_INFO, json.dumps(ema.info(), indent=2))


def load_state(directory: Path, ema: PowerEMA, names: list[str], step: int) -> None:
    """Restore the live profiles from checkpoint `directory` (its files already checked against their
    sha256), refusing in one line a checkpoint without them or with other profiles."""
    from safetensors.torch import load_file

    from ..errors import UserError, first_line
    from ..structured import load_json

    if not (directory / STATE_FILE).is_file() or not (directory / STATE_INFO).is_file():
        raise UserError(f"cannot resume from {directory} with train.posthoc_ema=true: the checkpoint holds no "
                        "post-hoc EMA profiles (its run was trained without them, and a profile must start at "
                        "step 0); resume with train.posthoc_ema=false, or start a new run")
    saved = load_json(directory / STATE_INFO, shape=dict, expected="a JSON object")
    there = [round(float(s), 6) for s in saved.get("sigma_rels", [])]
    here = [round(s, 6) for s in ema.sigma_rels]
    if there != here:
        raise UserError(f"cannot resume from {directory}: it tracked post-hoc EMA sigma_rels {there}, this config "
                        f"{here}; resume with train.posthoc_ema_sigma_rels={there}")
    if saved.get("step") != step:
        raise UserError(f"cannot resume from {directory}: {STATE_INFO} says step {saved.get('step')!r} but the "
                        f"checkpoint is at step {step}; one of them was edited")
    try:
        ema.load(load_file(str(directory / STATE_FILE)), names, step)
    except (KeyError, ValueError, OSError) as err:
        raise UserError(f"cannot resume from {directory}: {STATE_FILE} does not fit this model "
                        f"({first_line(err)}); resume with the run's own config") from None
