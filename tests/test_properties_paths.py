"""Generated inputs for output paths and write faults (issue #34 classes 4 and 5).

- check_output_path: any path built from `..`, `.`, symlinks and a run's folder names is accepted only
  when it lies outside every checkpoint (and, for a training run, outside every run), else refused in
  one line naming it;
- sweep run folders: any grid values give one distinct folder per point, directly below the sweep's
  output_dir, or a one-line refusal;
- a full disk at ANY write of a checkpoint save, a sample.py call or a whole training run (hypothesis
  picks which write fails, and whether the file was half-written first): one line, exit 2, no
  temporary folder left, every checkpoint still verifies and the earlier images are unchanged.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffusion.checkpoints import store as ckpt
from diffusion.errors import UserError
from diffusion.io import check_output_path
from tests.conftest import ROOT, TINY, tiny_config

STEP4 = "checkpoints/step-000004"


# -- check_output_path ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    """root/run: a copy of a run's marker files (config.yaml, metrics.csv, checkpoints/step-000004 with
    info.json, final/); root/free: a plain folder; links into the run and out of it."""
    root = tmp_path_factory.mktemp("layout")
    run = root / "run"
    for folder in (run / STEP4 / "accelerate", run / "final", run / "eval", root / "free" / "deep"):
        folder.mkdir(parents=True)
    for file in (run / "config.yaml", run / "metrics.csv", run / STEP4 / "config.yaml", run / STEP4 / "info.json",
                 run / "final" / "config.yaml", run / "final" / "ema.safetensors"):
        file.write_text("x")
    (root / "free" / "to_step").symlink_to(run / STEP4)
    (root / "free" / "to_run").symlink_to(run)
    (run / "eval" / "to_free").symlink_to(root / "free")
    return root


SEGMENTS = ["run", "free", "deep", "checkpoints", "step-000004", "accelerate", "final", "eval", "to_step",
            "to_run", "to_free", "..", ".", "new", "x y"]


def protected(real: Path, root: Path, run: bool) -> bool:
    """The contract, stated on the resolved path: no file may be added inside a checkpoint, a run's
    checkpoints/ or final/; a training run may not lie anywhere inside the run."""
    try:
        parts = real.relative_to(root / "run").parts
    except ValueError:
        return False
    if not parts:
        return False  # the run folder itself (train.py's own run checks handle it)
    return run or parts[0] in ("checkpoints", "final")


@given(segments=st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6), run=st.booleans())
def test_output_paths_are_refused_exactly_inside_a_run_s_saved_files(layout, segments, run):
    path = layout.joinpath(*segments)
    real = Path(os.path.realpath(path))
    try:
        got = check_output_path(path, "--out", run=run)
    except UserError as err:
        message = str(err)
        assert "\n" not in message and message.startswith("--out ") and "choose a folder outside it" in message
        assert protected(real, layout, run), (path, real, message)
        return
    assert not protected(real, layout, run), (path, real)
    assert os.path.realpath(got) == str(real)


# -- sweep run folders -----------------------------------------------------------------------------------------

VALUE = st.one_of(st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False, width=32),
                  st.text(st.sampled_from("ab./\\ _-=é\x00\n~"), max_size=8),
                  st.sampled_from(["..", "../..", "../../escape", "/abs", ".hidden", "a" * 300]))


@given(values=st.lists(VALUE, min_size=1, max_size=6, unique_by=repr))
def test_sweep_run_folders_are_one_distinct_folder_below_the_sweep(tmp_path_factory, values):
    from diffusion.scaling.sweep import run_folders
    from diffusion.scaling.sweep_config import Sweep, SweepSettings, expand_grid

    out = tmp_path_factory.getbasetemp() / "sweep" / "s"
    sweep = Sweep(SweepSettings(output_dir=str(out)), {}, [{"data.root": values, "model.base_channels": [8]}])
    points = expand_grid(sweep)
    try:
        folders = run_folders(sweep, points)
    except UserError as err:
        assert "\n" not in str(err) and "would share the run folder" in str(err)
        return
    assert len(set(folders.values())) == len(points)
    for folder in folders.values():
        assert folder.parent == out and folder.name not in ("", ".", "..") and not folder.name.startswith(".")
        assert len(folder.name.encode()) <= 255 and "/" not in folder.name and "\x00" not in folder.name


# -- write faults -------------------------------------------------------------------------------------------

NO_SPACE_TEXT = "Error while serializing: I/O error: No space left on device (os error 28)"


def no_space_os() -> BaseException:
    return OSError(errno.ENOSPC, "No space left on device")


def no_space_safetensors() -> BaseException:
    from safetensors import SafetensorError

    return SafetensorError(NO_SPACE_TEXT)


def no_space_torch() -> BaseException:
    return RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


class Faults:
    """Counts the calls of every writer it patches; call number `fail_at` raises that writer's own
    full-disk error (after letting it write, if `after`: a half-written file is left to clean)."""

    def __init__(self, fail_at: int | None = None, after: bool = False):
        self.fail_at, self.after, self.count, self.failed = fail_at, after, 0, None

    @contextlib.contextmanager
    def patched(self, *writers: tuple[object, str, object]):
        with pytest.MonkeyPatch.context() as mp:
            for owner, name, error in writers:
                mp.setattr(owner, name, self.wrap(getattr(owner, name), name, error))
            yield self

    def wrap(self, original, name, error):
        def writer(*args, **kwargs):
            if name == "open" and not any(c in (args[1] if len(args) > 1 else kwargs.get("mode", "r")) for c in "wax+"):
                return original(*args, **kwargs)  # a read: not a write that can fail for lack of space
            index, self.count = self.count, self.count + 1
            if index == self.fail_at:
                self.failed = name
                if self.after:
                    with contextlib.suppress(Exception):
                        original(*args, **kwargs)
                raise error()
            return original(*args, **kwargs)
        return writer


def training_writers():
    import pathlib

    import accelerate.utils.other
    import torch

    return [(accelerate.utils.other, "safe_save_file", no_space_safetensors), (ckpt, "save_file", no_space_safetensors),
            (torch, "save", no_space_torch), (pathlib.Path, "write_text", no_space_os), (os, "fsync", no_space_os),
            (pathlib.Path, "open", no_space_os)]


def check_refusal(err: UserError, run_dir: Path) -> None:
    message = str(err)
    assert "\n" not in message and message.startswith("cannot write ") and "--resume auto" in message, message
    assert "no space left on device" in message, message
    assert not [p for p in run_dir.rglob("*") if p.name.startswith((".tmp-", ".old-"))], "a temporary folder was left"
    saved = ckpt.list_checkpoints(run_dir)
    assert (str(saved[-1]) in message) if saved else "no checkpoint was saved yet" in message, message
    for checkpoint in saved:
        ckpt.verify_digests(checkpoint)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """A tiny trainer with one saved checkpoint (step 1); each example saves the next step."""
    from diffusion.training.trainer import Trainer

    run = tmp_path_factory.mktemp("faults") / "run"
    trainer = Trainer(tiny_config(run, "train.max_steps=1000", "train.keep_checkpoints=0"), log=False)
    trainer.state.step = 1
    trainer.save_checkpoint()
    yield trainer
    trainer.release_run()


@settings(max_examples=20)
@given(fail_at=st.integers(0, 40), after=st.booleans())
def test_a_full_disk_at_any_write_of_a_checkpoint_save(trainer, fail_at, after):
    before = ckpt.list_checkpoints(trainer.run_dir)
    trainer.state.step += 1
    with Faults(fail_at, after).patched(*training_writers()) as faults:
        try:
            saved = trainer.save_checkpoint()
        except UserError as err:
            check_refusal(err, trainer.run_dir)
            after_save = ckpt.list_checkpoints(trainer.run_dir)
            assert set(before) <= set(after_save) and len(after_save) - len(before) <= 1, faults.failed
            return
    assert faults.count <= fail_at, "a write failed but the save said nothing"
    ckpt.verify_digests(saved)
    assert saved == ckpt.list_checkpoints(trainer.run_dir)[-1]


@settings(max_examples=4, suppress_health_check=[HealthCheck.function_scoped_fixture])  # capsys: read per example
@given(fail_at=st.integers(0, 200), after=st.booleans())
def test_a_full_disk_at_any_write_of_a_training_run(tmp_path_factory, capsys, fail_at, after):
    """train.py from its start to final/: either it finishes or it says so in one line, exit 2."""
    import train as train_cli

    run = tmp_path_factory.mktemp("train_faults") / "run"
    capsys.readouterr()
    with Faults(fail_at, after).patched(*training_writers()):
        try:
            train_cli.main([str(ROOT / "configs/shapes.yaml"), *TINY, "train.max_steps=2", f"output_dir={run}"])
            status = 0
        except SystemExit as exit:
            status = exit.code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error", "Traceback"))]
    if status == 0:
        assert not lines and ckpt.is_checkpoint(run / "final")
        ckpt.verify_digests(run / "final")
        return
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: cannot write "), lines
    check_refusal(UserError(lines[0][len("error: "):]), run)


@settings(max_examples=12, suppress_health_check=[HealthCheck.function_scoped_fixture])  # capsys: read per example
@given(fail_at=st.integers(0, 16), after=st.booleans(), earlier=st.booleans())
def test_a_full_disk_at_any_write_of_sample_py(tiny_run, tmp_path_factory, capsys, fail_at, after, earlier):
    from PIL import Image

    from diffusion.cli import sample as sample_cli

    parent = tmp_path_factory.mktemp("sample_faults")
    out = parent / "s"
    argv = ["--checkpoint", str(tiny_run), "--out", str(out), "--class-label", "1", "--steps", "1"]
    if earlier:
        sample_cli.main.__wrapped__(argv + ["--num-samples", "3"])
        argv.append("--overwrite")
    before = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None
    capsys.readouterr()
    with Faults(fail_at, after).patched((Image.Image, "save", no_space_os), (os, "fsync", no_space_os)):
        try:
            sample_cli.main(argv)
            status = 0
        except SystemExit as exit:
            status = exit.code
    captured = capsys.readouterr()
    assert [p.name for p in parent.iterdir()] == (["s"] if status == 0 or earlier else []), "scratch folder left"
    if status == 0:
        assert sorted(p.name for p in out.iterdir()) == ["grid.png", "sample_0000.png", "sample_0001.png"]
        return
    lines = [line for line in captured.err.splitlines() if line.startswith(("error", "Traceback"))]
    assert status == 2 and len(lines) == 1 and "no space left on device" in lines[0], lines
    assert ({p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None) == before
