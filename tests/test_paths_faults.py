"""Output paths and faults (issue #34 classes 4 and 5, issue #35's sample.py items): an output inside
another run, a sweep value that leads out of the sweep, --overwrite on a mount point, a full disk
while training or sampling, a Ctrl-C while sample.py --overwrite runs, and sample.py's defaults.

Every command runs in-process through its CLI entry point (exit status and stderr as a shell sees
them), on copies of the session's tiny run.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

import train as train_cli
from diffusion.checkpoints import run_folder
from diffusion.checkpoints import store as ckpt
from diffusion.cli import sample as sample_cli
from diffusion.errors import UserError
from tests.conftest import ROOT, TINY, cli_result

STEP4 = "checkpoints/step-000004"


def run_cli(main, argv: list[str], capsys) -> tuple[int, list[str], str]:
    return cli_result(main, argv, capsys)


def train_argv(output_dir: Path | str, *extra: str) -> list[str]:
    return [str(ROOT / "configs/shapes.yaml"), *TINY, "train.max_steps=2", f"output_dir={output_dir}", *extra]


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny run (checkpoints at steps 2 and 4, final/)."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


# -- class 4: paths and run folders ----------------------------------------------------------------------

@pytest.mark.parametrize("inside", [STEP4 + "/accelerate", STEP4, "final/x", "checkpoints/new", "sub", "link/x"])
def test_a_run_inside_another_run_is_refused_and_changes_nothing(run, tmp_path, capsys, inside):
    (run / "link").symlink_to(run / STEP4)
    before = tree(run)
    status, lines, _ = run_cli(train_cli.main, train_argv(run / inside, "--overwrite"), capsys)
    assert status == 2 and len(lines) == 1 and "is inside the" in lines[0] and "choose a folder outside" in lines[0], lines
    assert tree(run) == before
    ckpt.verify_digests(run / STEP4)  # the newest checkpoint still loads and resumes


@pytest.mark.parametrize("out", [STEP4, STEP4 + "/more", "final", "checkpoints/samples"])
def test_sample_out_inside_a_checkpoint_is_refused(run, capsys, out):
    before = tree(run)
    status, lines, _ = run_cli(sample_cli.main, ["--checkpoint", str(run), "--out", str(run / out)], capsys)
    assert status == 2 and len(lines) == 1 and "would change its files" in lines[0], lines
    assert tree(run) == before


@pytest.mark.parametrize("argv", [
    ["fid", "--samples", "{run}", "--out", "{run}/final/fid.json"],
    ["fid", "--samples", "{run}", "--sample-dir", "{run}/" + STEP4 + "/samples"],
    ["shapes-accuracy", "--checkpoint", "{run}", "--json", "{run}/final/acc.json"],
    ["upsample", "--checkpoint", "{run}", "--out", "{run}/checkpoints/up"],
])
def test_evaluation_outputs_inside_a_checkpoint_are_refused_before_anything_runs(run, capsys, argv):
    from diffusion.evaluate.__main__ import main as evaluate_main

    before = tree(run)
    status, lines, _ = run_cli(evaluate_main, [a.format(run=run) for a in argv], capsys)
    assert status == 2 and len(lines) == 1 and "would change its files" in lines[0], lines
    assert tree(run) == before


def test_sample_out_elsewhere_inside_a_run_is_allowed(run, capsys):
    status, lines, out = run_cli(sample_cli.main, ["--checkpoint", str(run), "--out", str(run / "eval_samples"),
                                                   "--class-label", "1", "--steps", "1"], capsys)
    assert status == 0, lines
    assert len(list((run / "eval_samples").glob("sample_*.png"))) == 2  # the config's sample.num_samples
    ckpt.verify_digests(run / STEP4)


def test_overwrite_on_a_mount_point_is_refused_in_one_line(run, capsys, monkeypatch):
    """A mount point cannot be renamed aside (EBUSY): refused before anything moves."""
    before = tree(run)
    monkeypatch.setattr(run_folder.os.path, "ismount", lambda path: Path(path) == run)
    status, lines, _ = run_cli(train_cli.main, train_argv(run, "--overwrite"), capsys)
    assert status == 2 and len(lines) == 1 and "is a mount point" in lines[0] and "choose another output_dir" in lines[0]
    assert tree(run) == before


def test_a_rename_that_fails_with_ebusy_is_one_line(run, monkeypatch):
    def busy(src, dst):
        raise OSError(errno.EBUSY, "Device or resource busy")

    monkeypatch.setattr(run_folder.os, "rename", busy)
    with pytest.raises(UserError, match="is a mount point"):
        run_folder.move_aside(run)
    assert (run / "final").is_dir()


def test_sweep_values_stay_inside_the_sweep_and_distinct(tmp_path, monkeypatch):
    """A grid value holding ../.. trains one folder below the sweep's output_dir, not outside it."""
    from diffusion.scaling import sweep as sweep_mod
    from diffusion.scaling.sweep_config import Sweep, SweepSettings, expand_grid

    out = tmp_path / "sweeps" / "s"
    sweep = Sweep(SweepSettings(output_dir=str(out)), {}, [{"data.root": ["../../escape", "a/b", "a_b", "..", "x y"]}])
    folders = sweep_mod.run_folders(sweep, expand_grid(sweep))
    assert len(set(folders.values())) == 5
    for folder in folders.values():
        assert folder.parent == out and not folder.name.startswith(".")
    trained = []

    class Stop(Exception):
        pass

    def fake_run_point(sweep, point, run_dir=None):
        trained.append(run_dir)
        raise Stop

    monkeypatch.setattr(sweep_mod, "run_point", fake_run_point)
    with pytest.raises(Stop):
        sweep_mod.run_sweep(sweep, log=lambda *a: None)
    assert trained == [folders["root=../../escape"]] and not (tmp_path / "escape").exists()


