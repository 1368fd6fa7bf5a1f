"""Reconstruct post-hoc EMAs from a run's snapshots (EDM2's Algorithm 3), and write each as a normal
checkpoint (the format of RUN/final: ema.safetensors, config.yaml, info.json with every file's sha256,
and for denoisers the plain-diffusers unet/ and scheduler/), so sample.py, evaluate, the demo and the
diffusers pipeline load it unchanged.

The solve (diffusion.training.phema.solve_weights) fits the wanted profile by the snapshots' profiles
in L2; how much of it the fit leaves unexplained (the relative residual) says whether the snapshots
can express that sigma_rel at all. Above --max-residual, or with a singular Gram matrix, the command
refuses rather than write a checkpoint that is some other EMA.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checkpoints import store
from ..config import Config, from_dict, read_yaml
from ..errors import UserError, first_line, preview
from ..io import check_output_path, sha256_file
from ..structured import StructuredFileError, load_json
from ..training import phema

MAX_CONDITION = 1e12  # beyond it float64 keeps too few digits of the coefficients
DEFAULT_MAX_RESIDUAL = 0.25


@dataclass
class Snapshot:
    step: int
    path: Path
    sigma_rels: list[float]
    gammas: list[float]
    info: dict


def folder_name(sigma_rel: float, step: int | None) -> str:
    """sigma_rel-0.100 (at the last snapshot), sigma_rel-0.100-step-000500 (--step before it)."""
    return f"sigma_rel-{sigma_rel:.3f}" + (f"-step-{step:06d}" if step is not None else "")


def run_config(run: Path) -> Config:
    """The run's config.yaml, checked (damaged or foreign files in one line)."""
    if not run.is_dir():
        raise UserError(f"run folder not found: {run}; give the output_dir of a training run")
    if not (run / store.CONFIG_FILE).is_file():
        raise UserError(f"{run} is not a run folder (no {store.CONFIG_FILE}): give the output_dir of a training run")
    return from_dict(Config, read_yaml(run / store.CONFIG_FILE))


def read_snapshot(step: int, path: Path) -> Snapshot:
    """A snapshot's info.json, its profiles checked against the file names it records."""
    try:
        info = load_json(path / store.INFO_FILE, shape=dict, expected="a JSON object")
    except StructuredFileError as err:
        raise UserError(f"cannot read {path / store.INFO_FILE}: {err.reason}; move the damaged snapshot away") from None
    sigmas = info.get("sigma_rels")
    if (not isinstance(sigmas, list) or not sigmas or info.get("step") != step
            or not all(isinstance(s, (int, float)) and 0 < s < phema.MAX_SIGMA_REL for s in sigmas)):
        raise UserError(f"{path / store.INFO_FILE} does not describe a post-hoc EMA snapshot of step {step} (edited or "
                        "damaged); move it away")
    return Snapshot(step, path, [float(s) for s in sigmas], [phema.gamma_from_sigma_rel(s) for s in sigmas], info)


def list_snapshots(run: Path, cfg: Config) -> list[Snapshot]:
    """The run's complete snapshots, oldest first; a run without any is refused in one line."""
    found = phema.snapshot_steps(run)
    if not found:
        if not cfg.train.posthoc_ema:
            raise UserError(f"{run} was trained without train.posthoc_ema, so it has no snapshots to reconstruct "
                            "from: train with train.posthoc_ema=true (docs/training.md#post-hoc-ema)")
        raise UserError(f"{run} has no post-hoc EMA snapshots yet (the first is written at step "
                        f"{cfg.train.posthoc_ema_every}, train.posthoc_ema_every): train longer, or snapshot more often")
    return [read_snapshot(step, path) for step, path in found]


def choose(snapshots: list[Snapshot], step: int | None) -> list[Snapshot]:
    """The snapshots up to `step` (a snapshot step; default the last)."""
    steps = [s.step for s in snapshots]
    if step is None:
        return snapshots
    if step < steps[0]:
        raise UserError(f"--step {step} is before the first post-hoc EMA snapshot (step {steps[0]}): give a snapshot "
                        f"step from {steps[0]} to {steps[-1]}")
    if step not in steps:
        below = max(s for s in steps if s < step)
        above = [s for s in steps if s > step]
        near = f"{below}" + (f" or {above[0]}" if above else "")
        raise UserError(f"--step {step} is not a snapshot step (the EMA there would need weights no snapshot holds): "
                        f"give {near}")
    return [s for s in snapshots if s.step <= step]


