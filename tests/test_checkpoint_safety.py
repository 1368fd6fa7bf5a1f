"""Checkpoints that are hostile, damaged, shared or left half-written by a kill.

Each command runs in-process through its CLI entry point (exit status and stderr as a shell sees
them) on copies of one tiny run trained for 2 steps, so the file takes seconds, not minutes.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train as train_cli
from diffusion.checkpoints import store as ckpt
from diffusion.checkpoints.load import load_model
from diffusion.cli import sample as sample_cli
from diffusion.errors import UserError, exit_on_user_error
from diffusion.io import replace_dir
from diffusion.training.trainer import Trainer, train
from tests.conftest import ROOT, TINY, cli_result, tiny_config
from tests.test_bad_input import Payload

STEP = "checkpoints/step-000002"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny run stopped at step 2 (one checkpoint, final export)."""
    out = tmp_path_factory.mktemp("safety") / "run"
    train(tiny_config(out, "train.max_steps=2"))
    return out


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def restamp(checkpoint: Path) -> None:
    """Record the current files' sha256 in info.json, as someone planting a file would."""
    info = json.loads((checkpoint / ckpt.INFO_FILE).read_text())
    info[ckpt.DIGESTS] = ckpt.file_digests(checkpoint)
    (checkpoint / ckpt.INFO_FILE).write_text(json.dumps(info))


def run_cli(main, argv: list[str], capsys) -> tuple[int, list[str]]:
    """(exit status, non-empty stderr lines) of a CLI entry point."""
    return cli_result(main, argv, capsys)[:2]


def resume(out: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    status_lines = run_cli(train_cli.main, [str(ROOT / "configs/shapes.yaml"), *TINY, f"output_dir={out}",
                                            "train.max_steps=2", *extra, "--resume", "auto"], capsys)
    ckpt.trust_checkpoints(False)
    return status_lines


def sample(checkpoint: Path, capsys, *extra: str) -> tuple[int, list[str]]:
    run_dir = checkpoint.parent.parent  # RUN/checkpoints/step-N: the samples go beside RUN, never inside its checkpoints
    status_lines = run_cli(sample_cli.main, ["--checkpoint", str(checkpoint), "--out", str(run_dir.with_name(f"{run_dir.name}-samples")),
                                             "--num-samples", "1", "--steps", "2", "--overwrite", *extra], capsys)
    ckpt.trust_checkpoints(False)  # --trust-checkpoint lasts for the process: end it with the command
    return status_lines


def evaluate_load(checkpoint: Path, capsys) -> tuple[int, list[str]]:
    """What every `python -m diffusion.evaluate` command does first with --checkpoint."""
    return run_cli(exit_on_user_error(lambda argv: load_model(checkpoint)), [], capsys)


# file in a checkpoint -> (does a resume need it, does a sample or an evaluation need it)
READ = {
    "accelerate/model.safetensors": (True, False),
    "accelerate/optimizer.bin": (True, False),
    "accelerate/random_states_0.pkl": (True, False),
    "accelerate/custom_checkpoint_0.pkl": (False, False),  # where accelerate kept the EMA pickle: never read now
    ckpt.EMA_FILE: (True, True),
    ckpt.EMA_STATE_FILE: (True, False),
    ckpt.INFO_FILE: (True, True),
    ckpt.CONFIG_FILE: (True, True),  # resume compares its settings with the run's
}


def test_no_planted_pickle_runs_on_resume_sample_or_evaluate(run, tmp_path, capsys):
    """A pickle that runs `touch MARKER` in place of each file (its digest updated to match, so the
    loaders themselves must refuse it): none runs, and where the file is needed the command fails
    in one line with status 2."""
    marker = tmp_path / "MARKER"
    archive = tmp_path / "payload.bin"  # the torch.save zip format, which passes the format checks
    torch.save(Payload(marker), archive)
    assert sorted(p for p in READ if "custom" not in p) == sorted([*ckpt.file_digests(run / STEP), ckpt.INFO_FILE])
    for index, (name, (resume_needs, sample_needs)) in enumerate(READ.items()):
        out = copy_run(run, tmp_path / f"run{index}")
        (out / STEP / name).write_bytes(archive.read_bytes())
        if name != ckpt.INFO_FILE:
            restamp(out / STEP)
        for what, (status, lines), needed in (("sample", sample(out / STEP, capsys), sample_needs),
                                              ("evaluate", evaluate_load(out / STEP, capsys), sample_needs),
                                              ("resume", resume(out, capsys), resume_needs)):
            assert not marker.exists(), f"{what} ran the pickle in {name}"
            if needed:
                assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), (what, name, lines)
            else:
                assert status == 0, (what, name, lines)


