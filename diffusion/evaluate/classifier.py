"""Held-out accuracy of a noise-aware classifier in 10 timestep buckets (CSV, PNG and a printed table).

A guiding classifier must be right on noisy inputs, not only clean ones: this shows where it stops
being useful (accuracy falls to chance as t approaches T).

  python -m diffusion.evaluate classifier --checkpoint runs/classifier_shapes --num-samples 2000
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..classifier import REPORT_NAME, held_out_accuracy
from ..errors import UserError
from ..device import pick_device
from ..generate import load_model
from ..training.checkpoint import run_dir_of
from .buckets import format_table, write_bucket_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="classifier run directory or checkpoint (task: classifier)")
    parser.add_argument("--num-samples", type=int, default=2000, help="held-out images, spread evenly over the buckets")
    parser.add_argument("--out", default=None, help="output directory (default: RUN/eval)")
    parser.add_argument("--seed", type=int, default=0, help="picks the images, timesteps and noise")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")


def run(args: argparse.Namespace) -> list[dict]:
    if args.num_samples < 10 or args.batch_size <= 0:
        raise UserError("--num-samples must be at least 10 (one per bucket) and --batch-size positive")
    device = pick_device(args.device)
    loaded = load_model(args.checkpoint, device)
    if loaded.cfg.task != "classifier":
        raise UserError(f"{args.checkpoint} is a {loaded.cfg.task} checkpoint; this command needs a task: classifier run")
    rows = held_out_accuracy(loaded.model, loaded.cfg, args.num_samples, args.seed, args.batch_size)
    out = Path(args.out) if args.out else run_dir_of(loaded.path) / "eval"
    chance = 1 / loaded.cfg.model.num_classes
    title = f"noisy classifier ({loaded.cfg.data.name}, step {loaded.info.step})"
    csv_path, png_path = write_bucket_report(rows, out, REPORT_NAME, title, chance=chance)
    print(format_table(rows))
    print(f"chance = {chance:.3f}; wrote {csv_path} and {png_path}")
    return rows