def solve(chosen: list[Snapshot], sigma_rels: list[float], max_residual: float) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients [snapshot profile, output] and each output's relative residual; refuses a sigma_rel
    the snapshots cannot express."""
    in_t = [s.step for s in chosen for _ in s.sigma_rels]
    in_g = [g for s in chosen for g in s.gammas]
    out_g = [phema.gamma_from_sigma_rel(s) for s in sigma_rels]
    tracked = sorted({round(x, 3) for s in chosen for x in s.sigma_rels})
    where = (f"the {len(chosen)} snapshots up to step {chosen[-1].step} (tracked sigma_rel "
             f"{', '.join(f'{x:.3f}' for x in tracked)})")
    try:
        x, residual, condition = phema.solve_weights(in_t, in_g, chosen[-1].step, out_g)
    except np.linalg.LinAlgError:
        condition, x, residual = np.inf, None, None
    if not np.isfinite(condition) or condition > MAX_CONDITION or x is None or not np.isfinite(x).all():
        raise UserError(f"the least-squares solve over {where} is ill-conditioned (condition number "
                        f"{condition:.3g} > {MAX_CONDITION:.0e}): two snapshots hold the same profile; "
                        "move duplicate snapshots away")
    worst = int(np.argmax(residual / np.maximum(max_residual, 1e-300)))
    if residual[worst] > max_residual:
        raise UserError(f"sigma_rel {sigma_rels[worst]:.3f} is outside what {where} can express: the fit leaves "
                        f"{residual[worst]:.0%} of its profile unexplained (limit {max_residual:.0%}, --max-residual); "
                        "choose a sigma_rel nearer the tracked ones, an earlier --step with more snapshots behind "
                        "it, or train with a smaller train.posthoc_ema_every")
    return x, residual


def check_snapshot_file(snap: Snapshot) -> Path:
    """The snapshot's weights file after checking it against the sha256 its info.json records."""
    file = snap.path / phema.SNAPSHOT_FILE
    digests = snap.info.get(store.DIGESTS) or {}
    if not file.is_file():
        raise UserError(f"snapshot {snap.path} is incomplete: {phema.SNAPSHOT_FILE} is missing; move it away")
    if not isinstance(digests, dict) or sha256_file(file) != digests.get(phema.SNAPSHOT_FILE):
        raise UserError(f"snapshot {snap.path} is damaged: sha256 mismatch in {phema.SNAPSHOT_FILE} (it changed "
                        "after it was saved); move it away and reconstruct from the others")
    return file


def snapshot_config(run: Path, snap: Snapshot, cfg: Config) -> Config:
    """The config the snapshot was written under (checked against its sha256), else the run's."""
    path = snap.path / store.CONFIG_FILE
    if not path.is_file():
        return cfg
    if sha256_file(path) != (snap.info.get(store.DIGESTS) or {}).get(store.CONFIG_FILE):
        raise UserError(f"snapshot {snap.path} is damaged: sha256 mismatch in {store.CONFIG_FILE}; move it away")
    return from_dict(Config, read_yaml(path))


def accumulate(chosen: list[Snapshot], x: np.ndarray, outputs: int, progress: bool) -> list[dict]:
    """sum_i X[i, j] * snapshot profile i, for every output j, in float64 (one pass over the files)."""
    import torch
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    sums: list[dict] = [{} for _ in range(outputs)]
    row = 0
    for snap in tqdm(chosen, desc="post-hoc EMA", unit="snapshot", disable=not progress):
        try:
            tensors = load_file(str(check_snapshot_file(snap)))
        except UserError:
            raise
        except Exception as err:  # a truncated or foreign file whose digest was forged
            raise UserError(f"cannot read snapshot {snap.path}: {first_line(err)}; move it away") from None
        for sigma in snap.sigma_rels:
            prefix = f"{phema.profile_key(sigma)}/"
            profile = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if not profile:
                raise UserError(f"snapshot {snap.path} lacks the profile {prefix[:-1]} its info.json lists; move it away")
            for j in range(outputs):
                coef = float(x[row, j])
                for name, value in profile.items():
                    if not value.is_floating_point():
                        sums[j][name] = value  # integer buffers: as the newest snapshot has them
                        continue
                    if name in sums[j] and sums[j][name].shape != value.shape:
                        raise UserError(f"snapshot {snap.path}: {name} has shape {tuple(value.shape)}, not "
                                        f"{tuple(sums[j][name].shape)} as in the earlier snapshots; the model changed")
                    add = value.to(torch.float64) * coef
                    sums[j][name] = sums[j][name] + add if name in sums[j] else add
            row += 1
    return [{k: (v.to(torch.float32) if v.is_floating_point() else v).contiguous() for k, v in s.items()} for s in sums]


