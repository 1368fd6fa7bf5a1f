"""Peak memory of training and of sampling at the shipped configs, each measured in its own subprocess.

CPU: the subprocess's peak resident set size (ru_maxrss), and what it added after imports.
CUDA: torch.cuda.max_memory_allocated. Training = forward, backward, AdamW and EMA steps on random
batches of the config's batch size (the config's mixed precision on GPU); sampling = the config's
preview sampler, guidance and batch (sample.num_samples) with random weights (memory does not
depend on the values). Models that need a dataset for their class count fall back to a known count.

  python benchmarks/memory.py                                                  # every configs/*.yaml
  python benchmarks/memory.py --configs configs/shapes.yaml,configs/cifar10.yaml --train-batch 8 --sample-batch 8
"""
from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from diffusion.cli.help_format import DefaultsHelpFormatter  # noqa: E402  (torch-free)



def build_parser() -> argparse.ArgumentParser:
    """The options (torch-free, so --help is fast)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--configs", default=None, help="comma-separated config files (default: configs/*.yaml)")
    parser.add_argument("--train-batch", type=int, default=None, help="override train.batch_size (default: the config's)")
    parser.add_argument("--sample-batch", type=int, default=None, help="override the sampling batch (default: sample.num_samples)")
    parser.add_argument("--train-steps", type=int, default=2, help="training steps (optimizer state appears at the first)")
    parser.add_argument("--sample-steps", type=int, default=2, help="sampling steps (memory does not grow with steps)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", choices=("train", "sample"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":  # --help and bad flags answer before torch is imported (0.1 s, not 10-30 s)
    build_parser().parse_args()

from benchmarks.common import header, parse_list, table, write_json  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)



def worker(args: argparse.Namespace) -> dict:
    """Runs in the subprocess: one training or sampling measurement, printed as JSON."""
    import torch
    from diffusers.training_utils import EMAModel

    from benchmarks.common import autocast, cuda_peak, peak_rss_mib, resolve_num_classes, synthetic_batch
    from diffusion.config import load_config
    from diffusion.device import pick_device
    from diffusion.checkpoints.load import LoadedModel
    from diffusion.checkpoints.store import TrainState
    from diffusion.sampling.plan import SampleItem, SamplerSettings, SamplingPlan, run_plan
    from diffusion.sampling.schedule import NoiseSchedule
    from diffusion.training.tasks import build_task

    device = pick_device(args.device)
    cfg = load_config(args.config)
    resolve_num_classes(cfg)
    task = build_task(cfg)
    baseline = peak_rss_mib()
    model = task.build_model().to(device)
    if device.type == "cuda" and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dtype = "bf16" if device.type == "cuda" and cfg.train.mixed_precision == "bf16" else "fp32"
    result = {"parameters (M)": sum(p.numel() for p in model.parameters()) / 1e6}
    with cuda_peak(device) as cuda:
        if args.worker == "train":
            batch_size = args.train_batch or cfg.train.batch_size
            optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, fused=device.type == "cuda")
            ema = EMAModel(model.parameters(), decay=cfg.train.ema_decay, foreach=True)
            ema.to(device)
            batch = synthetic_batch(cfg, batch_size, device, device.type == "cuda" and cfg.train.channels_last)
            model.train()
            for _ in range(args.train_steps):
                with autocast(device, dtype):
                    loss, _ = task.loss(model, model, batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                ema.step(model.parameters())
        else:
            batch_size = args.sample_batch or cfg.sample.num_samples
            model.eval().requires_grad_(False)
            schedule = NoiseSchedule.from_config(cfg.diffusion).to(device)
            loaded = LoadedModel(cfg, model, schedule, TrainState(), Path(args.config))
            plan = SamplingPlan([SampleItem(seed=i, cond=model.preview_condition(i)) for i in range(batch_size)])
            settings = SamplerSettings(cfg.sample.sampler, args.sample_steps, cfg.sample.guidance_scale, batch_size, dtype)
            run_plan(loaded, plan, settings, bar=False)
    peak = peak_rss_mib()
    return {**result, "batch": batch_size, "dtype": dtype, "RSS after imports MiB": baseline,
            "peak RSS MiB": peak, "added RSS MiB": peak - baseline, **cuda}


def measure(config: str, mode: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--config", config,
               "--train-steps", str(args.train_steps), "--sample-steps", str(args.sample_steps)]
    for flag, value in (("--train-batch", args.train_batch), ("--sample-batch", args.sample_batch),
                        ("--device", args.device)):
        if value:
            command += [flag, str(value)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    row = {"config": Path(config).name, "mode": mode}
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()] or ["no output"]
        return {**row, "note": f"failed: {lines[-1][:100]}"}
    return {**row, **json.loads(done.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return []
    from diffusion.config import load_config
    from diffusion.device import pick_device

    configs = parse_list(args.configs) if args.configs else sorted(glob.glob(str(ROOT / "configs" / "*.yaml")))
    device = pick_device(args.device)
    print(f"# peak memory, one subprocess per row; {header(device)}")
    rows = []
    for config in configs:
        modes = ["train"] + (["sample"] if load_config(config).task == "denoiser" else [])
        for mode in modes:
            rows.append(measure(config, mode, args))
            print(f"  {rows[-1]['config']} {mode}: {rows[-1].get('peak RSS MiB', rows[-1].get('note'))}", flush=True)
    columns = ["config", "mode", "parameters (M)", "batch", "dtype", "RSS after imports MiB", "peak RSS MiB",
               "added RSS MiB", "cuda_max_allocated_mib", "note"]
    columns = [c for c in columns if any(c in r for r in rows)]
    print()
    print(table(rows, columns))
    write_json(args.json, {"header": header(device), "rows": rows})
    return rows


if __name__ == "__main__":
    from diffusion.errors import exit_on_user_error

    exit_on_user_error(main)()  # bad input (a missing run, --steps out of range): one line, exit status 2