def test_a_flipped_byte_is_refused_by_sample_and_resume(run, tmp_path, capsys):
    for index, name in enumerate((ckpt.EMA_FILE, "accelerate/optimizer.bin", "accelerate/model.safetensors")):
        out = copy_run(run, tmp_path / f"run{index}")
        data = bytearray((out / STEP / name).read_bytes())
        data[-3] ^= 0x10  # in the tensor data: the file still parses
        (out / STEP / name).write_bytes(bytes(data))
        checks = [resume(out, capsys)] + ([sample(out / STEP, capsys)] if name == ckpt.EMA_FILE else [])
        for status, lines in checks:
            assert status == 2 and len(lines) == 1, lines
            assert f"is damaged: sha256 mismatch in {name}" in lines[0] and "earlier checkpoint" in lines[0], lines


@pytest.fixture
def trusted():
    """--trust-checkpoint for one test."""
    ckpt.trust_checkpoints(True)
    yield
    ckpt.trust_checkpoints(False)


def strip_digests(checkpoint: Path, keep: int = 0) -> None:
    """info.json as an older version wrote it (no digests), or with only `keep` of them."""
    info = json.loads((checkpoint / ckpt.INFO_FILE).read_text())
    info[ckpt.DIGESTS] = dict(list(info[ckpt.DIGESTS].items())[:keep])
    (checkpoint / ckpt.INFO_FILE).write_text(json.dumps(info))


def test_checkpoints_without_all_digests_are_refused_unless_trusted(run, tmp_path, capsys):
    """Fail closed: with its digest list emptied (or cut to one file), edited weights would pass; such a
    checkpoint is refused by sample, evaluate and resume unless --trust-checkpoint is given."""
    for keep in (0, 1):
        out = copy_run(run, tmp_path / f"old{keep}")
        strip_digests(out / STEP, keep)
        for status, lines in (sample(out / STEP, capsys), evaluate_load(out / STEP, capsys), resume(out, capsys)):
            assert status == 2 and len(lines) == 1, lines
            assert "records no sha256" in lines[0] and "--trust-checkpoint" in lines[0], lines
        assert sample(out / STEP, capsys, "--trust-checkpoint")[0] == 0
        assert resume(out, capsys, "train.max_steps=3", "--trust-checkpoint")[0] == 0


def test_sampling_checks_config_yaml_and_info_json_fields(run, tmp_path, capsys):
    """An edited prediction_type in config.yaml is caught by sampling as by resume; info.json's step
    is checked against the folder's name and ema.json's counter."""
    out = copy_run(run, tmp_path / "edited")
    config = out / STEP / ckpt.CONFIG_FILE
    config.write_text(config.read_text().replace("prediction_type: v_prediction", "prediction_type: epsilon"))
    for status, lines in (sample(out / STEP, capsys), resume(out, capsys)):
        assert status == 2 and "sha256 mismatch in config.yaml" in lines[0], lines
    out = copy_run(run, tmp_path / "step")
    info = json.loads((out / STEP / ckpt.INFO_FILE).read_text())
    info["step"] = 90
    (out / STEP / ckpt.INFO_FILE).write_text(json.dumps(info))
    for status, lines in (sample(out / STEP, capsys), resume(out, capsys)):
        assert status == 2 and len(lines) == 1 and "says step 90 but the checkpoint is step-000002" in lines[0], lines


