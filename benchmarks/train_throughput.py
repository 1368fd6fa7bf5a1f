"""Our training loop against a plain diffusers + torch loop: same U-Net, batch, data and machine.

Both loops log images/s over windows of `--window` steps; the first windows are warm-up. Runs
alternate (ours, reference, ours, ...) so drift in machine load hits both alike. Prints the
median images/s of each and `ratio ours/reference: X` (the target is X >= 0.95 on CPU).

  python benchmarks/train_throughput.py [--config configs/shapes.yaml] [--steps 60] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.cli.help_format import DefaultsHelpFormatter  # noqa: E402  (torch-free)


def build_parser() -> argparse.ArgumentParser:
    """The options (torch-free, so --help is fast)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--config", default="configs/shapes.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--warmup-windows", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.batch_size=64")
    return parser


if __name__ == "__main__":  # --help and bad flags answer before torch is imported (0.1 s, not 10-30 s)
    build_parser().parse_args()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from diffusion.config import load_config  # noqa: E402
from diffusion.data import build_dataloader, build_dataset  # noqa: E402
from diffusion.models import build_denoiser  # noqa: E402
from diffusion.sampling.schedule import build_train_scheduler  # noqa: E402


def ours(cfg, steps: int, window: int) -> list[float]:
    """images/s per logging window, as our trainer itself reports them in metrics.csv."""
    from diffusion.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg.output_dir = tmp
        cfg.train.max_steps, cfg.train.log_every = steps, window
        cfg.train.sample_every, cfg.train.checkpoint_every = 0, 10**9
        Trainer(cfg).fit()
        rows = (Path(tmp) / "metrics.csv").read_text().splitlines()[1:]
        return [float(r.split(",")[3]) for r in rows]


def reference(cfg, steps: int, window: int) -> list[float]:
    """The plain loop: DataLoader, UNet2DModel forward/backward, clip, AdamW. No EMA, no logging."""
    torch.manual_seed(cfg.train.seed)
    dataset = build_dataset(cfg.data)
    cfg.model.num_classes = cfg.model.num_classes or dataset.num_classes
    unet = build_denoiser(cfg.model, cfg.data.resolution, cfg.model.num_classes).unet
    scheduler = build_train_scheduler(cfg.diffusion)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.train.lr)
    loader = build_dataloader(dataset, cfg.data, cfg.train.batch_size, seed=cfg.train.seed)
    rates, step, tick = [], 0, time.perf_counter()
    while step < steps:
        for batch in loader:
            x0, labels = batch["image"], batch["label"]
            noise = torch.randn_like(x0)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],))
            drop = torch.rand(x0.shape[0]) < cfg.model.cond_drop_prob
            labels = torch.where(drop, torch.full_like(labels, cfg.model.num_classes), labels)
            kwargs = {"class_labels": labels} if cfg.model.condition == "class" else {}
            loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t, **kwargs).sample, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % window == 0:
                loss.item()
                now = time.perf_counter()
                rates.append(cfg.train.batch_size * window / (now - tick))
                tick = now
            if step >= steps:
                break
    return rates


def main() -> None:
    args = build_parser().parse_args()
    results: dict[str, list[float]] = {"ours": [], "reference": []}
    for repeat in range(args.repeats):
        for name, fn in (("ours", ours), ("reference", reference)):
            cfg = load_config(args.config, args.overrides)
            rates = fn(cfg, args.steps, args.window)[args.warmup_windows:]
            results[name] += rates
            print(f"repeat {repeat}: {name:9s} median {statistics.median(rates):8.1f} images/s over {len(rates)} windows",
                  flush=True)
    cfg = load_config(args.config, args.overrides)
    print(f"\nconfig {args.config}, batch {cfg.train.batch_size}, resolution {cfg.data.resolution}, "
          f"device cpu, torch threads {torch.get_num_threads()}")
    print(f"{'loop':10s} {'median images/s':>16s} {'windows':>8s}")
    for name, rates in results.items():
        print(f"{name:10s} {statistics.median(rates):16.1f} {len(rates):8d}")
    ratio = statistics.median(results["ours"]) / statistics.median(results["reference"])
    print(f"ratio ours/reference: {ratio:.3f}")


if __name__ == "__main__":
    from diffusion.errors import exit_on_user_error

    exit_on_user_error(main)()  # bad input (a missing run, --steps out of range): one line, exit status 2
