"""Noise-aware CLIP diagnostics: image->text retrieval accuracy of held-out x_t in 10 timestep buckets.

Each held-out image is noised at a timestep stratified over the buckets and retrieves among the
distinct captions of the evaluated images. Writes CSV and PNG.

  python -m diffusion.evaluate clip --checkpoint runs/clip_shapes
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..checkpoints.load import load_model
from ..checkpoints.store import run_dir_of
from ..config import Config
from ..data import build_dataset
from ..device import pick_device
from ..errors import UserError
from ..models.clip import NoisyCLIP
from ..sampling.schedule import build_schedule, build_train_scheduler
from .buckets import bucket_accuracy, format_table, noise_positions, noisy_inputs, write_bucket_report

DIAGNOSTICS_DIR = "diagnostics"
REPORT_NAME = "clip_retrieval"


def retrieval_hits(logits: torch.Tensor, candidates: list[str], right: list[set[str]]) -> torch.Tensor:
    """Whether each row's top-scoring candidate caption is one of its right captions."""
    return torch.tensor([candidates[j] in ok for j, ok in zip(logits.argmax(dim=1).tolist(), right)])


def right_captions(captions: list[str], labels: list[int], by_label: bool) -> list[set[str]]:
    """The captions that count as a right retrieval for each image: any caption of an image of its
    class when classes exist (template captions vary in wording, not content), else its own."""
    if not by_label:
        return [{c} for c in captions]
    of_label: dict[int, set[str]] = {}
    for caption, label in zip(captions, labels):
        of_label.setdefault(label, set()).add(caption)
    return [of_label[label] for label in labels]


@torch.no_grad()
def retrieval_buckets(model: NoisyCLIP, cfg: Config, num_samples: int = 1000, buckets: int = 10, seed: int = 0,
                      batch_size: int = 250, split: str = "test") -> tuple[list[dict], float]:
    """Image->text retrieval accuracy of held-out x_t per timestep bucket, and the chance level.

    Each image is noised at a t stratified over the buckets and retrieves among the distinct
    captions of the evaluated images. It is right when the best caption is one of an image of its
    class (for datasets with classes; "a red circle" and "a small red circle" both describe a red
    circle), else when it is its own caption. Chance: the expected accuracy of a random caption.
    """
    dataset = build_dataset(cfg.data, split)
    gen = torch.Generator().manual_seed(seed)
    n = min(num_samples, len(dataset))
    indices = torch.randperm(len(dataset), generator=gen)[:n].tolist()
    scheduler, schedule = build_train_scheduler(cfg.diffusion), build_schedule(cfg.diffusion)
    total = noise_positions(schedule)
    width = total / buckets
    t = ((torch.arange(n) % buckets) * width + torch.rand(n, generator=gen) * width).long().clamp(max=total - 1)
    items = [dataset[i] for i in indices]
    captions = [item["caption"] for item in items]
    candidates = sorted(set(captions))
    right = right_captions(captions, [int(item["label"]) for item in items], getattr(dataset, "num_classes", 0) > 1)
    device = model.logit_scale.device
    was_training = model.training
    model.eval()
    try:
        text = model.encode_prompts(candidates)
        correct = []
        for start in range(0, n, batch_size):
            x0 = torch.stack([item["image"] for item in items[start:start + batch_size]])
            tb = t[start:start + batch_size]
            x_t, t_in = noisy_inputs(schedule, scheduler, x0, torch.randn(x0.shape, generator=gen), tb)
            image = model.encode_image(x_t.to(device), t_in.to(device))
            correct.append(retrieval_hits(image @ text.T, candidates, right[start:start + batch_size]))
    finally:
        model.train(was_training)
    chance = sum(len(ok) for ok in right) / (n * len(candidates))
    return bucket_accuracy(torch.cat(correct), t, total, buckets, schedule), chance


def write_report(rows: list[dict], chance: float, out_dir: Path, name: str) -> tuple[Path, Path]:
    title = f"CLIP image->text retrieval (chance {chance:.3f})"
    return write_bucket_report(rows, out_dir, name, title)




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