def test_missing_random_states_warn_and_unreadable_ones_refuse(run, tmp_path, capsys):
    out = copy_run(run, tmp_path / "missing")
    (out / STEP / "accelerate/random_states_0.pkl").unlink()  # as from a run of fewer processes: never saved,
    restamp(out / STEP)  # so not listed (a listed file that is missing is refused as damage)
    status, lines = resume(out, capsys, "train.max_steps=3")
    assert status == 0 and [line for line in lines if "random_states_0.pkl is missing" in line and "not match" in line]
    out = copy_run(run, tmp_path / "foreign")
    torch.save({"step": 2}, out / STEP / "accelerate/random_states_0.pkl")  # loads, but holds no RNG state
    restamp(out / STEP)
    status, lines = resume(out, capsys)
    assert status == 2 and len(lines) == 1 and "random_states_0.pkl lacks" in lines[0], lines


def test_ema_state_is_saved_without_pickles_and_restored_exactly(run, tmp_path):
    checkpoint = run / STEP
    assert not list(checkpoint.rglob("custom_checkpoint_*"))
    assert json.loads((checkpoint / ckpt.EMA_STATE_FILE).read_text())["optimization_step"] == 2
    trainer = Trainer(tiny_config(copy_run(run, tmp_path / "r"), "train.max_steps=4"), resume="auto", log=False)
    trainer.ema.optimization_step = 0
    trainer.load_checkpoint(tmp_path / "r" / STEP)
    assert trainer.ema.optimization_step == 2 and not trainer.accelerator._custom_objects
    trainer.release_run()


def test_a_checkpoint_of_the_older_layout_resumes_without_reading_its_ema_pickle(run, tmp_path, trusted):
    """Older checkpoints kept the EMA as accelerate's custom_checkpoint_0.pkl and had no ema.json or
    digests: trusted (--trust-checkpoint), they resume from ema.safetensors (the EMA steps once per
    optimizer step), pickle unread."""
    out = copy_run(run, tmp_path / "old")
    marker = tmp_path / "MARKER"
    torch.save(Payload(marker), out / STEP / "accelerate/custom_checkpoint_0.pkl")
    (out / STEP / ckpt.EMA_STATE_FILE).unlink()
    info = json.loads((out / STEP / ckpt.INFO_FILE).read_text())
    del info[ckpt.DIGESTS]
    (out / STEP / ckpt.INFO_FILE).write_text(json.dumps(info))
    trainer = Trainer(tiny_config(out, "train.max_steps=4"), resume="auto", log=False)
    trainer.load_checkpoint(out / STEP)
    trainer.release_run()
    assert trainer.ema.optimization_step == 2 and trainer.state.step == 2 and not marker.exists()
    saved = ckpt.read_weights(out / STEP)
    for (name, _), shadow in zip(trainer.core.named_parameters(), trainer.ema.shadow_params):
        assert torch.equal(shadow, saved[name])


