"""`python -m diffusion.scaling sweep|fit|predict`.

  sweep CONFIG.yaml [--shard K/N]       train the grid (finished runs skipped, killed ones resumed)
  fit RUNS_DIR [--holdout largest]      sweep.csv -> fits.json, summary.md, plots
  predict RUNS_DIR --params N --images D | --target-loss X
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path
from typing import Iterator

from ..cli.args import Parser
from ..cli.help_format import DefaultsHelpFormatter
from ..errors import UserError, exit_on_user_error, first_line, preview
from ..threads import prefer_passive_waits, set_cpu_threads


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m diffusion.scaling", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sweep", help="train the grid of a sweep file")
    s.add_argument("config")
    s.add_argument("--shard", help="K/N: run the K-th of N shares (default: SLURM_ARRAY_TASK_ID/COUNT, else all)")
    f = sub.add_parser("fit", help="fit scaling laws to a sweep's finished evaluations")
    f.add_argument("runs")
    f.add_argument("--holdout", choices=["largest"], help="also fit without the largest model and predict it")
    f.add_argument("--n-boot", type=int, default=None, help="bootstrap refits (default: the sweep file's fit.n_boot)")
    f.add_argument("--no-plots", action="store_true")
    q = sub.add_parser("predict", help="loss for (N, D), or compute for a target loss, from the joint fit")
    q.add_argument("runs")
    q.add_argument("--params", type=float)
    q.add_argument("--images", type=float, help="training images seen")
    q.add_argument("--target-loss", type=float)
    for parser in (p, s, f, q):
        parser.formatter_class = DefaultsHelpFormatter  # --help shows every default
    return p


def _rows(runs_dir: Path) -> list[dict]:
    from .sweep import collect

    if not runs_dir.is_dir():
        raise UserError(f"sweep directory not found: {runs_dir}")
    rows = collect(runs_dir)
    if not rows:
        raise UserError(f"no evaluated runs under {runs_dir}: run `python -m diffusion.scaling sweep` first")
    return rows


SWEEP_COPY_FIX = "it is the sweep's copy of its sweep file: copy the sweep file over it, or delete it to fit with the defaults"


def _fit_settings(runs_dir: Path):
    """The `fit:` section of the sweep folder's sweep.yaml (defaults without one), through the shared
    loader: an invalid, non-UTF-8 or wrongly shaped file, or a bad fit value, is one line naming it."""
    from ..config import from_dict
    from .sweep_config import FitConfig, fit_problems, read_sweep_yaml

    path = runs_dir / "sweep.yaml"
    if not path.exists():
        return FitConfig()
    label = f"sweep file {path}"
    try:
        raw = read_sweep_yaml(path).get("fit") or {}
    except UserError as err:
        raise UserError(f"{err}; {SWEEP_COPY_FIX}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{label}: 'fit' must be a mapping (n_boot, outlier_sigma, huber_scale), got {preview(raw)}")
    try:
        fc = from_dict(FitConfig, raw, "fit.")
    except UserError as err:
        raise UserError(f"{label}: {err}".replace("config key", "sweep key")) from None
    wrong = next(((key, value) for key, value, ok in fit_problems(fc) if not ok), None)
    if wrong:
        raise UserError(f"{label}: {wrong[0]} = {preview(wrong[1])} is out of range (see docs/scaling.md)")
    return fc


@contextlib.contextmanager
def _numeric_failures(runs_dir: Path) -> Iterator[None]:
    """A fit that fails on numbers no check foresaw (an overflow, a singular matrix) as one line, not a traceback;
    numpy's warnings on the way are not printed."""
    import warnings

    import numpy as np

    try:  # overflows in the optimiser's trial points are expected: not a screenful of RuntimeWarnings
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    except (ValueError, ArithmeticError) as err:  # numpy's LinAlgError is a ValueError
        raise UserError(f"the fits failed on the evaluations under {runs_dir} ({type(err).__name__}: {first_line(err)}): check its runs' "
                        "evals.jsonl and meta.json for values far from the others") from None


