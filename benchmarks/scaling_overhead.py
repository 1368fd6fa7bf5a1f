"""Validation-loss overhead of a scaling sweep: evaluation seconds / training seconds, per run.

Reads every RUN/scaling/evals.jsonl under a sweep directory (the recorder times training and
evaluation separately: `wall_s` is training only, `eval_s` one evaluation) and prints the ratio per
run, the median over runs and the sweep total. The target is at most 5% at the shipped settings.

  python benchmarks/scaling_overhead.py runs/scaling_cifar10
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.cli.help_format import DefaultsHelpFormatter  # noqa: E402  (torch-free)


def build_parser() -> argparse.ArgumentParser:
    """The options (torch-free, so --help is fast)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("sweep_dir")
    return parser


if __name__ == "__main__":  # --help and bad flags answer before torch is imported (0.1 s, not 10-30 s)
    build_parser().parse_args()

from diffusion.scaling.recorder import EVALS_FILE, read_jsonl  # noqa: E402


def overhead(rows: list[dict]) -> tuple[float, float]:
    """(evaluation seconds, training seconds) of one run's evaluation rows."""
    return sum(r["eval_s"] for r in rows), max(r["wall_s"] for r in rows)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    runs = sorted(Path(args.sweep_dir).glob(f"*/scaling/{EVALS_FILE}"))
    if not runs:
        sys.exit(f"error: no {EVALS_FILE} under {args.sweep_dir}: run the sweep first")
    ratios, total_eval, total_train = [], 0.0, 0.0
    print(f"{'run':<40} {'evals':>5} {'eval s':>8} {'train s':>8} {'ratio':>7}")
    for path in runs:
        rows = read_jsonl(path)
        ev, tr = overhead(rows)
        ratios.append(ev / tr)
        total_eval, total_train = total_eval + ev, total_train + tr
        print(f"{path.parent.parent.name:<40} {len(rows):>5} {ev:>8.1f} {tr:>8.1f} {ev / tr:>7.1%}")
    print(f"median ratio {statistics.median(ratios):.1%} over {len(ratios)} runs; "
          f"sweep total {total_eval:.0f} s evaluating / {total_train:.0f} s training = {total_eval / total_train:.1%}")


if __name__ == "__main__":
    from diffusion.errors import exit_on_user_error

    exit_on_user_error(main)()  # bad input (a missing run, --steps out of range): one line, exit status 2
