"""Device choice and the GPU fast path, shared by training, sampling, evaluation and the benchmarks."""
from __future__ import annotations

import warnings

import torch

from .choices import PRECISIONS  # noqa: F401  (re-exported)
from .errors import UserError


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """The named device, else CUDA when available, else CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def use_fast_cuda_math(device: torch.device, allow_tf32: bool = True) -> None:
    """Training on CUDA: TF32 matmuls and convolutions (when allowed) and cuDNN autotuning, which
    suits fixed-size batches. Sampling leaves autotuning off: it may pick other kernels per run."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    if allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def compile_model(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """torch.compile, without dynamo's warning about the lru_cache'd version check in diffusers'
    up-sampling blocks (it is traced correctly; the warning repeats once per block otherwise)."""
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    return torch.compile(model, backend=backend)


def default_precision(device: torch.device) -> str:
    """bf16 autocast on GPUs (what the benchmarks measure), fp32 elsewhere."""
    return "bf16" if device.type == "cuda" else "fp32"


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The dtype a denoiser runs in under `precision`, or None for plain fp32."""
    return torch.bfloat16 if precision == "bf16" else None


def prepare_for_sampling(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """On CUDA: TF32 matmuls and convolutions, and channels_last weights; elsewhere nothing."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        model.to(memory_format=torch.channels_last)
    return model


def check_mixed_precision(mode: str, device: torch.device) -> None:
    """Refuse a `train.mixed_precision` the training device cannot run (accelerate would go on in fp32
    for fp16 on a CPU, or fail at the first step for bf16 on a GPU without it)."""
    if mode == "fp16" and device.type != "cuda":
        raise UserError(f"train.mixed_precision=fp16 needs a CUDA GPU, but this run trains on the {device.type}: "
                        "use bf16 or no")
    if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"train.mixed_precision=bf16: {torch.cuda.get_device_name(device)} cannot compute in bf16: "
                        "use fp16 or no")