def _positive(value: float | None, flag: str) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise UserError(f"{flag} must be a positive finite number, got {value:g}")


def cmd_sweep(args) -> None:
    from .sweep_config import expand_grid, load_sweep, parse_shard

    sweep = load_sweep(args.config)  # before the trainer's imports: a bad sweep file is answered sooner
    index, count = parse_shard(args.shard)
    from .sweep import run_sweep

    print(f"sweep: {len(expand_grid(sweep))} runs in the grid; shard {index + 1}/{count} -> {sweep.settings.output_dir}")
    status = run_sweep(sweep, index, count)
    print(json.dumps(status, indent=1))


def cmd_fit(args) -> None:
    from .plots import plot_all
    from .report import Runs, fit_all, holdout_largest, write_outputs

    runs_dir = Path(args.runs)
    if args.n_boot is not None and not 0 <= args.n_boot <= 100_000:
        raise UserError(f"--n-boot must be between 0 and 100000, got {args.n_boot}")
    runs = Runs.from_rows(_rows(runs_dir))
    fc = _fit_settings(runs_dir)
    kw = dict(n_boot=fc.n_boot if args.n_boot is None else args.n_boot, huber=fc.huber_scale, outlier_sigma=fc.outlier_sigma)
    with _numeric_failures(runs_dir):
        rep = fit_all(runs, **kw)
        holdout = holdout_largest(runs, **kw) if args.holdout else None
        write_outputs(runs_dir, rep, holdout)
        if not args.no_plots:
            plot_all(runs_dir, runs, rep)
    print((runs_dir / "summary.md").read_text())
    print(f"wrote {runs_dir / 'fits.json'}, {runs_dir / 'summary.md'} and plots")


def cmd_predict(args) -> None:
    from .report import Runs, fit_all

    runs_dir = Path(args.runs)
    if args.target_loss is None and (args.params is None or args.images is None):
        raise UserError("predict needs --params N --images D, or --target-loss X")
    for value, flag in ((args.params, "--params"), (args.images, "--images"), (args.target_loss, "--target-loss")):
        _positive(value, flag)
    runs = Runs.from_rows(_rows(runs_dir))
    fc = _fit_settings(runs_dir)
    with _numeric_failures(runs_dir):
        _predict(args, fit_all(runs, n_boot=0, huber=fc.huber_scale))


def _predict(args, rep) -> None:
    from .fit import compute_for_target_loss

    joint, flops = rep.objects.get("joint"), rep.objects.get("forward_flops")
    if joint is None or flops is None:
        failed = "joint" if joint is None else "forward_flops"
        raise UserError(f"the {'joint L(N, D)' if joint is None else 'forward FLOPs'} fit failed: "
                        f"{rep.fits.get(failed, {}).get('error')}")
    if args.target_loss is not None:
        plan = compute_for_target_loss(joint, args.target_loss, flops)
        print(f"target loss {plan.target_loss:g}: C = {plan.flops:.3g} training FLOPs with N = {plan.params:.3g} "
              f"parameters trained on D = {plan.images:.3g} images (forward {flops(plan.params):.3g} FLOPs/image)")
    if args.params is not None and args.images is not None:
        loss = float(joint.predict(args.params, args.images))
        c = 3 * flops(args.params) * args.images
        print(f"N = {args.params:.3g}, D = {args.images:.3g} images: predicted loss {loss:.5g} at C = {c:.3g} FLOPs "
              f"(fitted N {joint.n_range[0]:.3g}-{joint.n_range[1]:.3g}, D {joint.d_range[0]:.3g}-{joint.d_range[1]:.3g})")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    prefer_passive_waits()  # before torch is imported (see diffusion/threads.py)
    args = build_parser().parse_args(argv)
    set_cpu_threads()
    {"sweep": cmd_sweep, "fit": cmd_fit, "predict": cmd_predict}[args.command](args)