def test_a_second_run_on_the_same_folder_is_refused_until_the_first_dies(run, tmp_path, capsys):
    out = copy_run(run, tmp_path / "shared")
    holder = subprocess.Popen(  # another training process: holds the run's lock, then is SIGKILLed
        [sys.executable, "-c", "import sys; from diffusion.checkpoints.run_lock import RunLock; "
         "lock = RunLock(sys.argv[1]); print('locked', flush=True); sys.stdin.read()", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert holder.stdout.readline().strip() == "locked"
        status, lines = resume(out, capsys)
        assert status == 2 and len(lines) == 1 and "in use by another training run" in lines[0], lines
    finally:
        holder.kill()
        holder.wait()
    assert (out / ".lock").is_file()  # left behind by the killed process: must not block
    assert resume(out, capsys)[0] == 0


def test_crash_residue_is_cleaned_at_start(run, tmp_path):
    out = copy_run(run, tmp_path / "residue")
    (out / "checkpoints" / ".tmp-step-000004" / "accelerate").mkdir(parents=True)
    (out / ".tmp-final").mkdir()
    shutil.copytree(out / "final", out / ".old-final")  # a kill between the two renames of an export...
    shutil.rmtree(out / "final")
    Trainer(tiny_config(out, "train.max_steps=2"), resume="auto", log=False).release_run()
    assert not list(out.rglob(".tmp-*")) and not list(out.rglob(".old-*"))
    assert ckpt.is_checkpoint(out / "final")  # ...puts the old export back


def test_replacing_a_folder_never_leaves_neither(tmp_path, monkeypatch):
    """replace_dir renames the old folder aside before the new one arrives: a kill at any point leaves
    the old or the new complete folder (or .old-NAME, which start-up cleaning restores)."""
    import diffusion.io as io

    final, tmp = tmp_path / "final", tmp_path / ".tmp-final"
    final.mkdir()
    (final / "a").write_text("old")
    tmp.mkdir()
    (tmp / "a").write_text("new")
    synced, rmtree = [], shutil.rmtree
    monkeypatch.setattr(io, "fsync_path", lambda path: synced.append(Path(path)))
    monkeypatch.setattr(shutil, "rmtree", lambda path, **kw: pytest.fail("deleted before the new one was in place")
                        if not (final / "a").is_file() or (final / "a").read_text() != "new" else rmtree(path, **kw))
    replace_dir(tmp, final)
    assert (final / "a").read_text() == "new" and not (tmp_path / ".old-final").exists()
    assert {tmp / "a", tmp} <= set(synced) and synced[-1] == tmp_path  # files, folder, then the parent's entry


def test_resume_from_final_says_it_holds_weights_only(run, capsys):
    status, lines = run_cli(train_cli.main, [str(ROOT / "configs/shapes.yaml"), *TINY, f"output_dir={run}",
                                             "--resume", str(run / "final")], capsys)
    assert status == 2 and len(lines) == 1 and "holds only weights" in lines[0] and "step-N" in lines[0], lines


def test_read_weights_refuses_damage_in_one_line(run, tmp_path):
    out = copy_run(run, tmp_path / "d")
    data = bytearray((out / "final" / ckpt.EMA_FILE).read_bytes())
    data[-1] ^= 1
    (out / "final" / ckpt.EMA_FILE).write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256 mismatch"):
        ckpt.read_weights(out / "final")


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_a_second_run_in_a_finished_runs_folder_is_refused_and_changes_nothing(run, tmp_path, capsys):
    out = copy_run(run, tmp_path / "finished")
    before = tree(out)
    for extra in (["train.max_steps=2"], ["train.max_steps=4"]):
        status, lines = run_cli(train_cli.main, [str(ROOT / "configs/shapes.yaml"), *TINY, f"output_dir={out}", *extra], capsys)
        assert status == 2 and len(lines) == 1 and "already holds a run (checkpoints up to step 2, final/" in lines[0], lines
        assert "--resume auto" in lines[0] and "--overwrite" in lines[0]
    assert tree(out) == before
    status, lines = run_cli(train_cli.main, [str(ROOT / "configs/shapes.yaml"), *TINY, f"output_dir={out}", "--overwrite",
                                             "--resume", "auto"], capsys)
    assert status == 2 and "give one of them" in lines[0], lines


def test_overwrite_moves_the_old_run_aside_whole(run, tmp_path, capsys):
    out = copy_run(run, tmp_path / "again")
    before = tree(out)
    status, _ = run_cli(train_cli.main, [str(ROOT / "configs/shapes.yaml"), *TINY, f"output_dir={out}",
                                         "train.max_steps=1", "--overwrite"], capsys)
    assert status == 0
    assert tree(tmp_path / "again.previous-1") == before  # every file of the old run, unchanged
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000001"]  # the new run alone
    assert len((out / "metrics.csv").read_text().splitlines()) == 2
