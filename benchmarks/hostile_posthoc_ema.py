"""The hostile-input drill's post-hoc EMA cases (issue 32): `python -m diffusion.ema reconstruct` on bad
runs, steps and sigma_rel lists, and the config keys of train.posthoc_ema and train.keep_checkpoint_steps.
The cases share one tiny run trained with train.posthoc_ema=true (snapshots at steps 2, 4, 6), built
once under the drill's root (a lock keeps parallel workers from building it twice) and copied where
a case changes it."""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.hostile_env import Case, Env, Result, train_argv
from tests.conftest import ROOT, TINY


def phema_run(env: Env) -> Path:
    """The shared posthoc run (6 steps, a snapshot every 2), trained on first use."""
    run = env.root / "phema_run"
    with open(env.root / ".phema_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (run / "final").is_dir():
            shutil.rmtree(run, ignore_errors=True)
            subprocess.run([sys.executable, "train.py", "configs/shapes.yaml", *TINY, "train.max_steps=6",
                            "train.posthoc_ema=true", "train.posthoc_ema_every=2", f"output_dir={run}"],
                           cwd=ROOT, check=True, capture_output=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    return run


def copy(env: Env, folder: Path) -> Path:
    target = folder / "phema"
    if not target.exists():
        shutil.copytree(phema_run(env), target)
    return target


def reconstruct_argv(*extra: str, run: str = "{phema}"):
    """`python -m diffusion.ema reconstruct RUN ...`; {phema}: the shared posthoc run, {copy}: a copy of it."""
    def argv(env: Env, folder: Path) -> list[str]:
        fill = {"run": env.run, "folder": folder, "phema": phema_run(env) if "{phema}" in run + " ".join(extra) else "",
                "copy": folder / "phema"}
        return ["python", "-m", "diffusion.ema", "reconstruct", run.format(**fill), "--no-progress",
                *(e.format(**fill) for e in extra)]
    return argv


def without_snapshots(env: Env, folder: Path) -> None:
    shutil.rmtree(copy(env, folder) / "posthoc" / "snapshots")


def damaged_snapshot(env: Env, folder: Path) -> None:
    file = copy(env, folder) / "posthoc" / "snapshots" / "step-000004" / "phema.safetensors"
    data = bytearray(file.read_bytes())
    data[-1] ^= 1
    file.write_bytes(bytes(data))


def reconstructed(env: Env, folder: Path, result: Result) -> str | None:
    made = folder / "phema" / "posthoc" / "sigma_rel-0.070" / "ema.safetensors"
    return None if made.is_file() and "sigma_rel 0.070 at step 6" in result.out else "no checkpoint written"


def case(name: str, argv, words: str | None, **kw) -> Case:
    return Case("post-hoc EMA", name, argv, words, quick=False, **kw)


POSTHOC_EMA_CASES = [
    case("reconstruct: a run trained without posthoc_ema", reconstruct_argv("--sigma-rel", "0.1", run="{run}"),
         "trained without train.posthoc_ema"),
    case("reconstruct: a run with no snapshots", reconstruct_argv("--sigma-rel", "0.1", run="{copy}"),
         "no post-hoc EMA snapshots yet", prepare=without_snapshots),
    case("reconstruct: a missing run folder", reconstruct_argv("--sigma-rel", "0.1", run="{folder}/nowhere"),
         "run folder not found"),
    case("reconstruct: a folder that is no run", reconstruct_argv("--sigma-rel", "0.1", run="{folder}"),
         "is not a run folder"),
    case("reconstruct: --step before the first snapshot", reconstruct_argv("--sigma-rel", "0.1", "--step", "1"),
         "before the first post-hoc EMA snapshot"),
    case("reconstruct: --step between snapshots", reconstruct_argv("--sigma-rel", "0.1", "--step", "3"),
         "not a snapshot step"),
    case("reconstruct: --step 0", reconstruct_argv("--sigma-rel", "0.1", "--step", "0"), "--step"),
    case("reconstruct: --step abc", reconstruct_argv("--sigma-rel", "0.1", "--step", "abc"), "--step"),
    case("reconstruct: --sigma-rel abc", reconstruct_argv("--sigma-rel", "abc"), "is not a number"),
    case("reconstruct: --sigma-rel 0.05,,0.1", reconstruct_argv("--sigma-rel", "0.05,,0.1"), "comma-separated"),
    case("reconstruct: --sigma-rel 0", reconstruct_argv("--sigma-rel", "0"), "outside (0, 0.2887)"),
    case("reconstruct: --sigma-rel 0.3", reconstruct_argv("--sigma-rel", "0.3"), "outside (0, 0.2887)"),
    case("reconstruct: --sigma-rel -0.1", reconstruct_argv("--sigma-rel=-0.1"), "outside (0, 0.2887)"),
    case("reconstruct: --sigma-rel nan", reconstruct_argv("--sigma-rel", "nan"), "not a finite number"),
    case("reconstruct: --sigma-rel 0.1,0.1", reconstruct_argv("--sigma-rel", "0.1,0.1"), "repeats a value"),
    case("reconstruct: no --sigma-rel", reconstruct_argv(), "--sigma-rel"),
    case("reconstruct: sigma_rel 0.01 beyond the snapshots", reconstruct_argv("--sigma-rel", "0.01"),
         "can express"),
    case("reconstruct: --max-residual 2", reconstruct_argv("--sigma-rel", "0.1", "--max-residual", "2"),
         "--max-residual must be in (0, 1]"),
    case("reconstruct: a damaged snapshot", reconstruct_argv("--sigma-rel", "0.1", run="{copy}"),
         "sha256 mismatch", prepare=damaged_snapshot),
    case("reconstruct: --out inside a checkpoint",
         reconstruct_argv("--sigma-rel", "0.1", "--out", "{run}/checkpoints/step-000004/x"), "choose a folder outside it"),
    case("reconstruct: sigma_rel 0.07 works", reconstruct_argv("--sigma-rel", "0.07", run="{copy}"), None, status=0,
         prepare=lambda env, folder: copy(env, folder) and None, check=reconstructed),
    Case("post-hoc EMA", "config: posthoc_ema_sigma_rels=[0.5]",
         train_argv("train.posthoc_ema=true", "train.posthoc_ema_sigma_rels=[0.5]"), "outside (0, 0.2887)"),
    Case("post-hoc EMA", "config: posthoc_ema_sigma_rels=[]",
         train_argv("train.posthoc_ema=true", "train.posthoc_ema_sigma_rels=[]"), "is empty"),
    Case("post-hoc EMA", "config: posthoc_ema_every=0",
         train_argv("train.posthoc_ema=true", "train.posthoc_ema_every=0"), "must be >= 1"),
    Case("post-hoc EMA", "config: posthoc_ema_every without posthoc_ema",
         train_argv("train.posthoc_ema_every=10"), "read only when train.posthoc_ema is true"),
    Case("post-hoc EMA", "config: keep_checkpoint_steps=[3] (no checkpoint there)",
         train_argv("train.keep_checkpoint_steps=[3]"), "no checkpoint is saved"),
    Case("post-hoc EMA", "config: keep_checkpoint_steps=[-2]", train_argv("train.keep_checkpoint_steps=[-2]"),
         "keep_checkpoint_steps"),
]