def write_checkpoint(final: Path, cfg: Config, weights: dict, state: store.TrainState, extra: dict) -> Path:
    """A checkpoint in RUN/final's format at `final` (atomically; an old one there is replaced)."""
    from ..training.tasks import build_task

    tmp = final.with_name(f".tmp-{final.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        store.write_weights(tmp / store.EMA_FILE, weights)
        if cfg.task == "denoiser":  # the plain-diffusers export of final/ (classifiers' export re-evaluates them)
            task = build_task(cfg)
            model = task.build_model()
            problem = store.describe_mismatch(model.state_dict(), weights)
            if problem:
                raise UserError(f"the snapshots do not fit the model their config describes: {problem}")
            model.load_state_dict(weights)
            task.export(model.eval(), tmp)
        store.finish_checkpoint(tmp, final, cfg, state, keep=0, extra={"posthoc_ema": extra})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def output_root(run: Path, out: str | None) -> Path:
    """--out (default RUN/posthoc), checked like every output unless it is the run's own posthoc/."""
    own = run / store.POSTHOC_DIR
    if out is None:
        return own
    path = Path(out)
    real, home = path.resolve(), own.resolve()
    if real == home or home in real.parents:
        return path
    return check_output_path(out, "--out")


def reconstruct(run: str | Path, sigma_rels: list[float], step: int | None = None, out: str | None = None,
                max_residual: float = DEFAULT_MAX_RESIDUAL, progress: bool = True) -> list[Path]:
    """Write one checkpoint per sigma_rel, reconstructed from the snapshots up to `step`; returns them."""
    run = Path(run)
    cfg = run_config(run)
    root = output_root(run, out)
    snapshots = list_snapshots(run, cfg)
    chosen = choose(snapshots, step)
    x, residual = solve(chosen, sigma_rels, max_residual)
    last = chosen[-1]
    model_cfg = snapshot_config(run, last, cfg)
    weights = accumulate(chosen, x, len(sigma_rels), progress)
    used = [{"step": s.step, "sigma_rels": s.sigma_rels, "dtype": s.info.get("dtype", "float32")} for s in chosen]
    state = store.TrainState(step=last.step, class_names=list(last.info.get("class_names", [])))
    written = []
    for j, sigma in enumerate(sigma_rels):
        name = folder_name(sigma, None if last.step == snapshots[-1].step else last.step)
        coefficients = [round(float(c), 12) for c in x[:, j]]
        extra = {"sigma_rel": sigma, "gamma": phema.gamma_from_sigma_rel(sigma), "step": last.step,
                 "t_unit": "optimizer steps", "relative_residual": float(residual[j]), "snapshots": used,
                 "coefficients": coefficients}
        written.append(write_checkpoint(root / name, model_cfg, weights[j], state, extra))
    return written


def raw_weights(run: str | Path, step: int | None = None, out: str | None = None) -> Path:
    """The raw (not averaged) weights of checkpoint `step` (default the newest) as a checkpoint in final/'s
    format, RUN/posthoc/raw-step-N: the no-EMA row of a comparison."""
    from safetensors.torch import load_file

    from ..training.preflight import STATE_DIR

    run = Path(run)
    run_config(run)
    root = output_root(run, out)
    checkpoints = store.list_checkpoints(run)
    if step is not None:
        checkpoints = [c for c in checkpoints if store.read_info(c).step == step]
    if not checkpoints:
        which = f"at step {step}" if step is not None else "at all"
        raise UserError(f"{run} has no checkpoint {which} (RUN/checkpoints/step-N): the raw weights are in checkpoints")
    source = checkpoints[-1]
    store.verify_digests(source)
    try:
        raw = load_file(str(source / STATE_DIR / "model.safetensors"))
    except Exception as err:
        raise UserError(f"cannot read the raw weights of {source}: {first_line(err)}") from None
    strip = ("_orig_mod.", "module.")
    weights = {}
    for name, value in raw.items():
        while name.startswith(strip):
            name = next(name[len(p):] for p in strip if name.startswith(p))
        weights[name] = value.to(dtype=value.dtype).contiguous()
    info = store.read_info(source)
    state = store.TrainState(step=info.step, epoch=info.epoch, batch_in_epoch=info.batch_in_epoch,
                             class_names=info.class_names)
    extra = {"raw_weights": True, "step": info.step, "source": str(source)}
    return write_checkpoint(root / f"raw-step-{info.step:06d}", store.read_config(source, check=False), weights,
                            state, extra)


def parse_sigma_rels(text: str) -> list[float]:
    """'0.02,0.05,0.10' -> sorted distinct values, each a usable sigma_rel; anything else one line."""
    from .settings import sigma_rel_problem

    items = [item.strip() for item in str(text).split(",")]
    if not text.strip() or any(not item for item in items):
        raise UserError(f"--sigma-rel {preview(text)} is not a comma-separated list of numbers (e.g. 0.05,0.10)")
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise UserError(f"--sigma-rel: {preview(item)} is not a number; give e.g. 0.05,0.10") from None
        problem = sigma_rel_problem(value)
        if problem:
            raise UserError(f"--sigma-rel: {problem}")
        values.append(value)
    if len({round(v, 3) for v in values}) != len(values):
        raise UserError(f"--sigma-rel {preview(text)} repeats a value (to 3 decimals, as the folders name them)")
    return sorted(values)


def summary(paths: list[Path]) -> list[str]:
    """One line per written checkpoint: where, sigma_rel, step, residual."""
    lines = []
    for path in paths:
        data = json.loads((path / store.INFO_FILE).read_text())["posthoc_ema"]
        if data.get("raw_weights"):
            lines.append(f"{path}: raw weights of step {data['step']} ({data['source']})")
            continue
        lines.append(f"{path}: sigma_rel {data['sigma_rel']:.3f} at step {data['step']} from "
                     f"{len(data['snapshots'])} snapshots (fit residual {data['relative_residual']:.2%})")
    return lines
