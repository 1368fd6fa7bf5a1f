"""End to end through the command lines: train.py, then sample.py."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffusion.errors import UserError
from diffusion.cli.sample import main as sample_main
from tests.conftest import ROOT, TINY


def _pixels(path):
    return np.asarray(Image.open(path))


def test_train_then_sample_through_the_clis(tmp_path):
    run, out = tmp_path / "run", tmp_path / "samples"
    train = subprocess.run([sys.executable, "train.py", "configs/shapes.yaml", *TINY, "train.max_steps=2",
                            f"output_dir={run}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    assert "training on cpu with" in train.stdout and "CPU threads" in train.stdout, train.stdout  # the log says how
    sample = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(run), "--class-label", "2",
                             "--guidance-scale", "3", "--num-samples", "4", "--sampler", "ddim", "--steps", "5",
                             "--seed", "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0, sample.stderr[-2000:]
    files = sorted(out.glob("sample_*.png"))
    assert len(files) == 4 and (out / "grid.png").is_file()
    meta = Image.open(files[0]).text
    assert meta["seed"] == "1" and meta["sampler"] == "ddim" and meta["steps"] == "5"
    assert meta["guidance_scale"] == "3.0" and meta["label"] == "2" and "checkpoint" in meta


def test_same_seed_same_images_and_each_sample_regenerates_alone(tiny_run, tmp_path):
    common = ["--checkpoint", str(tiny_run), "--class-label", "5", "--guidance-scale", "2", "--steps", "4"]
    for sampler in ("ddpm", "ddim", "dpmsolver"):
        a, b, c = tmp_path / f"{sampler}a", tmp_path / f"{sampler}b", tmp_path / f"{sampler}c"
        sample_main([*common, "--sampler", sampler, "--num-samples", "3", "--batch-size", "3", "--seed", "7", "--out", str(a)])
        sample_main([*common, "--sampler", sampler, "--num-samples", "3", "--batch-size", "2", "--seed", "7", "--out", str(b)])
        sample_main([*common, "--sampler", sampler, "--num-samples", "1", "--seed", "9", "--out", str(c)])
        for i in range(3):
            assert np.abs(_pixels(a / f"sample_{i:04d}.png").astype(int) - _pixels(b / f"sample_{i:04d}.png")).max() <= 1
        assert np.abs(_pixels(a / "sample_0002.png").astype(int) - _pixels(c / "sample_0000.png")).max() <= 1
        assert not np.array_equal(_pixels(a / "sample_0000.png"), _pixels(a / "sample_0001.png"))


@pytest.mark.parametrize("args, words", [
    (["--class-label", "12"], "out of range"),
    (["--guidance-scale", "-1"], "--guidance-scale"),
    (["--steps", "0"], "--steps"),
])
def test_bad_sampling_input_is_refused(tiny_run, tmp_path, args, words):
    with pytest.raises(UserError, match=words):
        sample_main.__wrapped__(["--checkpoint", str(tiny_run), "--out", str(tmp_path), *args])


def imported_modules(*argv: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run a command under `python -X importtime` and return it with the top-level packages it imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    names = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "import time:" in line}
    return proc, names


@pytest.mark.parametrize("argv, status", [
    (["sample.py", "--help"], 0), (["sample.py", "--checkpoint", "no/such/run"], 2), (["train.py", "--help"], 0)])
def test_help_and_a_missing_checkpoint_answer_without_importing_torch(argv, status):
    """The front door answers at once: argparse first, torch (2-3 s to import) only when there is work."""
    proc, names = imported_modules(*argv)
    assert proc.returncode == status, proc.stderr[-2000:]
    assert not names & {"torch", "diffusers", "open_clip", "numpy"}, sorted(names & {"torch", "diffusers", "numpy"})
    if status == 2:
        assert proc.stderr.strip().splitlines()[-1] == "error: checkpoint not found: no/such/run"


def test_cgroup_quota_caps_cpu_threads(tmp_path):
    from diffusion.threads import cgroup_cpus

    quota = tmp_path / "cpu.max"
    for text, cpus in (("max 100000\n", None), ("200000 100000\n", 2), ("150000 100000", 2), ("50000 100000", 1)):
        quota.write_text(text)
        assert cgroup_cpus(quota) == cpus
    assert cgroup_cpus(tmp_path / "missing") is None


def test_missing_checkpoint_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(tmp_path / "nope")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "checkpoint not found" in proc.stderr


def test_weights_that_do_not_fit_the_config_are_refused_in_one_line(tiny_run, tmp_path):
    """E.g. a checkpoint whose names carry torch.compile's `_orig_mod.` prefix, or a hand-edited config."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run / "final", broken)
    weights = load_file(str(broken / "ema.safetensors"))
    save_file({f"_orig_mod.{name}": value for name, value in weights.items()}, str(broken / "ema.safetensors"))
    from diffusion.checkpoints import store as ckpt

    ckpt.write_info(broken, ckpt.read_info(broken), ckpt.file_digests(broken))  # saved so, not damaged later
    proc = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(broken), "--out", str(tmp_path / "s")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr[-2000:]
    assert "does not fit the model" in proc.stderr and "_orig_mod.unet" in proc.stderr
