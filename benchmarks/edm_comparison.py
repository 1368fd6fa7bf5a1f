"""EDM against DDPM at equal training compute: FID, KID, precision, recall and class accuracy of each
(twin, sampler, steps) row, for every training seed of each twin.

Each cell is one `python -m diffusion.evaluate fid` command (printed, so any cell can be rerun
alone), sampling --num-samples images with classes cycled and scoring them against the reference
split with the given TorchScript extractor: "FID (CIFAR-10 classifier features)", not Inception
FID. The twins: --edm, --ddpm (epsilon prediction) and optionally --v (the ddpm twin with
v-prediction, which separates the parameterisation from the noise-level distribution). Give each
twin one run per training seed, in the same seed order. Cells run in --jobs parallel processes, one
thread each; a cell whose report exists is reused (--fresh reruns it). The table (95% intervals:
bootstrap over samples; KID ± std over subsets) goes to stdout, OUT/table.md and OUT/table.json,
with each row's mean over seeds.

  python benchmarks/edm_comparison.py --ddpm runs/cifar10_16_ddpm --edm runs/cifar10_16_edm \\
      --extractor runs/extractors/cifar10_16.pt --reference-root data/cifar10-jpeg --out runs/reports/edm
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fid_cells import METRICS, CellFailed, fid_command, fmt, metric, run_fid, shown  # noqa: E402  (torch-free)
from diffusion.cli.help_format import DefaultsHelpFormatter  # noqa: E402  (torch-free)

# (twin, sampler, steps): the 35-evaluation rows, then each model's 100+ evaluation reference
DEFAULT_ROWS = "edm:heun:18,ddpm:ddim:35,ddpm:dpmsolver:35,ddpm:heun:18,edm:heun:51,ddpm:dpmsolver:100"
TWINS = {"edm": "edm", "ddpm": "ddpm (epsilon)", "v": "ddpm (v-prediction)"}


def build_parser() -> argparse.ArgumentParser:
    """The options (torch-free, so --help is fast)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--ddpm", nargs="+", required=True, metavar="RUN",
                        help="the ddpm twin (epsilon prediction): one run (or checkpoint) per training seed")
    parser.add_argument("--edm", nargs="+", required=True, metavar="RUN", help="the edm twin: one run per training seed")
    parser.add_argument("--v", nargs="+", default=[], metavar="RUN",
                        help="the ddpm twin trained with diffusion.prediction_type=v_prediction, one run per seed")
    parser.add_argument("--extractor", required=True, help="TorchScript feature extractor (evaluate train-extractor)")
    parser.add_argument("--reference-root", required=True, help="the CIFAR-10 image folder (train/ and test/)")
    parser.add_argument("--reference-split", default="test")
    parser.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated TWIN:SAMPLER:STEPS (TWIN: edm, ddpm or v)")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="1 = plain conditional sampling")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--jobs", type=int, default=2, help="cells evaluated at once (one thread each)")
    parser.add_argument("--extra", default="", help="more sample.py options for every cell, e.g. '--churn 10'")
    parser.add_argument("--out", default="runs/reports/edm", help="folder for the JSON reports and samples")
    parser.add_argument("--fresh", action="store_true", help="rerun cells whose report exists")
    return parser


if __name__ == "__main__":  # --help and bad flags answer before torch is imported (0.1 s, not 10-30 s)
    build_parser().parse_args()

from diffusion.errors import UserError  # noqa: E402
from diffusion.sampling.samplers import network_evaluations  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for spec in args.rows.split(","):
        parts = spec.strip().split(":")
        if len(parts) != 3 or parts[0] not in TWINS or not parts[2].isdigit():
            raise UserError(f"bad row {spec!r}: write TWIN:SAMPLER:STEPS with TWIN one of {', '.join(TWINS)}, e.g. edm:heun:18")
        if not getattr(args, parts[0]):
            raise UserError(f"row {spec!r} needs --{parts[0]} RUN")
    return args


def cells(args: argparse.Namespace) -> list[tuple[str, str, str, int]]:
    """(twin, sampler, steps, seed index) for every row and every run given for its twin."""
    out = []
    for spec in args.rows.split(","):
        twin, sampler, steps = spec.strip().split(":")
        out += [(twin, sampler, steps, seed) for seed in range(len(getattr(args, twin)))]
    return out


def run_cell(args: argparse.Namespace, twin: str, sampler: str, steps: str, seed: int) -> dict:
    """One cell's `evaluate fid`, as a table row."""
    name = f"{twin}_{sampler}{steps}_seed{seed}"
    out = Path(args.out)
    command = fid_command(getattr(args, twin)[seed], out / f"{name}.json", out / "samples" / name,
                          reference=f"imagefolder:{args.reference_split}", reference_root=args.reference_root,
                          extractor=args.extractor, num_samples=args.num_samples, batch_size=args.batch_size,
                          options=["--sampler", sampler, "--steps", steps, "--guidance-scale", f"{args.guidance_scale:g}"],
                          extra=args.extra)
    try:
        report, seconds = run_fid(command, out / f"{name}.json", reuse=not args.fresh)
    except CellFailed as err:
        raise SystemExit(f"cell {twin}:{sampler}:{steps} (seed run {seed}) failed:\n{err}") from None
    row = {"twin": twin, "run": getattr(args, twin)[seed], "seed": seed, "sampler": sampler, "steps": int(steps),
           "NFE": network_evaluations(sampler, int(steps)), "n": report["n"], "seconds": seconds, "command": shown(command)}
    for name in METRICS:
        row[name] = metric(report, name)
    return row


def markdown(rows: list[dict]) -> str:
    """Every cell, then each (twin, sampler, steps) row's mean over its seeds."""
    lines = ["| twin | seed run | sampler | steps | NFE | FID | KID (x1e3) | precision | recall | class accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {TWINS[r['twin']]} | {r['seed']} | {r['sampler']} | {r['steps']} | {r['NFE']} | "
                     f"{fmt(r['fid'], digits=2)} | {fmt(r['kid'], 1e3, 1)} | {fmt(r['precision'])} | "
                     f"{fmt(r['recall'])} | {fmt(r['class_accuracy'])} |")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["twin"], r["sampler"], r["steps"]), []).append(r)
    lines += ["", "| twin | sampler | steps | seeds | FID mean (per seed) | recall mean | class accuracy mean |",
              "|---|---|---|---|---|---|---|"]
    for (twin, sampler, steps), group in groups.items():
        def mean(name: str) -> str:
            values = [r[name][0] for r in group if r[name][0] is not None]
            return f"{statistics.fmean(values):.3f}" if values else "n/a"
        per_seed = ", ".join(f"{r['fid'][0]:.2f}" for r in group)
        lines.append(f"| {TWINS[twin]} | {sampler} | {steps} | {len(group)} | {statistics.fmean(r['fid'][0] for r in group):.2f} "
                     f"({per_seed}) | {mean('recall')} | {mean('class_accuracy')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda cell: run_cell(args, *cell), cells(args)))
    table = markdown(rows)
    n = rows[0]["n"] if rows else args.num_samples
    header = (f"n = {n} samples per cell (classes cycled, guidance scale {args.guidance_scale:g}); 95% intervals "
              "(bootstrap over samples; KID: ± std over subsets); FID in CIFAR-10 classifier features\n\n")
    print("\n" + header + table)
    (out / "table.md").write_text(header + table)
    (out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    from diffusion.errors import exit_on_user_error

    exit_on_user_error(main)()  # bad input (a missing run, --steps out of range): one line, exit status 2
