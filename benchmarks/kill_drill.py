"""Kill drill: does `--resume auto` survive random SIGKILLs and SIGTERMs, and end bit for bit where an
uninterrupted run ends?

    python benchmarks/kill_drill.py --kills 20 --out runs/drill --set data.num_workers=2 data.hflip=true

Trains a tiny uninterrupted reference run of the config, then the same run hit by `--kills` signals,
resuming with `--resume auto` after each: plain SIGKILLs at a random moment, SIGKILLs timed to land
while a checkpoint is being written (on sight of a `.tmp-step-*` or `.tmp-final` folder), and
SIGTERMs (which must save and exit with 143). Then it finishes the run and prints the kills, the
resumes, the SIGTERM exit statuses, leftover temporary folders, and whether the final EMA weights
equal the reference's bit for bit. Exit status 0 when every check passes.

Sized for a CPU: a tiny model, a few hundred fast steps and a checkpoint every few steps, so 20 kills
take about 15 minutes on one core (mostly process start-up).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# A tiny, fast run; --set values come after these and win.
DRILL = [
    "data.resolution=8", "data.shapes_size=64", "model.base_channels=16", "model.channel_mult=[1,2]",
    "model.layers_per_block=1", "model.attention_resolutions=[]", "model.attention_head_dim=8",
    "diffusion.num_train_timesteps=100", "train.batch_size=4", "train.warmup_steps=1", "train.log_every=1",
    "train.sample_every=0", "train.checkpoint_every=4", "train.keep_checkpoints=2", "train.max_steps=400",
    "sample.steps=3", "sample.num_samples=2",
]
KINDS = ("SIGKILL", "SIGKILL in checkpoint write", "SIGTERM")
TEMP_GLOBS = ("checkpoints/.tmp-*", ".tmp-*", "**/.*.tmp")


@dataclass
class Tally:
    kills: dict[str, int] = field(default_factory=lambda: {kind: 0 for kind in KINDS})
    launches: int = 0
    resumes: int = 0
    sigterm_statuses: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def command(config: str, sets: list[str], out: Path, resume: bool) -> list[str]:
    return [sys.executable, "train.py", config, *DRILL, *sets, f"output_dir={out}", *(["--resume", "auto"] if resume else [])]


def run_env() -> dict[str, str]:
    """One thread (a shared CPU) and unbuffered output, so a killed run's last lines are not lost."""
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1"}


def reference_run(config: str, sets: list[str], out: Path, reuse: bool, max_steps: int) -> float:
    """Train the uninterrupted reference (unless reusing one); returns its training seconds per step."""
    timing, settings = out / "drill_seconds_per_step.txt", out / "drill_settings.txt"
    wanted = " ".join([config, *DRILL, *sets])
    if reuse and (out / "final").is_dir() and timing.is_file():
        if not settings.is_file() or settings.read_text() != wanted:  # another config: not comparable
            sys.exit(f"--reuse-reference: {out} was trained with other settings; drop --reuse-reference")
        return float(timing.read_text())
    shutil.rmtree(out, ignore_errors=True)
    launched = time.time()
    proc = subprocess.Popen(command(config, sets, out, False), cwd=ROOT, env=run_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_training(proc, out, launched)
    start = time.perf_counter()  # start-up excluded: the kill timings are measured from the first step
    log, _ = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"the reference run failed (exit {proc.returncode}):\n{log[-2000:]}")
    per_step = (time.perf_counter() - start) / max_steps
    timing.write_text(f"{per_step}\n")
    settings.write_text(wanted)
    return per_step


def logged_steps(run: Path) -> int:
    path = run / "metrics.csv"
    return max(0, len(path.read_text().splitlines()) - 1) if path.is_file() else 0


def wait_for_training(proc: subprocess.Popen, run: Path, launched: float) -> bool:
    """Until the run logs a step in this launch (metrics.csv written after `launched`); False if it exited."""
    path = run / "metrics.csv"
    while proc.poll() is None:
        if path.is_file() and path.stat().st_mtime > launched:
            return True
        time.sleep(0.05)
    return False


def kill_in_checkpoint_write(proc: subprocess.Popen, run: Path) -> bool:
    """SIGKILL on sight of a checkpoint or export being written; False if the run exited first."""
    while proc.poll() is None:
        if any((run / "checkpoints").glob(".tmp-step-*")) or (run / ".tmp-final").exists():
            proc.send_signal(signal.SIGKILL)
            return True
        time.sleep(0.001)
    return False


