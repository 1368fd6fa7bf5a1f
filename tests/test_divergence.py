"""A diverging run stops before it overwrites good checkpoints; a failing preview costs nothing."""
from __future__ import annotations

import json

import pytest

import train as train_cli
from diffusion.checkpoints import store as ckpt
from diffusion.config import load_config
from diffusion.errors import Diverged
from diffusion.training.guard import LossGuard
from diffusion.training.tasks import DenoiserTask
from diffusion.training.trainer import Trainer, train
from tests.conftest import ROOT, TINY, tiny_config

# Logged losses (every 20 steps) of configs/shapes.yaml as it is (the quickstart, 2000 steps), and of
# the same run with train.lr=0.05, which diverges without a NaN: the loss climbs from 0.31 to 2.8.
QUICKSTART = [0.930, 0.695, 0.485, 0.401, 0.340, 0.291, 0.238, 0.214, 0.191, 0.176, 0.157, 0.157, 0.155, 0.139, 0.130,
              0.120, 0.129, 0.121, 0.113, 0.108, 0.112, 0.109, 0.111, 0.100, 0.103, 0.097, 0.098, 0.096, 0.096, 0.091,
              0.086, 0.089, 0.082, 0.089, 0.085, 0.090, 0.086, 0.077, 0.082, 0.075, 0.081, 0.075, 0.074, 0.078, 0.072,
              0.069, 0.071, 0.063, 0.075, 0.066, 0.069, 0.069, 0.072, 0.070, 0.074, 0.073, 0.064, 0.070, 0.061, 0.067,
              0.067, 0.067, 0.065, 0.062, 0.068, 0.068, 0.060, 0.062, 0.066, 0.065, 0.065, 0.064, 0.061, 0.058, 0.066,
              0.064, 0.055, 0.057, 0.059, 0.059, 0.060, 0.054, 0.057, 0.059, 0.063, 0.057, 0.058, 0.058, 0.057, 0.056,
              0.061, 0.060, 0.059, 0.058, 0.056, 0.058, 0.058, 0.059, 0.053, 0.055]
LR_0_05 = [0.528, 0.314, 0.607, 0.964, 1.623, 2.568, 1.838, 2.323, 2.683, 2.803, 2.325, 2.250, 2.184, 1.800]


def replay(losses: list[float], every: int = 20) -> tuple[int | None, float]:
    """(the step the guard stops at, or None; the highest ratio to the lowest it saw) for logged losses."""
    guard, highest = LossGuard(load_config(ROOT / "configs/shapes.yaml"), None, 0), 0.0
    for index, loss in enumerate(losses, 1):
        try:
            guard.check(index * every, loss, every)
        except Diverged:
            return index * every, highest
        if guard.current is not None:
            highest = max(highest, guard.current / guard.lowest[0])
    return None, highest


def test_the_loss_spike_guard_stops_lr_0_05_and_never_the_quickstart():
    assert replay(LR_0_05)[0] == 120  # mean of steps 61-120 is 1.72, 3.6 times the lowest (0.48 at step 60)
    stopped, highest = replay(QUICKSTART)
    assert stopped is None and highest < 1.1  # a normal run stays far below the threshold of 3


def test_a_spiking_run_stops_keeps_its_last_good_checkpoint_and_says_so(tmp_path, monkeypatch, capsys):
    """The logged loss jumps 100-fold after step 60 (checkpoints every 20 steps): the run stops with exit
    status 3 within a few steps, saves nothing more, exports no final/, and names step-000060."""
    step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self, batch: step(self, batch) * (100 if self.state.step >= 60 else 1))
    with pytest.raises(SystemExit) as stopped:
        train_cli.main([str(ROOT / "configs/shapes.yaml"), *TINY, f"output_dir={tmp_path}", "train.max_steps=200",
                        "train.checkpoint_every=20"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stopped.value.code == 3 and "loss rose to" in err and "train.loss_spike=3" in err, err
    assert f"the last good checkpoint is {tmp_path / 'checkpoints' / 'step-000060'} (step 60)" in err
    assert "train.grad_clip is already 1" in err  # the advice fits the config
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000020", "step-000040", "step-000060"]
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert 61 <= int(rows[-1].split(",")[0]) < 80 and not (tmp_path / "final").exists()


def test_the_nan_message_says_no_checkpoint_was_saved_yet(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        train_cli.main([str(ROOT / "configs/shapes.yaml"), *TINY, f"output_dir={tmp_path}", "train.lr=1e8",
                        "train.grad_clip=0", "train.warmup_steps=0", "train.max_steps=40", "train.checkpoint_every=1000"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stopped.value.code == 3 and "no checkpoint was saved before it" in err and "None" not in err, err
    assert "set train.grad_clip" in err  # clipping is off here, so it is advised


def test_a_failing_preview_costs_no_checkpoint(tmp_path, monkeypatch, capsys):
    """A preview that raises (any error) is one warning line; the checkpoint of that step is already saved
    and training goes on to the end."""
    def broken(self, core, step, run_dir):
        raise RuntimeError("the preview broke")

    monkeypatch.setattr(DenoiserTask, "preview", broken)
    train(tiny_config(tmp_path, "train.max_steps=4", "train.sample_every=2"))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000002", "step-000004"]
    assert (tmp_path / "final").is_dir()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: the preview")]
    assert len(warnings) == 2 and "RuntimeError: the preview broke" in warnings[0], warnings


def test_resume_refuses_an_info_json_whose_data_position_was_edited(tiny_run, tmp_path, capsys):
    """info.json is not digested (it holds the digests): its fields are checked against what they
    describe. Here the data position no longer matches the step."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    checkpoint = ckpt.list_checkpoints(run)[-1]
    info = json.loads((checkpoint / ckpt.INFO_FILE).read_text())
    info["epoch"] += 3
    (checkpoint / ckpt.INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(SystemExit) as stopped:
        train_cli.main([str(ROOT / "configs/shapes.yaml"), *TINY, f"output_dir={run}", "train.max_steps=6",
                        "--resume", "auto"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stopped.value.code == 2 and "says step 4 but data position epoch 3" in err, err
