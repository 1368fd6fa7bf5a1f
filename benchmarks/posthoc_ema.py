"""Post-hoc EMA against the shipped EMA and the raw weights: FID (and KID, precision, recall where the
report has them) of EMAs reconstructed at several sigma_rel from one run's snapshots.

For a run trained with `train.posthoc_ema=true` (e.g. configs/cifar10_16_edm.yaml with
train.posthoc_ema=true train.posthoc_ema_every=100), it reconstructs each --sigma-rels value
(`python -m diffusion.ema reconstruct`; a value the snapshots cannot express becomes a "refused" row),
writes the raw weights of the newest checkpoint (`python -m diffusion.ema raw`), and scores each model
and the run's own EMA with one `python -m diffusion.evaluate fid` command (printed, so any row can be
rerun alone). Out: OUT/table.json, OUT/table.md and OUT/fid_vs_sigma_rel.png (FID against sigma_rel,
as EDM2's Figure 5, with the shipped EMA and the raw weights as lines).

  python benchmarks/posthoc_ema.py --run runs/cifar10_16_edm_phema --extractor runs/extractors/cifar10_16.pt \\
      --reference-root data/cifar10-jpeg --out runs/reports/posthoc_ema
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fid_cells import CellFailed, fid_command, run_fid  # noqa: E402  (torch-free)
from diffusion.cli.help_format import DefaultsHelpFormatter  # noqa: E402  (torch-free)

DEFAULT_SIGMAS = "0.01,0.02,0.03,0.05,0.07,0.10,0.13,0.16,0.20,0.25,0.28"  # 0.3 is past 1/sqrt(12) = 0.2887


def build_parser() -> argparse.ArgumentParser:
    """The options (torch-free, so --help is fast)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--run", required=True, help="the run folder, trained with train.posthoc_ema=true")
    parser.add_argument("--extractor", default=None,
                        help="TorchScript feature extractor (evaluate train-extractor); default: Inception (needs its weights)")
    parser.add_argument("--reference-root", required=True, help="the reference image folder (train/ and test/)")
    parser.add_argument("--reference", default="imagefolder", help="evaluate fid --reference NAME (the split is added)")
    parser.add_argument("--reference-split", default="test")
    parser.add_argument("--sigma-rels", default=DEFAULT_SIGMAS, help="comma-separated sigma_rel values to reconstruct")
    parser.add_argument("--step", type=int, default=None, help="reconstruct at this snapshot step (default: the last)")
    parser.add_argument("--max-residual", type=float, default=0.25, help="passed to diffusion.ema reconstruct")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--sampler", default=None, help="default: the run's config")
    parser.add_argument("--steps", type=int, default=None, help="default: the run's config")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="1 = plain conditional sampling")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--jobs", type=int, default=2, help="models evaluated at once (one thread each)")
    parser.add_argument("--extra", default="", help="more evaluate fid options for every row")
    parser.add_argument("--out", default="runs/reports/posthoc_ema", help="folder for the reports, table and plot")
    return parser


if __name__ == "__main__":  # --help and bad flags answer before torch is imported
    build_parser().parse_args()


def score(args: argparse.Namespace, row: dict) -> dict:
    """One evaluate fid run: the row gains fid, kid, precision, recall (those the report has), or an error."""
    out = Path(args.out)
    options = ["--guidance-scale", f"{args.guidance_scale:g}"]
    options += ["--sampler", args.sampler] if args.sampler else []
    options += ["--steps", str(args.steps)] if args.steps else []
    report_path = out / f"{row['name']}.json"
    command = fid_command(row["model"], report_path, out / "samples" / row["name"],
                          reference=f"{args.reference}:{args.reference_split}", reference_root=args.reference_root,
                          extractor=args.extractor, num_samples=args.num_samples, batch_size=args.batch_size,
                          options=options, extra=args.extra)
    try:
        report, row["seconds"] = run_fid(command, report_path)
    except CellFailed as err:
        row["error"] = str(err).splitlines()[-1]
        return row
    for key in ("fid", "fid_ci95", "kid_mean", "kid_std", "precision", "recall"):
        if report.get(key) is not None:
            row[key] = report[key]
    return row


