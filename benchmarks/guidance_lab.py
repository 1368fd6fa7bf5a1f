"""The guidance lab: quality, variety and class accuracy of every guidance method, with error bars.

Each cell (method, scale) is one `python -m diffusion.evaluate fid` command (printed, so any cell can
be rerun alone): --num-samples class-conditional samples (classes cycled, seeds 0..n-1), scored in
the feature space of a TorchScript extractor trained here (`evaluate train-extractor`) against the
reference split. The report of each cell holds FID, KID, precision, recall, density, coverage and the
extractor's accuracy on the asked class, each with its 95% interval (bootstrap over samples; KID:
± std over subsets). Methods, all on the same main model and seeds:

  unguided          the main model alone (--guidance-scale 1)
  cfg               classifier-free guidance, eps_u + w (eps_c - eps_u)
  cfg-interval      CFG only inside --interval (Kynkaanniemi et al. 2024), the plain conditional outside
  auto-early        autoguidance by an early checkpoint of the same run (--early-guide)
  auto-small        autoguidance by a smaller, shorter-trained model (--small-guide)
  classifier        classifier guidance by a noise-aware classifier (--classifier), CFG off
  uncond            the main model's unconditional branch (--unconditional)
  uncond-auto-small autoguidance of that unconditional branch by the small guide's

A method whose input is not given is skipped. Cells whose JSON report exists are not rerun, so an
interrupted lab continues where it stopped; --fresh reruns them. Writes OUT/table.json, OUT/table.md
and OUT/fid_vs_recall.png (FID against recall, one curve per method across its scales).

  python benchmarks/guidance_lab.py --main runs/lab/edm_main --early-guide runs/lab/edm_main/checkpoints/step-000125 \\
      --small-guide runs/lab/edm_xs --classifier runs/lab/classifier_edm \\
      --extractor runs/extractors/cifar10_16.pt --reference-root data/cifar10-jpeg --out runs/reports/guidance_lab
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fid_cells import METRICS, CellFailed, fid_command, fmt, metric, run_fid, shown  # noqa: E402  (torch-free)
from diffusion.cli.help_format import DefaultsHelpFormatter  # noqa: E402  (torch-free)
from diffusion.errors import UserError  # noqa: E402  (torch-free)

METHODS = ("unguided", "cfg", "cfg-interval", "auto-early", "auto-small", "classifier", "uncond", "uncond-auto-small")
# each method's sweep on the 16 px edm twin (Heun 18) up to where its FID turned up, or levelled off (classifier;
# docs/guidance.md)
DEFAULT_SCALES = {"unguided": "1", "cfg": "1.5,2,3,4,5", "cfg-interval": "2,3,4,5,6", "auto-early": "1.5,2,3,4",
                  "auto-small": "1.5,2,3", "classifier": "1,2,3,4,6,8,12,16,24",
                  "uncond": "0", "uncond-auto-small": "1.5,2"}


def build_parser() -> argparse.ArgumentParser:
    """The options (torch-free, so --help is fast)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--main", required=True, help="the main model: a run folder or one checkpoint")
    parser.add_argument("--early-guide", default=None, help="an early checkpoint of the main run (auto-early)")
    parser.add_argument("--small-guide", default=None, help="a smaller, shorter-trained run (auto-small)")
    parser.add_argument("--classifier", default=None, help="a noise-aware classifier run on the main model's levels")
    parser.add_argument("--extractor", required=True, help="TorchScript extractor with a classification head")
    parser.add_argument("--reference-root", required=True, help="the CIFAR-10 image folder (train/ and test/)")
    parser.add_argument("--reference-split", default="test")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    for method in METHODS:
        parser.add_argument(f"--scales-{method}", default=DEFAULT_SCALES[method], metavar="W,...",
                            help=f"scales of {method}")
    parser.add_argument("--interval", type=float, nargs=2, default=(0.28, 5.42), metavar=("LO", "HI"),
                        help="cfg-interval's model-time interval (sigma on an edm model; EDM2's ImageNet-512 choice)")
    parser.add_argument("--sampler", default="heun")
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed + i in every cell")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--jobs", type=int, default=2, help="cells evaluated at once (one thread each)")
    parser.add_argument("--extra", default="", help="more sample.py options for every cell")
    parser.add_argument("--out", default="runs/reports/guidance_lab", help="folder for reports, samples, table and plot")
    parser.add_argument("--fresh", action="store_true", help="rerun cells whose report exists")
    parser.add_argument("--keep-samples", action="store_true", help="keep each cell's PNGs (default: deleted once scored)")
    return parser


if __name__ == "__main__":  # --help and bad flags answer before torch is imported
    build_parser().parse_args()


