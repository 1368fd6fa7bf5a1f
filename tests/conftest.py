"""Shared fixtures: a tiny config and one tiny trained run reused by several tests."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Generated-input tests (tests/test_properties_*.py): a fast profile for the suite, a long one for
# benchmarks/ (HYPOTHESIS_PROFILE=long). No deadline: a 2-core machine shared with other jobs is slow at times.
settings.register_profile("fast", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

# OpenMP threads sleep instead of spinning while they wait, as the command lines do (diffusion/threads.py);
# set before torch is imported. On a CPU shared with other jobs spinning made the suite several times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# pytest-xdist's workers (pyproject's addopts: -n auto) share the cores: one thread each, else two.
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))

TINY = [
    "data.resolution=8", "data.shapes_size=64", "model.base_channels=16", "model.channel_mult=[1,2]",
    "model.layers_per_block=1", "model.attention_resolutions=[]", "model.attention_head_dim=8",
    "diffusion.num_train_timesteps=100", "train.batch_size=4", "train.warmup_steps=1", "train.log_every=1",
    "train.sample_every=0", "train.checkpoint_every=2", "sample.steps=3", "sample.num_samples=2",
]
UP = ["data.resolution=16", "model.upsample=true", "upsample.factor=2"]  # 8 -> 16: chains with tiny_run (8 px)


def tiny_config(tmp: Path, *extra: str, config: str = "configs/shapes.yaml"):
    from diffusion.checkpoints.diffusers_folder import fill_from_pretrained
    from diffusion.config import load_config

    return load_config(ROOT / config, [*TINY, f"output_dir={tmp}", *extra], prepare=fill_from_pretrained)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A class-conditional shapes run trained for 4 steps (checkpoints at 2 and 4, final export)."""
    from diffusion.training.trainer import train

    run = tmp_path_factory.mktemp("tiny_run")
    train(tiny_config(run, "train.max_steps=4"))
    return run


@pytest.fixture(scope="session")
def up_run(tmp_path_factory) -> Path:
    """A class-conditional 8 -> 16 shapes upsampler trained for 2 steps through the ordinary loop."""
    from diffusion.training.trainer import train

    run = tmp_path_factory.mktemp("up_run")
    train(tiny_config(run, "train.max_steps=2", *UP))
    return run


def cli_result(main, argv: list[str], capsys) -> tuple[int, list[str], str]:
    """(exit status, non-empty stderr lines without progress bars, stdout) of a CLI entry point run
    in-process, as a shell would see them."""
    capsys.readouterr()
    try:
        main(argv)
        status = 0
    except SystemExit as exit:
        status = exit.code
    captured = capsys.readouterr()
    return status, [line for line in captured.err.splitlines() if line.strip() and "%|" not in line], captured.out
