"""Held-out accuracy of a noise-aware classifier in 10 timestep buckets (CSV, PNG and a printed table).

A guiding classifier must be right on noisy inputs, not only clean ones: this shows where it stops
being useful (accuracy falls to chance as t approaches T).

  python -m diffusion.evaluate classifier --checkpoint runs/classifier_shapes --num-samples 2000
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..checkpoints.load import load_model
from ..checkpoints.store import run_dir_of
from ..config import Config, DataConfig
from ..data import build_dataset
from ..device import pick_device
from ..errors import UserError
from ..models.classifier import NoisyClassifier
from ..sampling.schedule import build_schedule, build_train_scheduler
from .buckets import bucket_accuracy, format_table, noise_positions, noisy_inputs, write_bucket_report

PREVIEW_SAMPLES = 600  # held-out images per training-time accuracy report (60 per timestep bucket)
REPORT_NAME = "classifier_accuracy"


def held_out_split(data: DataConfig) -> str:
    """The split reserved for evaluation (image folders without a test/ folder reuse their images)."""
    if data.name == "imagefolder" and not (Path(data.root) / "test").is_dir():
        print(f"note: {data.root} has no test/ folder; accuracy is measured on training images")
    return "test"


@torch.no_grad()
def held_out_accuracy(model: NoisyClassifier, cfg: Config, num_samples: int, seed: int = 0,
                      batch_size: int = 256) -> list[dict]:
    """Accuracy on noised held-out images in 10 timestep buckets (`bucket_accuracy` rows).

    Images are a seeded random subset of the held-out split; timesteps are stratified so every
    bucket gets the same number of images; the noise is seeded, so reports are comparable across steps.
    """
    dataset = build_dataset(cfg.data, held_out_split(cfg.data))
    scheduler, schedule = build_train_scheduler(cfg.diffusion), build_schedule(cfg.diffusion)
    total = noise_positions(schedule)
    generator = torch.Generator().manual_seed(seed)
    n = min(num_samples, len(dataset))
    indices = torch.randperm(len(dataset), generator=generator)[:n].tolist()
    timesteps = ((torch.arange(n) + 0.5) * total / n).long()[torch.randperm(n, generator=generator)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = []
    try:
        for start in range(0, n, batch_size):
            x0 = torch.stack([dataset[i]["image"] for i in indices[start:start + batch_size]])
            labels = torch.tensor([dataset[i]["label"] for i in indices[start:start + batch_size]])
            t = timesteps[start:start + len(x0)]
            x_t, t_in = noisy_inputs(schedule, scheduler, x0, torch.randn(x0.shape, generator=generator), t)
            logits = model(x_t.to(device), t_in.to(device))
            correct.append(logits.argmax(dim=-1).cpu() == labels)
    finally:
        model.train(was_training)
    return bucket_accuracy(torch.cat(correct), timesteps, total, schedule=schedule)


def summary_line(rows: list[dict]) -> str:
    """'acc by t: 0-99 0.98 | ... | mean 0.71' for logs and the training bar."""
    cells = " ".join(f"{r['accuracy']:.2f}" for r in rows)
    valid = [r["accuracy"] for r in rows if r["n"]]
    return f"held-out accuracy per t bucket (low t first): {cells} | mean {sum(valid) / max(1, len(valid)):.3f}"



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
