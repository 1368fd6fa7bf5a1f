"""Bad input through the command lines: every case exits with status 2, one line on stderr, no traceback.

Each case is its own process (train.py, sample.py or python -m diffusion.evaluate). They run
concurrently, so the table takes about as long as its slowest few cases: those that fail at config
validation never import torch, and the rest fail before any model is trained. Hostile pickles in
the table would create a marker file if anything unpickled them; the last test checks it is absent.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from diffusion.config import DataConfig, load_config
from diffusion.errors import UserError
from tests.conftest import ROOT, TINY, tiny_config

TRAIN = [sys.executable, "train.py", "configs/shapes.yaml", *TINY]
SAMPLE = [sys.executable, "sample.py"]
EVALUATE = [sys.executable, "-m", "diffusion.evaluate"]
TINY_OPEN_CLIP = {  # an open_clip architecture small enough to build in a moment
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


class Payload:
    """Unpickling this runs `touch MARKER`: the test fails if any loader lets it run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@dataclass
class Files:
    """The bad files the cases point at, made once."""

    root: Path
    marker: Path
    checkpoint: Path  # a complete (untrained) denoiser checkpoint with accelerate state
    unwritable: Path | None

    def path(self, name: str) -> Path:
        return self.root / name


def unwritable_dir(root: Path) -> Path | None:
    """A folder no run can create: below a read-only folder, or (as root, whom permissions do not
    stop) below /sys; None if neither refuses a write here."""
    locked = root / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    for candidate in (locked / "run", Path("/sys/diffusion-bad-input-test/run")):
        try:
            candidate.mkdir(parents=True)
        except OSError:
            return candidate
        candidate.rmdir()
    return None


def write_checkpoint(directory: Path) -> Path:
    """An untrained tiny denoiser saved as a checkpoint (config, EMA weights, info, accelerate state)."""
    from safetensors.torch import save_file

    from diffusion.checkpoints import store as ckpt
    from diffusion.training.tasks import build_task

    from diffusion.data.shapes import ShapesDataset

    cfg = tiny_config(directory, f"model.num_classes={ShapesDataset.num_classes}")  # as a run fills it in
    weights = ckpt.named_weights(build_task(cfg).build_model())
    final = ckpt.checkpoint_root(directory) / "step-000002"
    tmp = final.with_name(".tmp-step")
    (tmp / "accelerate").mkdir(parents=True)
    ckpt.write_weights(tmp / ckpt.EMA_FILE, weights)
    save_file(weights, str(tmp / "accelerate" / "model.safetensors"))
    torch.save({"state": {}, "param_groups": []}, tmp / "accelerate" / "optimizer.bin")
    ckpt.finish_checkpoint(tmp, final, cfg, ckpt.TrainState(step=2), keep=0)
    return final


def with_file(checkpoint: Path, copy: Path, name: str, content: bytes) -> Path:
    """A copy of `checkpoint` with the file `name` replaced by `content`."""
    import shutil

    shutil.copytree(checkpoint, copy)
    (copy / name).write_bytes(content)
    return copy


def restamp(checkpoint: Path) -> None:
    """Record the current files' sha256 in the checkpoint's info.json."""
    from diffusion.checkpoints import store as ckpt

    info = json.loads((checkpoint / ckpt.INFO_FILE).read_text())
    info[ckpt.DIGESTS] = ckpt.file_digests(checkpoint)
    (checkpoint / ckpt.INFO_FILE).write_text(json.dumps(info))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    root = tmp_path_factory.mktemp("bad_input")
    marker = root / "MARKER"
    evil = pickle.dumps(Payload(marker))
    checkpoint = write_checkpoint(root / "run")
    (root / "garbage.yaml").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (root / "syntax.yaml").write_text("train:\n  lr: [0.1\n")
    (root / "a_file").write_text("not a folder")
    final = root / "final"  # what a run exports: weights, config and info, no training state
    final.mkdir()
    for name in ("config.yaml", "info.json", "ema.safetensors"):
        (final / name).write_bytes((checkpoint / name).read_bytes())
    with_file(checkpoint, root / "evil_optimizer" / "checkpoints" / "step-000002", "accelerate/optimizer.bin", evil)
    with_file(checkpoint, root / "evil_model" / "step-000002", "accelerate/model.safetensors", evil)
    archive = root / "evil_archive.bin"  # the zip format accelerate writes, around a pickle that runs code
    torch.save(Payload(marker), archive)
    planted = with_file(checkpoint, root / "evil_archive" / "step-000002", "accelerate/optimizer.bin", archive.read_bytes())
    restamp(planted)  # its sha256 updated too, as a planter would: torch.load itself must refuse it
    with_file(checkpoint, root / "damaged" / "step-000002", "ema.safetensors",
                        (checkpoint / "ema.safetensors").read_bytes()[:-1] + b"\x00")
    restamp(with_file(checkpoint, root / "broken_config", "config.yaml", b"model:\n  channel_mult: [1, 2\n"))
    (root / "evil.bin").write_bytes(evil)
    (root / "garbage.pt2").write_bytes(b"PK\x03\x04 not really a zip archive")
    (root / "tiny-clip.json").write_text(json.dumps(TINY_OPEN_CLIP))
    images = root / "images"
    images.mkdir()
    from PIL import Image

    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(images / f"{i}.png")
    return Files(root, marker, checkpoint, unwritable_dir(root))