def method_options(args: argparse.Namespace, method: str, scale: float) -> list[str] | None:
    """sample.py options of one cell, or None when the method's input was not given."""
    w = f"{scale:g}"
    if method == "unguided":
        return ["--guidance-scale", "1"]
    if method == "cfg":
        return ["--guidance-scale", w]
    if method == "cfg-interval":
        return ["--guidance-scale", w, "--guidance-interval", *(f"{v:g}" for v in args.interval)]
    if method == "auto-early":
        return None if not args.early_guide else ["--autoguide", args.early_guide, "--guidance-scale", w]
    if method == "auto-small":
        return None if not args.small_guide else ["--autoguide", args.small_guide, "--guidance-scale", w]
    if method == "classifier":
        return None if not args.classifier else ["--guidance-scale", "1", "--classifier", args.classifier,
                                                 "--classifier-scale", w]
    if method == "uncond":
        return ["--unconditional", "--guidance-scale", "1"]
    if method == "uncond-auto-small":
        return None if not args.small_guide else ["--unconditional", "--autoguide", args.small_guide,
                                                  "--guidance-scale", w]
    raise UserError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")


def run_cell(args: argparse.Namespace, method: str, scale: float, options: list[str]) -> dict:
    """One cell's `evaluate fid` (reused when its report exists, unless --fresh) as a table row."""
    name = f"{method}_w{scale:g}"
    out = Path(args.out)
    report_path = out / "cells" / f"{name}.json"
    command = fid_command(args.main, report_path, out / "samples" / name, reference=f"imagefolder:{args.reference_split}",
                          reference_root=args.reference_root, extractor=args.extractor, num_samples=args.num_samples,
                          batch_size=args.batch_size, extra=args.extra,
                          options=["--sampler", args.sampler, "--steps", str(args.steps), "--seed", str(args.seed),
                                   *options])
    try:
        report, seconds = run_fid(command, report_path, reuse=not args.fresh, keep_samples=args.keep_samples)
    except CellFailed as err:
        raise SystemExit(f"cell {method} w={scale:g} failed:\n{err}") from None
    row = {"method": method, "scale": scale, "n": report.get("n"), "seconds": seconds, "command": shown(command)}
    for metric_name in METRICS:
        row[metric_name] = metric(report, metric_name)
    return row


def cells(args: argparse.Namespace) -> list[tuple[str, float, list[str]]]:
    out = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if method not in METHODS:
            raise UserError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
        for text in getattr(args, f"scales_{method.replace('-', '_')}").split(","):
            scale = float(text)
            options = method_options(args, method, scale)
            if options is not None:
                out.append((method, scale, options))
    return out


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"n = {rows[0]['n'] if rows else args.num_samples} samples per cell, seeds {args.seed}.."
             f"{args.seed + args.num_samples - 1}, {args.sampler} {args.steps} steps; 95% intervals "
             "(bootstrap over samples; KID: ± std over subsets)", "",
             "| method | scale | FID | KID (x1e3) | precision | recall | density | coverage | class accuracy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['scale']:g} | {fmt(r['fid'], digits=2)} | {fmt(r['kid'], 1e3, 1)} | "
                     f"{fmt(r['precision'])} | {fmt(r['recall'])} | {fmt(r['density'])} | {fmt(r['coverage'])} | "
                     f"{fmt(r['class_accuracy'])} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """FID against recall, one curve per method across its scales (error bars: the 95% intervals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for method in METHODS:
        mine = sorted((r for r in rows if r["method"] == method and r["recall"][0] is not None), key=lambda r: r["scale"])
        if not mine:
            continue
        x = [r["recall"][0] for r in mine]
        y = [r["fid"][0] for r in mine]
        xerr = [[max(0.0, r["recall"][0] - (r["recall"][1] if r["recall"][1] is not None else r["recall"][0])) for r in mine],
                [max(0.0, (r["recall"][2] if r["recall"][2] is not None else r["recall"][0]) - r["recall"][0]) for r in mine]]
        yerr = [[max(0.0, r["fid"][0] - (r["fid"][1] if r["fid"][1] is not None else r["fid"][0])) for r in mine],
                [max(0.0, (r["fid"][2] if r["fid"][2] is not None else r["fid"][0]) - r["fid"][0]) for r in mine]]
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, marker="o", capsize=2, label=method)
        for r in mine:
            ax.annotate(f"{r['scale']:g}", (r["recall"][0], r["fid"][0]), textcoords="offset points", xytext=(4, 3),
                        fontsize=7)
    ax.set_xlabel("recall (variety)")
    ax.set_ylabel("FID (CIFAR-10 classifier features)")
    ax.set_title("FID (lower: better) against recall (right: more varied), per scale", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    todo = cells(args)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda cell: run_cell(args, *cell), todo))
    table = markdown(rows, args)
    print("\n" + table)
    (out / "table.md").write_text(table)
    (out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, out / "fid_vs_recall.png")
    print(f"wrote {out / 'table.md'}, {out / 'table.json'} and {out / 'fid_vs_recall.png'}")
    return rows


if __name__ == "__main__":
    from diffusion.errors import exit_on_user_error

    exit_on_user_error(main)()