def models(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Reconstruct every sigma_rel (refusals become rows), the raw weights and the run's own EMA."""
    from diffusion.checkpoints import store
    from diffusion.ema import reconstruct as rec
    from diffusion.errors import UserError, one_line

    run = Path(args.run)
    rows = []
    for sigma in rec.parse_sigma_rels(args.sigma_rels):
        row = {"name": f"sigma_rel-{sigma:.3f}", "kind": "post-hoc", "sigma_rel": sigma}
        try:
            (path,) = rec.reconstruct(run, [sigma], args.step, None, args.max_residual, progress=False)
            info = store._read_info_json(path)["posthoc_ema"]
            row.update(model=str(path), residual=info["relative_residual"], step=info["step"])
        except UserError as err:
            row["refused"] = one_line(err)
        rows.append(row)
    raw = rec.raw_weights(run, args.step)
    rows.append({"name": raw.name, "kind": "raw weights", "model": str(raw), "step": store.read_info(raw).step})
    shipped = store.resolve_checkpoint(run) if args.step is None else next(
        c for c in store.list_checkpoints(run) if store.read_info(c).step == args.step)
    rows.append({"name": "shipped_ema", "kind": "ordinary EMA (train.ema_decay)", "model": str(shipped),
                 "step": store.read_info(shipped).step})
    cfg = rec.run_config(run)
    snaps = [s for s, _ in rec.phema.snapshot_steps(run)]
    context = {"run": str(run), "max_steps": cfg.train.max_steps, "posthoc_ema_every": cfg.train.posthoc_ema_every,
               "tracked_sigma_rels": cfg.train.posthoc_ema_sigma_rels, "snapshots": len(snaps),
               "ema_decay": cfg.train.ema_decay, "num_samples": args.num_samples}
    return rows, context


def number(row: dict, key: str, digits: int) -> str:
    value = row.get(key)
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def markdown(rows: list[dict], context: dict) -> str:
    lines = [f"run `{context['run']}`: {context['max_steps']} steps, snapshots every {context['posthoc_ema_every']} "
             f"steps ({context['snapshots']} of profiles {context['tracked_sigma_rels']}), {context['num_samples']} "
             "samples per row", "",
             "| model | sigma_rel | FID | KID | precision | recall | fit residual |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        sigma = f"{r['sigma_rel']:.3f}" if "sigma_rel" in r else "-"
        if r.get("refused") or r.get("error"):
            lines.append(f"| {r['kind']} | {sigma} | {r.get('refused') or r.get('error')} | | | | |")
            continue
        lines.append(f"| {r['kind']} | {sigma} | {number(r, 'fid', 3)} | {number(r, 'kid_mean', 5)} | "
                     f"{number(r, 'precision', 3)} | {number(r, 'recall', 3)} | {number(r, 'residual', 3)} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["sigma_rel"], r["fid"]) for r in rows if "sigma_rel" in r and "fid" in r]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, "o-", label="post-hoc EMA")
        best = min(points, key=lambda p: p[1])
        ax.plot(*best, "*", markersize=14, label=f"best: sigma_rel {best[0]:.3f}")
    for r, style in ((next((r for r in rows if r["kind"].startswith("ordinary") and "fid" in r), None), "--"),
                     (next((r for r in rows if r["kind"] == "raw weights" and "fid" in r), None), ":")):
        if r is not None:
            ax.axhline(r["fid"], linestyle=style, color="gray", label=f"{r['kind']}: {r['fid']:.2f}")
    ax.set_xscale("log")
    if points:  # label the measured widths themselves (log-scale minor labels overlap)
        from matplotlib.ticker import NullFormatter

        ax.set_xticks(xs, [f"{x:g}" for x in xs], fontsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("sigma_rel (EMA length relative to training time)")
    ax.set_ylabel("FID")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from diffusion.errors import UserError, one_line
    from diffusion.io import check_output_path

    out = check_output_path(args.out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    try:
        rows, context = models(args)
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    todo = [r for r in rows if "model" in r]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(lambda r: score(args, r), todo))
    scored = [r for r in rows if "fid" in r and "sigma_rel" in r]
    shipped = next((r for r in rows if r["kind"].startswith("ordinary") and "fid" in r), None)
    summary = {}
    if scored:
        best = min(scored, key=lambda r: r["fid"])
        summary = {"best_sigma_rel": best["sigma_rel"], "best_fid": best["fid"]}
        if shipped:
            summary["shipped_ema_fid"] = shipped["fid"]
            summary["gain_over_shipped"] = shipped["fid"] - best["fid"]
        spread = max(r["fid"] for r in scored) - best["fid"]
        summary["fid_spread_over_sigma_rel"] = spread
    (out / "table.json").write_text(json.dumps({"context": context, "rows": rows, "summary": summary}, indent=2))
    (out / "table.md").write_text(markdown(rows, context))
    plot(rows, out / "fid_vs_sigma_rel.png")
    print(markdown(rows, context))
    if summary:
        gain = f", {summary['gain_over_shipped']:+.3f} FID against the shipped EMA ({summary['shipped_ema_fid']:.3f})" \
            if "gain_over_shipped" in summary else ""
        print(f"best sigma_rel {summary['best_sigma_rel']:.3f}: FID {summary['best_fid']:.3f}{gain}; FID spread over "
              f"sigma_rel {summary['fid_spread_over_sigma_rel']:.3f} ({context['max_steps']} steps, a snapshot every "
              f"{context['posthoc_ema_every']})")
    print(f"wrote {out / 'table.json'}, {out / 'table.md'}, {out / 'fid_vs_sigma_rel.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