@dataclass
class Case:
    id: str
    argv: Callable[[Files], list[str]]
    words: str  # the one line names this
    needs_cpu_only: bool = False  # e.g. fp16 is fine where a GPU exists


CASES = [
    # config file and overrides: refused before torch is imported
    Case("binary config file", lambda f: [sys.executable, "train.py", str(f.path("garbage.yaml"))], "not a text file"),
    Case("YAML syntax error", lambda f: [sys.executable, "train.py", str(f.path("syntax.yaml"))], "syntax.yaml is not valid YAML"),
    Case("override not YAML", lambda f: [*TRAIN, "model.channel_mult=[1,2"], "not valid YAML"),
    Case("lr negative", lambda f: [*TRAIN, "train.lr=-1"], "train.lr"),
    Case("lr nan", lambda f: [*TRAIN, "train.lr=nan"], "train.lr"),
    Case("grad_clip inf", lambda f: [*TRAIN, "train.grad_clip=.inf"], "finite"),
    Case("log_every 0", lambda f: [*TRAIN, "train.log_every=0"], "train.log_every"),
    Case("checkpoint_every 0", lambda f: [*TRAIN, "train.checkpoint_every=0"], "train.checkpoint_every"),
    Case("num_workers negative", lambda f: [*TRAIN, "data.num_workers=-1"], "data.num_workers"),
    Case("channel_mult empty", lambda f: [*TRAIN, "model.channel_mult=[]"], "model.channel_mult"),
    Case("ema_decay 2", lambda f: [*TRAIN, "train.ema_decay=2"], "train.ema_decay"),
    Case("warmup negative", lambda f: [*TRAIN, "train.warmup_steps=-1"], "train.warmup_steps"),
    Case("sample.steps 0", lambda f: [*TRAIN, "sample.steps=0"], "sample.steps"),
    Case("YAML 1.1 boolean", lambda f: [*TRAIN, "data.hflip=on"], "true or false"),
    # the run folder and the checkpoint to resume from
    Case("output_dir is a file", lambda f: [*TRAIN, f"output_dir={f.path('a_file')}"], "is a file"),
    Case("output_dir below a file", lambda f: [*TRAIN, f"output_dir={f.path('a_file')}/run"], "which is a file"),
    Case("output_dir unwritable", lambda f: [*TRAIN, f"output_dir={f.unwritable}"], "not writable"),
    Case("fp16 on CPU", lambda f: [*TRAIN, f"output_dir={f.path('out_fp16')}", "train.mixed_precision=fp16"], "fp16",
         needs_cpu_only=True),
    Case("resume RUN/final", lambda f: [*TRAIN, f"output_dir={f.path('out_final')}", "--resume", str(f.path("final"))],
         "no training state"),
    Case("resume: pickle as optimizer.bin", lambda f: [*TRAIN, f"output_dir={f.path('evil_optimizer')}", "--resume", "auto"],
         "optimizer.bin is not a torch.save archive"),
    Case("resume: pickle as model.safetensors",
         lambda f: [*TRAIN, f"output_dir={f.path('out_model')}", "--resume", str(f.path("evil_model/step-000002"))],
         "model.safetensors is not a safetensors file"),
    Case("resume: code in a torch.save archive as optimizer.bin",
         lambda f: [*TRAIN, f"output_dir={f.path('out_archive')}", "--resume", str(f.path("evil_archive/step-000002"))],
         "cannot resume from"),
    Case("resume: a damaged checkpoint",
         lambda f: [*TRAIN, f"output_dir={f.path('out_damaged')}", "--resume", str(f.path("damaged/step-000002"))],
         "is damaged: sha256 mismatch in ema.safetensors"),
    # sampling and evaluation
    Case("sample: a damaged checkpoint", lambda f: [*SAMPLE, "--checkpoint", str(f.path("damaged/step-000002"))],
         "is damaged: sha256 mismatch in ema.safetensors"),
    Case("checkpoint config.yaml YAML error", lambda f: [*SAMPLE, "--checkpoint", str(f.path("broken_config"))],
         "config.yaml is not valid YAML"),
    Case("invalid --clip-weights", lambda f: [*SAMPLE, "--checkpoint", str(f.checkpoint), "--out", str(f.path("s")),
                                              "--prompt", "a red circle", "--clip", f"open_clip:{f.path('tiny-clip.json')}",
                                              "--clip-weights", str(f.path("evil.bin"))], "cannot load CLIP weights"),
    Case(".pt2 --feature-extractor", lambda f: [*EVALUATE, "fid", "--samples", str(f.path("images")), "--reference",
                                                str(f.path("images")), "--feature-extractor", str(f.path("garbage.pt2"))],
         "neither a TorchScript module"),
    Case("--inception-weights not the published file",
         lambda f: [*EVALUATE, "fid", "--samples", str(f.path("images")), "--reference", str(f.path("images")),
                    "--inception-weights", str(f.path("evil.bin"))], "refusing to load it"),
]


