"""Noise-aware CLIP diagnostics: image->text retrieval accuracy of held-out x_t in 10 timestep buckets.

Each held-out image is noised at a timestep stratified over the buckets and retrieves among the
distinct captions of the evaluated images. Writes CSV and PNG.

  python -m diffusion.evaluate clip --checkpoint runs/clip_shapes
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..clip import DIAGNOSTICS_DIR, REPORT_NAME, retrieval_buckets, write_report
from ..errors import UserError
from ..device import pick_device
from ..generate import load_model
from ..training.checkpoint import run_dir_of
from .buckets import format_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="CLIP run directory or checkpoint (task: clip)")
    parser.add_argument("--num-samples", type=int, default=2000, help="held-out images (spread over the buckets)")
    parser.add_argument("--split", default="test", help="held-out split of the run's dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help=f"output directory (default: RUN/{DIAGNOSTICS_DIR})")
    parser.add_argument("--device", default=None)


def run(args: argparse.Namespace) -> None:
    if args.num_samples <= 0:
        raise UserError("--num-samples must be positive")
    device = pick_device(args.device)
    loaded = load_model(args.checkpoint, device)
    if loaded.cfg.task != "clip":
        raise UserError(f"{args.checkpoint} is a {loaded.cfg.task} checkpoint; this evaluation needs a CLIP run (task: clip)")
    rows, chance = retrieval_buckets(loaded.model, loaded.cfg, args.num_samples, seed=args.seed, split=args.split)
    out = Path(args.out) if args.out else run_dir_of(loaded.path) / DIAGNOSTICS_DIR
    csv_path, png_path = write_report(rows, chance, out, REPORT_NAME)
    print(f"image->text retrieval on {args.split} ({loaded.path}, step {loaded.info.step}); chance {chance:.3f}")
    print(format_table(rows))
    print(f"wrote {csv_path} and {png_path}")
