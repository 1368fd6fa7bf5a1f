"""Training throughput of the configs/cifar10.yaml denoiser: images/s by batch size, precision and variant.

Variants: eager, channels_last, compile (torch.compile), compile+channels_last; precisions fp32
(TF32 matmuls on GPU, as the trainer sets) and bf16 autocast. One step = forward, loss, backward,
gradient clipping, AdamW (fused on GPU) and the EMA update, on random batches (no data loading).
MFU = (3 x forward FLOPs per step, counted by torch.utils.flop_counter) / step time / peak FLOP/s.

  python benchmarks/training_speed.py                                    # GPU defaults
  python benchmarks/training_speed.py --batch-sizes 4 --variants eager   # CPU: shorter still (compile: minutes)
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.cli.help_format import DefaultsHelpFormatter  # noqa: E402  (torch-free)


VARIANTS = ("eager", "channels_last", "compile", "compile+channels_last")


def build_parser() -> argparse.ArgumentParser:
    """The options (torch-free, so --help is fast)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--config", default="configs/cifar10.yaml")
    parser.add_argument("overrides", nargs="*", help="config overrides, dotted.key=value")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default GPU 64,128,256; CPU 4,8)")
    parser.add_argument("--variants", default=None, help=f"comma-separated from {', '.join(VARIANTS)} "
                                                         "(default GPU all; CPU eager,channels_last)")
    parser.add_argument("--dtypes", default=None, help="comma-separated fp32,bf16 (default GPU bf16,fp32; CPU fp32)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default GPU 10, CPU 1; compile needs some)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default GPU 30, CPU 2)")
    parser.add_argument("--no-ema", action="store_true", help="leave out the EMA update")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s for MFU (default: table by GPU name)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    return parser


if __name__ == "__main__":  # --help and bad flags answer before torch is imported (0.1 s, not 10-30 s)
    build_parser().parse_args()

import torch  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from benchmarks.common import (autocast, header, parse_list, peak_tflops, resolve_num_classes,  # noqa: E402
                               set_threads, synthetic_batch, table, timed, write_json)
from diffusion.config import load_config  # noqa: E402
from diffusion.device import compile_model, pick_device, use_fast_cuda_math  # noqa: E402
from diffusion.training.tasks import build_task  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    gpu = pick_device(args.device).type == "cuda"
    args.batch_sizes = parse_list(args.batch_sizes or ("64,128,256" if gpu else "4,8"), int)
    args.variants = parse_list(args.variants or (",".join(VARIANTS) if gpu else "eager,channels_last"))
    args.dtypes = parse_list(args.dtypes or ("bf16,fp32" if gpu else "fp32"))
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    args.iters = args.iters or (30 if gpu else 2)
    for variant in args.variants:
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant}; choose from {', '.join(VARIANTS)}")
    return args


class Setup:
    """Model, optimizer and EMA for one variant, and its training step."""

    def __init__(self, cfg, device: torch.device, variant: str, dtype: str, ema: bool):
        torch.manual_seed(0)
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.task = build_task(cfg)
        self.channels_last = "channels_last" in variant
        cfg.train.channels_last = self.channels_last
        self.model = self.task.build_model().to(device).train()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.runner = compile_model(self.model) if "compile" in variant else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr, fused=device.type == "cuda")
        self.ema = EMAModel(self.model.parameters(), decay=cfg.train.ema_decay, foreach=True) if ema else None
        if self.ema:
            self.ema.to(device)

    def step(self, batch: dict) -> None:
        with autocast(self.device, self.dtype):
            loss, _ = self.task.loss(self.runner, self.model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema:
            self.ema.step(self.model.parameters())


def forward_flops(cfg, device: torch.device, batch_size: int) -> float:
    """FLOPs of one forward pass (with the loss) at this batch size, counted in fp32 eager mode."""
    setup = Setup(cfg, device, "eager", "fp32", ema=False)
    batch = synthetic_batch(cfg, batch_size, device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        setup.task.loss(setup.model, setup.model, batch)
    del setup
    return float(counter.get_total_flops())


def measure(cfg, args, device: torch.device, batch_size: int, variant: str, dtype: str, flops: float) -> dict:
    row = {"batch": batch_size, "variant": variant, "dtype": dtype}
    try:
        setup = Setup(cfg, device, variant, dtype, ema=not args.no_ema)
        batch = synthetic_batch(cfg, batch_size, device, setup.channels_last)
        first = timed(lambda: setup.step(batch), device, 1)[0]
        timed(lambda: setup.step(batch), device, max(0, args.warmup - 1))
        seconds = statistics.median(timed(lambda: setup.step(batch), device, args.iters))
    except torch.cuda.OutOfMemoryError:
        return {**row, "note": "out of memory"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    achieved = 3 * flops / seconds / 1e12
    peak = peak_tflops(device, "bf16" if dtype == "bf16" else ("tf32" if device.type == "cuda" else "fp32"), args.peak_tflops)
    return {**row, "images/s": batch_size / seconds, "ms/step": seconds * 1e3, "first step s": first,
            "TFLOP/s": achieved, "MFU %": 100 * achieved / peak if peak else None}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = pick_device(args.device)
    set_threads(args.threads)
    use_fast_cuda_math(device)
    cfg = load_config(args.config, args.overrides)
    resolve_num_classes(cfg)
    params = sum(p.numel() for p in build_task(cfg).build_model().parameters())
    print(f"# training throughput: {args.config} ({params / 1e6:.1f}M parameters, {cfg.data.resolution}px)")
    print(f"# {header(device)}; warmup {args.warmup}, median of {args.iters} steps; EMA {'off' if args.no_ema else 'on'}")
    rows = []
    for batch_size in args.batch_sizes:
        flops = forward_flops(cfg, device, batch_size)
        print(f"batch {batch_size}: {flops / batch_size / 1e9:.2f} GFLOP forward per image, x3 for a training step",
              flush=True)
        base = None
        for dtype in args.dtypes:
            for variant in args.variants:
                row = measure(cfg, args, device, batch_size, variant, dtype, flops)
                if "images/s" in row:
                    base = base or row["images/s"]
                    row["speed-up"] = row["images/s"] / base
                print(f"  {variant} {dtype}: {row.get('images/s', 0):.1f} images/s {row.get('note', '')}", flush=True)
                rows.append(row)
    print()
    print(table(rows, ["batch", "variant", "dtype", "images/s", "ms/step", "first step s", "TFLOP/s", "MFU %",
                       "speed-up", "note"]))
    print("\nspeed-up: against the first setting measured at the same batch size; "
          "first step s includes torch.compile's compilation.")
    write_json(args.json, {"header": header(device), "config": args.config, "parameters": params, "rows": rows})
    return rows


if __name__ == "__main__":
    from diffusion.errors import exit_on_user_error

    exit_on_user_error(main)()  # bad input (a missing run, --steps out of range): one line, exit status 2