@pytest.fixture(scope="module")
def results(request, files) -> dict[str, subprocess.CompletedProcess]:
    """The process of every selected case (all, unless -k picks some), run concurrently."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if "case" in getattr(getattr(item, "callspec", None), "params", {})}
    cases = [case for case in CASES if case.id in selected or not selected]
    if files.unwritable is None:
        cases = [case for case in cases if case.id != "output_dir unwritable"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TORCH_HOME": str(files.path("torch_home"))}

    def run(case: Case) -> subprocess.CompletedProcess:
        return subprocess.run(case.argv(files), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip((case.id for case in cases), pool.map(run, cases)))


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_exits_2_with_one_line(case, files, results):
    if case.id == "output_dir unwritable" and files.unwritable is None:
        pytest.skip("no folder here refuses writes (root without /sys)")
    if case.needs_cpu_only and torch.cuda.is_available():
        pytest.skip("valid where a GPU exists")
    proc = results[case.id]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith("error: ") and case.words in lines[0], lines[0]


def test_no_hostile_pickle_ran(files, results):
    assert not files.marker.exists()


def test_cifar10_refuses_a_pickle_that_runs_code(tmp_path):
    """An untrusted data.root: a batch file whose pickle would run `touch` is refused, not run."""
    from diffusion.data import build_dataset

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    batch = {"data": np.zeros((4, 3072), dtype=np.uint8), "labels": [0, 3, 9, 1], "batch_label": "x"}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (base / name).write_bytes(pickle.dumps(batch, protocol=2))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    cfg = DataConfig(name="cifar10", root=str(tmp_path), download=False)
    assert len(build_dataset(cfg)) == 20  # plain batches (numpy arrays, lists, dicts) load
    marker = tmp_path / "MARKER"
    for name in ("data_batch_3", "batches.meta"):
        original = (base / name).read_bytes()
        (base / name).write_bytes(pickle.dumps({"data": Payload(marker), "label_names": Payload(marker)}))
        with pytest.raises(UserError, match=f"refusing .*{name}.*system"):
            build_dataset(cfg)
        (base / name).write_bytes(original)
    assert not marker.exists()


@pytest.mark.parametrize("override, value", [
    ("train.lr=1e-4", 1e-4), ("train.lr=1e8", 1e8), ("train.lr=3E-5", 3e-5),
    ("data.root=on", "on"), ("data.root=no", "no"), ("data.root=1e3", "1e3"),
    ("train.mixed_precision=no", "no"), ("init_from=null", None),
])
def test_values_people_write_are_read_as_meant(override, value):
    key, _ = override.split("=", 1)
    cfg = load_config(ROOT / "configs/shapes.yaml", [override])
    section, _, name = key.rpartition(".")
    assert getattr(getattr(cfg, section) if section else cfg, name) == value


def test_yaml_files_read_1e_minus_4_as_a_float_and_keep_on_a_string(tmp_path):
    from diffusion.config import save_config

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n  mixed_precision: no\ndata:\n  root: on\n  hflip: true\n")
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.train.mixed_precision, cfg.data.root, cfg.data.hflip) == (1e-4, "no", "on", True)
    save_config(cfg, path)  # and a saved config reads back the same, with YAML 1.1 readers too
    assert load_config(path) == cfg
    import yaml

    assert yaml.safe_load(path.read_text())["data"]["root"] == "on"
