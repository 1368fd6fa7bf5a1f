"""EDM against DDPM at equal training compute: FID/KID of each (model, sampler, steps) row.

Each row is one `python -m diffusion.evaluate fid` command (printed, so any row can be rerun
alone), sampling --num-samples images with classes cycled and scoring them against the reference
split with the given TorchScript extractor: "FID (CIFAR-10 classifier features)", not Inception
FID. Rows run in --jobs parallel processes, one thread each; the table goes to stdout and --json.

  python benchmarks/edm_comparison.py --ddpm runs/cifar10_16_ddpm --edm runs/cifar10_16_edm \\
      --extractor runs/extractors/cifar10_16.pt --reference-root data/cifar10-jpeg --out runs/reports/edm
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fid_cells import CellFailed, fid_command, run_fid, shown  # noqa: E402  (torch-free)
from diffusion.cli.help_format import DefaultsHelpFormatter  # noqa: E402  (torch-free)

# (model, sampler, steps): the 35-evaluation rows, then each model's 100+ evaluation reference
DEFAULT_ROWS = "edm:heun:18,ddpm:ddim:35,ddpm:dpmsolver:35,ddpm:heun:18,edm:heun:51,ddpm:dpmsolver:100"


def build_parser() -> argparse.ArgumentParser:
    """The options (torch-free, so --help is fast)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--ddpm", required=True, help="the ddpm run (or checkpoint)")
    parser.add_argument("--edm", required=True, help="the edm run (or checkpoint)")
    parser.add_argument("--extractor", required=True, help="TorchScript feature extractor (evaluate train-extractor)")
    parser.add_argument("--reference-root", required=True, help="the CIFAR-10 image folder (train/ and test/)")
    parser.add_argument("--reference-split", default="test")
    parser.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated MODEL:SAMPLER:STEPS (MODEL: ddpm or edm)")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="1 = plain conditional sampling")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--jobs", type=int, default=2, help="rows evaluated at once (one thread each)")
    parser.add_argument("--extra", default="", help="more sample.py options for every row, e.g. '--churn 10'")
    parser.add_argument("--out", default="runs/reports/edm", help="folder for the JSON reports and samples")
    parser.add_argument("--json", default=None, help="the table as JSON (default: OUT/table.json)")
    return parser


if __name__ == "__main__":  # --help and bad flags answer before torch is imported (0.1 s, not 10-30 s)
    build_parser().parse_args()

from diffusion.sampling.samplers import network_evaluations  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run_row(args: argparse.Namespace, spec: str) -> dict:
    """One MODEL:SAMPLER:STEPS row's `evaluate fid`, as a table row."""
    model, sampler, steps = spec.split(":")
    name = f"{model}_{sampler}{steps}"
    out = Path(args.out)
    command = fid_command(getattr(args, model), out / f"{name}.json", out / "samples" / name,
                          reference=f"imagefolder:{args.reference_split}", reference_root=args.reference_root,
                          extractor=args.extractor, num_samples=args.num_samples, batch_size=args.batch_size,
                          options=["--sampler", sampler, "--steps", steps, "--guidance-scale", f"{args.guidance_scale:g}"],
                          extra=args.extra)
    try:
        report, seconds = run_fid(command, out / f"{name}.json")
    except CellFailed as err:
        raise SystemExit(f"row {spec} failed:\n{err}") from None
    return {"model": model, "sampler": sampler, "steps": int(steps), "NFE": network_evaluations(sampler, int(steps)),
            "FID": report["fid"], "KID": report["kid_mean"], "KID std": report["kid_std"], "n": report["n"],
            "seconds": seconds, "command": shown(command)}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    specs = [s for s in args.rows.split(",") if s.strip()]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda spec: run_row(args, spec), specs))
    print("\n| model | sampler | steps | NFE | FID (CIFAR-10 classifier features) | KID (x1e3) | wall-clock s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['NFE']} | {r['FID']:.3f} | "
              f"{1e3 * r['KID']:.2f} ± {1e3 * r['KID std']:.2f} | {r['seconds']:.0f} |")
    Path(args.json or Path(args.out) / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    from diffusion.errors import exit_on_user_error

    exit_on_user_error(main)()  # bad input (a missing run, --steps out of range): one line, exit status 2