def test_two_grid_points_sharing_a_folder_are_refused(tmp_path):
    from diffusion.scaling.sweep import run_folders
    from diffusion.scaling.sweep_config import Point, Sweep, SweepSettings

    sweep = Sweep(SweepSettings(output_dir=str(tmp_path)), {}, [])
    clash = [Point("a=b", {"a": "b"}), Point("a=b", {"a": "b "})]  # names are made elsewhere: a clash must not pass
    with pytest.raises(UserError, match="would share the run folder"):
        run_folders(sweep, clash)


# -- class 5: faults -----------------------------------------------------------------------------------------

def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_at_train_start_is_one_line(tmp_path, capsys, monkeypatch):
    import diffusion.config as config

    monkeypatch.setattr(config, "save_config", no_space)  # the trainer's first write
    monkeypatch.setattr("diffusion.training.trainer.save_config", no_space)
    status, lines, _ = run_cli(train_cli.main, train_argv(tmp_path / "r"), capsys)
    assert status == 2 and len(lines) == 1 and "no space left on device" in lines[0] and "MB free" in lines[0], lines


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_resumes(run, capsys, monkeypatch):
    """The save of step 6 fails: one line naming step 4's checkpoint, no .tmp-* left, and --resume auto
    goes on from step 4 once there is room."""
    from diffusion.checkpoints import store

    real = store.save_file
    monkeypatch.setattr(store, "save_file", no_space)
    argv = [str(ROOT / "configs/shapes.yaml"), *TINY, "train.max_steps=6", f"output_dir={run}", "--resume", "auto"]
    status, lines, _ = run_cli(train_cli.main, argv, capsys)
    assert status == 2 and len(lines) == 1, lines
    assert "cannot write checkpoint" in lines[0] and "step-000006" in lines[0] and str(run / STEP4) in lines[0], lines
    assert not list(run.rglob(".tmp-*")) and [p.name for p in ckpt.list_checkpoints(run)] == ["step-000002", "step-000004"]
    monkeypatch.setattr(store, "save_file", real)
    status, lines, out = run_cli(train_cli.main, argv, capsys)
    assert status == 0 and "resumed from" in out and "at step 4" in out, lines


def sample_argv(run: Path, out: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(run), "--out", str(out), "--class-label", "1", "--steps", "1", *extra]


def test_ctrl_c_during_sample_overwrite_keeps_the_earlier_images(tiny_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "s"
    assert run_cli(sample_cli.main, sample_argv(tiny_run, out), capsys)[0] == 0
    before = tree(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("diffusion.sampling.plan.run_plan", interrupted)
    status, lines, _ = run_cli(sample_cli.main, sample_argv(tiny_run, out, "--overwrite", "--num-samples", "3"), capsys)
    assert status == 130 and tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no scratch folder left


def test_a_full_disk_while_sampling_keeps_the_earlier_images(tiny_run, tmp_path, capsys, monkeypatch):
    from PIL import Image

    out = tmp_path / "s"
    assert run_cli(sample_cli.main, sample_argv(tiny_run, out), capsys)[0] == 0
    before = tree(out)
    monkeypatch.setattr(Image.Image, "save", no_space)
    status, lines, _ = run_cli(sample_cli.main, sample_argv(tiny_run, out, "--overwrite"), capsys)
    assert status == 2 and len(lines) == 1 and "no space left on device" in lines[0] and "unchanged" in lines[0], lines
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["s"]


# -- sample.py's defaults (issue #35) -------------------------------------------------------------------------

def test_without_out_each_call_writes_a_new_numbered_folder(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folders = []
    for _ in range(2):
        status, lines, out = run_cli(sample_cli.main, ["--checkpoint", str(tiny_run / "final"), "--class-label", "0",
                                                       "--steps", "1"], capsys)
        assert status == 0, lines
        folders.append(out.strip().splitlines()[-1].rsplit(" to ", 1)[-1])
    name = tiny_run.name
    assert folders == [f"samples/{name}", f"samples/{name}-2"]
    assert all(len(list(Path(f).glob("sample_*.png"))) == 2 for f in folders)  # sample.num_samples of the run: 2


def test_a_missing_checkpoint_is_named_before_an_out_conflict(tmp_path, capsys):
    (tmp_path / "sample_0000.png").write_bytes(b"old")
    status, lines, _ = run_cli(sample_cli.main, ["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path)], capsys)
    assert status == 2 and lines == [f"error: checkpoint not found: {tmp_path / 'nope'}"]


def test_help_shows_every_default_and_the_per_class_count():
    parser = sample_cli.build_parser(sample_cli.features())
    text = " ".join(parser.format_help().split())
    assert "per class" in text and "sample.num_samples" in text and "samples/RUN" in text
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False) and action.dest != "help":
            assert "default" in parser._get_formatter()._get_help_string(action), action.dest
