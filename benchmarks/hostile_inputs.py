"""Hostile-input drill: every config key, command-line flag, file and signal a new user or an
adversary might get wrong, each tried as its own process, classified as the issue that asked for it
does.

    python benchmarks/hostile_inputs.py [--workers N] [--only WORDS] [--keep DIR] [--list]

Each case expects a clean answer: bad input ends with exit status 2 and ONE line `error: ...` that
names the problem (the case's words); cases that must work exit 0 and pass their check; signals
exit 128 + N with a checkpoint saved. The outcome of each case is one of:
  clean            as expected;
  traceback        a Python traceback, or a crash (an exit status no command documents);
  silently wrong   exit 0 (or a check failed) where a refusal or another result was due;
  unclear          refused, but not in one line naming the problem;
  hang             still running at its timeout;
  lost             training work lost (no checkpoint after a stop signal, a run overwritten).
The table of counts per group goes in docs/reliability.md. Cases run in parallel (--workers), all
from one tiny trained run copied per case; about 10 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.hostile_cases import CASES  # noqa: E402
from benchmarks.hostile_env import Case, Env, Result, build_env  # noqa: E402

OUTCOMES = ("clean", "traceback", "silently wrong", "unclear", "hang", "lost")
KNOWN_STATUSES = {0, 2, 3, 129, 130, 143}  # documented exits: ok, bad input, diverged, stopped by a signal


def command(argv: list[str]) -> list[str]:
    """A case's argv ("train", "sample", "evaluate", "demo" or "python" first) as a process command."""
    head = {"train": [sys.executable, "train.py"], "sample": [sys.executable, "sample.py"],
            "evaluate": [sys.executable, "-m", "diffusion.evaluate"],
            "demo": [sys.executable, str(Path(__file__).resolve()), "--demo-case"],
            "python": [sys.executable]}[argv[0]]
    return head + argv[1:]


def case_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "TORCH_HOME": os.environ.get("TORCH_HOME", "/nonexistent-torch-home")}


def run_process(case: Case, env: Env, folder: Path) -> Result:
    """Run one case as a process (or through its own runner)."""
    if case.prepare is not None:
        case.prepare(env, folder)
    if case.runner is not None:
        return case.runner(env, folder)
    start = time.perf_counter()
    try:
        proc = subprocess.run(command(case.argv(env, folder)), cwd=ROOT, env=case_env(), capture_output=True,
                              text=True, timeout=case.timeout, errors="replace")
        return Result(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        return Result(None, out, "", time.perf_counter() - start)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def classify(case: Case, result: Result, env: Env, folder: Path) -> tuple[str, str]:
    """(outcome, a note for the report) of one case."""
    text = result.out + result.err
    if result.status is None:
        return "hang", f"still running after {case.timeout:.0f} s"
    if "Traceback (most recent call last)" in text or result.status not in KNOWN_STATUSES:
        last = [line for line in text.splitlines() if line.strip()][-1:] or [""]
        return "traceback", f"exit {result.status}: {last[0][:160]}"
    problem = case.check(env, folder, result) if case.check is not None else None
    if problem:
        return ("lost" if case.lost else "silently wrong"), problem
    if result.status != case.status:
        wrong = "lost" if case.lost else "silently wrong" if result.status == 0 else "unclear"
        return wrong, f"exit {result.status}, expected {case.status}: {(error_lines(text) or [''])[0][:160]}"
    if case.status != 0 and (case.words is not None or case.status == 2):
        errors = error_lines(result.err)
        if len(errors) != 1 or (case.words or "") not in errors[0]:
            return "unclear", f"{len(errors)} error lines, wanted one naming {case.words!r}: {(errors or [''])[0][:160]}"
    return "clean", ""


@dataclass
class Row:
    case: Case
    outcome: str
    note: str
    seconds: float


def drill(cases: list[Case], env: Env, workers: int) -> list[Row]:
    def one(case: Case) -> Row:
        folder = env.root / "cases" / f"{cases.index(case):03d}"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            result = run_process(case, env, folder)
            outcome, note = classify(case, result, env, folder)
        except Exception as err:  # noqa: BLE001 - one case that cannot run must not stop the drill
            result, outcome, note = Result(None, "", ""), "traceback", f"the drill could not run it: {err!r}"[:200]
        print(f"{outcome:>14}  {case.group:<12} {case.id}  ({result.seconds:.0f} s) {note}", flush=True)
        return Row(case, outcome, note, result.seconds)

    slow = [c for c in cases if c.timeout > 180]  # the long ones first, so they overlap the rest
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, slow + [c for c in cases if c not in slow]))


def table(rows: list[Row]) -> str:
    groups = list(dict.fromkeys(row.case.group for row in rows))
    lines = ["| group | tried | " + " | ".join(OUTCOMES) + " |", "|---|" + "---|" * (len(OUTCOMES) + 1)]
    for group in [*groups, "all"]:
        picked = [row for row in rows if group in ("all", row.case.group)]
        counts = [sum(row.outcome == outcome for row in picked) for outcome in OUTCOMES]
        name = f"**{group}**" if group == "all" else group
        lines.append(f"| {name} | {len(picked)} | " + " | ".join(map(str, counts)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=max(2, os.cpu_count() or 2))
    parser.add_argument("--only", default=None, help="run the cases whose id or group contains this")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--demo-case", nargs="+", default=None, help=argparse.SUPPRESS)  # one demo case, in this process
    args = parser.parse_args(argv)
    if args.demo_case:
        from benchmarks.hostile_runners import run_demo_case

        return run_demo_case(args.demo_case)
    import torch

    cases = [c for c in CASES if (args.only is None or args.only in c.id or args.only == c.group)
             and not (c.cpu_only and torch.cuda.is_available())]
    if args.list:
        for case in cases:
            print(f"{case.group:<12} {case.id}")
        print(f"{len(cases)} cases")
        return 0
    root = args.keep or Path(tempfile.mkdtemp(prefix="hostile-"))
    started = time.perf_counter()
    env = build_env(root)
    print(f"built the shared run and files in {time.perf_counter() - started:.0f} s; {len(cases)} cases, "
          f"{args.workers} at a time", flush=True)
    rows = drill(cases, env, args.workers)
    print(f"\n{len(rows)} cases in {time.perf_counter() - started:.0f} s\n")
    print(table(rows))
    bad = [row for row in rows if row.outcome != "clean"]
    for row in bad:
        print(f"- {row.outcome}: {row.case.group} / {row.case.id}: {row.note}")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