def one_launch(args, run: Path, tally: Tally, per_step: float, rng: random.Random, plan: list[str]) -> bool:
    """Start (or resume) the drill run and maybe hit it; True once it has finished normally."""
    from diffusion.checkpoints.store import list_checkpoints

    can_resume = bool(list_checkpoints(run)) if run.is_dir() else False
    launched = time.time()
    time.sleep(0.01)  # mtimes after `launched` are this launch's
    proc = subprocess.Popen(command(args.config, args.set, run, True), cwd=ROOT, env=run_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tally.launches += 1
    kills_left = len(plan) - sum(tally.kills.values())
    kind = plan[-kills_left] if kills_left > 0 else None
    if kind is not None and wait_for_training(proc, run, launched):
        remaining = max(1, args.max_steps - logged_steps(run))
        delay = rng.uniform(0.05, 1.0) * remaining * per_step / (kills_left + 1)  # leaves steps for the rest
        deadline = time.time() + delay
        while proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        if kind == "SIGKILL in checkpoint write":  # the next write after the random delay
            hit = kill_in_checkpoint_write(proc, run)
        else:
            hit = proc.poll() is None
            if hit:
                proc.send_signal(signal.SIGKILL if kind == "SIGKILL" else signal.SIGTERM)
        if hit:
            tally.kills[kind] += 1
        sent = kind if hit else None
    else:
        sent = None
    out, _ = proc.communicate()
    status, last = proc.returncode, out.strip().splitlines()[-1:]
    if "resumed from" in out:
        tally.resumes += 1
    elif can_resume and status != -signal.SIGKILL:
        tally.failures.append(f"launch {tally.launches} did not resume from the checkpoint it had: {last}")
    if sent == "SIGTERM":
        tally.sigterm_statuses.append(status)
        if status != 128 + signal.SIGTERM or "interrupted by SIGTERM" not in out:
            tally.failures.append(f"SIGTERM ended with exit status {status}, not {128 + signal.SIGTERM}: {last}")
    elif status != (-signal.SIGKILL if sent else 0):
        tally.failures.append(f"launch {tally.launches} ended with exit status {status}: {last}")
    return status == 0


def same_ema(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    from diffusion.checkpoints.store import EMA_FILE

    x, y = load_file(str(a / "final" / EMA_FILE)), load_file(str(b / "final" / EMA_FILE))
    return sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20, help="signals to send (SIGKILLs and SIGTERMs)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the reference/ and drill/ runs")
    parser.add_argument("--config", default="configs/shapes.yaml")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for both runs")
    parser.add_argument("--reuse-reference", action="store_true", help="keep an existing OUT/reference run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill timings")
    args = parser.parse_args(argv)
    args.max_steps = int(next(s.split("=")[1] for s in [*DRILL, *args.set][::-1] if s.startswith("train.max_steps=")))
    reference, run = args.out / "reference", args.out / "drill"
    per_step = reference_run(args.config, args.set, reference, args.reuse_reference, args.max_steps)
    shutil.rmtree(run, ignore_errors=True)
    rng, tally = random.Random(args.seed), Tally()
    plan = [KINDS[i % len(KINDS)] for i in range(args.kills)]  # every kind, in random order
    rng.shuffle(plan)
    started = time.perf_counter()
    finished = False
    while not finished and tally.launches < 3 * args.kills + 10:
        finished = one_launch(args, run, tally, per_step, rng, plan)
    leftovers = sorted({str(p.relative_to(run)) for pattern in TEMP_GLOBS for p in run.glob(pattern)})
    identical = finished and same_ema(reference, run)
    kills = sum(tally.kills.values())
    print(f"kills: {kills} of {args.kills} ({', '.join(f'{kind}: {n}' for kind, n in tally.kills.items())})")
    print(f"launches: {tally.launches}, resumes: {tally.resumes}, drill seconds: {time.perf_counter() - started:.0f}")
    print(f"SIGTERM exit statuses: {tally.sigterm_statuses or 'none'}")
    print(f"leftover temporary files and folders: {leftovers or 'none'}")
    print(f"final EMA equals the uninterrupted run's bit for bit: {'yes' if identical else 'NO'}")
    for failure in tally.failures:
        print(f"FAIL: {failure}")
    ok = finished and identical and not tally.failures and kills == args.kills
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
