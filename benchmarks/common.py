"""Shared pieces of the benchmark scripts: device and precision setup, timing, peak FLOP/s, tables.

The scripts run from the repository root (`python benchmarks/NAME.py`; each puts the root on
sys.path first) on CPU or CUDA unchanged.
"""
from __future__ import annotations

import contextlib
import json
import platform
import resource
import time
from pathlib import Path
from typing import Callable, Iterator

if __name__ == "__main__":  # a library of the benchmark scripts, not a command: say so at once
    raise SystemExit(print(__doc__.strip() + "\n\nRun one of the scripts beside it, e.g. python benchmarks/sampling_speed.py --help"))

import torch  # noqa: E402

# Dense peak TFLOP/s per precision (NVIDIA data sheets; no 2:4 sparsity). The bf16 column is the
# one MFU is quoted against; fp32 runs with TF32 matmuls use the tf32 column.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200 NVL": {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def set_threads(threads: int | None) -> None:
    """CPU threads for torch; on a shared, oversubscribed CPU one thread avoids OpenMP spin-waiting."""
    if threads:
        torch.set_num_threads(threads)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def peak_tflops(device: torch.device, precision: str, override: float | None) -> float | None:
    """Peak dense TFLOP/s of the device for `precision` (bf16 | tf32 | fp32); None when unknown (CPU)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():  # longest, most specific keys come first
        if key in name:
            return peaks[precision]
    return None


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls of `fn`, each fully synchronised."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def parse_list(text: str, kind: type = str) -> list:
    return [kind(v.strip()) for v in text.split(",") if v.strip()]


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of `rows` (missing cells blank; floats to 4 significant digits)."""
    def cell(value) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def header(device: torch.device) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"{stamp}, {device_name(device)}, torch {torch.__version__}"


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, default=str))


@contextlib.contextmanager
def cuda_peak(device: torch.device) -> Iterator[dict]:
    """Collects the CUDA max-allocated MiB of the block into the yielded dict."""
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield out
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20


KNOWN_CLASSES = {"cifar10": 10, "shapes": 12}


def resolve_num_classes(cfg) -> None:
    """Fill `model.num_classes` (0 = from the dataset) without needing the dataset on disk."""
    if cfg.model.num_classes:
        return
    from diffusion.data import build_dataset
    from diffusion.errors import UserError

    try:
        cfg.model.num_classes = build_dataset(cfg.data).num_classes
    except (UserError, OSError):
        cfg.model.num_classes = KNOWN_CLASSES.get(cfg.data.name, 10)


def synthetic_batch(cfg, batch_size: int, device: torch.device, channels_last: bool = False) -> dict:
    """A training batch of random images, labels and captions: throughput without data loading."""
    res = cfg.data.resolution
    images = torch.rand(batch_size, 3, res, res, device=device) * 2 - 1
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, max(1, cfg.model.num_classes), (batch_size,), device=device)
    return {"image": images, "label": labels, "caption": ["a small red circle"] * batch_size}
