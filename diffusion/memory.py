"""Will it fit? The memory a training run or a batch of samples needs at the least, checked against
what the device has free before anything is allocated, so `data.resolution=100000` or
`--num-samples 1000000000` is one line instead of a kill by the OOM killer or a traceback.

The estimates are lower bounds (weights, gradients, AdamW and EMA state; one saved feature map per
U-Net block at full resolution; the images sampling keeps): a refused run could never have fit, and
a run that passes may still run out of memory for reasons a lower bound cannot see.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import UserError

TRAINING_BYTES_PER_PARAM = 20  # fp32 weights + gradients + AdamW's two moments + the EMA copy


def host_free_bytes() -> int:
    """Memory this process can still take on the host: MemAvailable, or less under a cgroup limit."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:  # a container's limit (cgroup v2)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_free_bytes()


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n < 2**50 else f"{n / 2**40:.3g} TiB"


def check_fits(need: float, device: torch.device, what: str, fix: str) -> None:
    """Refuse in one line when `need` bytes exceed what `device` has free."""
    free = free_bytes(device)
    if need > free:
        raise UserError(f"{what} needs at least {gib(need)} of memory but {device.type} has {gib(free)} free: {fix}")


def parameter_count(cfg) -> int:
    """Parameters of the model `cfg` builds, counted on the meta device (nothing is allocated)."""
    from .models import build_model

    with torch.device("meta"):
        return sum(p.numel() for p in build_model(cfg).parameters())


def check_training_memory(cfg, device: torch.device, per_device_batch: int) -> None:
    """A training run's lower bound: model state, and one feature map per block at full resolution."""
    params = parameter_count(cfg)
    res, base = cfg.data.resolution, cfg.model.base_channels
    activations = per_device_batch * res * res * base * cfg.model.layers_per_block * 2 * 2  # down and up, >= 16 bit
    need = params * TRAINING_BYTES_PER_PARAM + activations
    check_fits(need, device, f"this run ({params:,} parameters, data.resolution {res}, {per_device_batch} images a "
               "batch per device)", "lower data.resolution, model.base_channels, model.channel_mult or train.batch_size")


def check_sampling_memory(images: int, batch: int, resolution: int, device: torch.device) -> None:
    """Sampling keeps every image (fp32, on the host; twice while they are joined) and holds a batch of
    x, x0 and eps on the device."""
    per_image = 3 * resolution * resolution * 4
    check_fits(2 * images * per_image, torch.device("cpu"), f"{images:,} samples of {resolution}x{resolution}",
               "lower --num-samples (or sample fewer classes or prompts per call)")
    check_fits(3 * min(batch, images) * per_image, device, f"a batch of {batch:,} samples", "lower --batch-size")
