"""`python -m diffusion.scaling sweep|fit|predict`.

  sweep CONFIG.yaml [--shard K/N]       train the grid (finished runs skipped, killed ones resumed)
  fit RUNS_DIR [--holdout largest]      sweep.csv -> fits.json, summary.md, plots
  predict RUNS_DIR --params N --images D | --target-loss X
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UserError, exit_on_user_error
from ..threads import prefer_passive_waits, set_cpu_threads


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffusion.scaling", description=__doc__.splitlines()[0])
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
    return p


def _rows(runs_dir: Path) -> list[dict]:
    from .sweep import collect

    if not runs_dir.is_dir():
        raise UserError(f"sweep directory not found: {runs_dir}")
    rows = collect(runs_dir)
    if not rows:
        raise UserError(f"no evaluated runs under {runs_dir}: run `python -m diffusion.scaling sweep` first")
    return rows


def _fit_settings(runs_dir: Path):
    import yaml

    from ..config import from_dict
    from .sweep_config import FitConfig

    path = runs_dir / "sweep.yaml"
    raw = (yaml.safe_load(path.read_text()) or {}).get("fit", {}) if path.is_file() else {}
    return from_dict(FitConfig, raw or {})


def cmd_sweep(args) -> None:
    from .sweep import run_sweep
    from .sweep_config import expand_grid, load_sweep, parse_shard

    sweep = load_sweep(args.config)
    index, count = parse_shard(args.shard)
    print(f"sweep: {len(expand_grid(sweep))} runs in the grid; shard {index + 1}/{count} -> {sweep.settings.output_dir}")
    status = run_sweep(sweep, index, count)
    print(json.dumps(status, indent=1))


def cmd_fit(args) -> None:
    from .plots import plot_all
    from .report import Runs, fit_all, holdout_largest, write_outputs

    runs_dir = Path(args.runs)
    runs = Runs.from_rows(_rows(runs_dir))
    fc = _fit_settings(runs_dir)
    kw = dict(n_boot=fc.n_boot if args.n_boot is None else args.n_boot, huber=fc.huber_scale, outlier_sigma=fc.outlier_sigma)
    rep = fit_all(runs, **kw)
    holdout = holdout_largest(runs, **kw) if args.holdout else None
    write_outputs(runs_dir, rep, holdout)
    if not args.no_plots:
        plot_all(runs_dir, runs, rep)
    print((runs_dir / "summary.md").read_text())
    print(f"wrote {runs_dir / 'fits.json'}, {runs_dir / 'summary.md'} and plots")


def cmd_predict(args) -> None:
    from .fit import compute_for_target_loss
    from .report import Runs, fit_all

    runs_dir = Path(args.runs)
    if args.target_loss is None and (args.params is None or args.images is None):
        raise UserError("predict needs --params N --images D, or --target-loss X")
    runs = Runs.from_rows(_rows(runs_dir))
    fc = _fit_settings(runs_dir)
    rep = fit_all(runs, n_boot=0, huber=fc.huber_scale)
    joint = rep.objects.get("joint")
    if joint is None:
        raise UserError(f"the joint L(N, D) fit failed: {rep.fits['joint'].get('error')}")
    flops = rep.objects["forward_flops"]
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
