"""Training loop: checkpoints, resume, plain-diffusers export, atomic writes, SIGTERM."""
import os
import signal
import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file

from diffusion.checkpoints import store as ckpt
from diffusion.errors import UserError
from diffusion.training.trainer import Trainer, train
from tests.conftest import ROOT, TINY, tiny_config


def test_run_layout_and_logs(tiny_run):
    assert [p.name for p in ckpt.list_checkpoints(tiny_run)] == ["step-000002", "step-000004"]
    assert ckpt.read_info(ckpt.list_checkpoints(tiny_run)[-1]).step == 4
    assert (tiny_run / "config.yaml").is_file() and (tiny_run / "final" / "config.yaml").is_file()
    rows = (tiny_run / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,images_per_sec" and len(rows) == 5


def test_saved_model_loads_in_plain_diffusers(tiny_run):
    unet = UNet2DModel.from_pretrained(tiny_run / "final" / "unet").eval()
    ema = load_file(str(tiny_run / "final" / ckpt.EMA_FILE))
    ours = {k.removeprefix("unet."): v for k, v in ema.items() if k.startswith("unet.")}
    for name, value in unet.state_dict().items():
        torch.testing.assert_close(value, ours[name])
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 70]), torch.tensor([1, 12])
    assert unet(x, t, class_labels=y).sample.shape == (2, 3, 8, 8)
    assert (tiny_run / "final" / "scheduler" / "scheduler_config.json").is_file()


def test_resume_restores_step_optimizer_ema_and_data_position(tmp_path):
    train(tiny_config(tmp_path, "train.max_steps=4"))
    saved = ckpt.list_checkpoints(tmp_path)[-1]
    saved_opt = torch.load(saved / "accelerate" / "optimizer.bin", weights_only=False)
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=6"), resume="auto", log=False)
    trainer.load_checkpoint(saved)
    assert trainer.state.step == 4 and trainer.state.batch_in_epoch == 4
    assert trainer.ema.optimization_step == 4
    state = trainer.optimizer.state_dict()["state"]
    for key, value in saved_opt["state"].items():
        torch.testing.assert_close(state[key]["exp_avg"], value["exp_avg"])
    ema_file = load_file(str(saved / ckpt.EMA_FILE))
    names = [n for n, _ in trainer.core.named_parameters()]
    for name, shadow in zip(names, trainer.ema.shadow_params):
        torch.testing.assert_close(shadow.cpu(), ema_file[name])


def test_resumed_ema_is_moved_to_the_model_device_after_loading(tmp_path, monkeypatch):
    """The EMA state is read from files onto the CPU and EMAModel keeps those tensors, so on CUDA the
    first ema.step would mix devices. On the CPU that coincidence hides the bug, so record the calls:
    after the EMA state is loaded it must be moved to the model's device."""
    train(tiny_config(tmp_path, "train.max_steps=2"))
    trainer = Trainer(tiny_config(tmp_path, "train.max_steps=4"), resume="auto", log=False)
    events = []
    load, move = trainer.ema.load_state_dict, trainer.ema.to
    monkeypatch.setattr(trainer.ema, "load_state_dict", lambda state: events.append("load") or load(state))
    monkeypatch.setattr(trainer.ema, "to", lambda device=None, dtype=None, **kw: events.append(("to", torch.device(device)))
                        or move(device=device, dtype=dtype, **kw))
    trainer.load_checkpoint(ckpt.list_checkpoints(tmp_path)[-1])
    assert events.index("load") < len(events) - 1 and events[-1] == ("to", trainer.accelerator.device)
    device = next(trainer.core.parameters()).device
    assert all(shadow.device == device for shadow in trainer.ema.shadow_params)


def test_resumed_run_continues_like_an_uninterrupted_one(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny_config(straight, "train.max_steps=6"))
    train(tiny_config(split, "train.max_steps=4"))
    train(tiny_config(split, "train.max_steps=6"), resume="auto")
    assert ckpt.read_info(ckpt.list_checkpoints(split)[-1]).step == 6
    a = load_file(str(straight / "final" / ckpt.EMA_FILE))
    b = load_file(str(split / "final" / ckpt.EMA_FILE))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


def test_compiled_run_saves_bare_names_samples_and_resumes_uncompiled(tmp_path):
    """train.compile=true (GPU configs): checkpoints and export hold the bare model's names, not
    torch.compile's `_orig_mod.` ones, so sample.py, plain diffusers and an uncompiled resume load them.
    aot_eager runs the same torch.compile wrapping as inductor without minutes of kernel generation."""
    from diffusion.checkpoints.load import load_model

    compiled, plain = tmp_path / "compiled", tmp_path / "plain"
    for out, extra, is_compiled in ((compiled, ["train.compile=true", "train.compile_backend=aot_eager"], True),
                                    (plain, [], False)):
        trainer = Trainer(tiny_config(out, "train.max_steps=4", *extra))
        assert isinstance(trainer.model, torch._dynamo.eval_frame.OptimizedModule) == is_compiled
        trainer.fit()
    for name in (f"checkpoints/step-000004/{ckpt.EMA_FILE}", f"final/{ckpt.EMA_FILE}", "checkpoints/step-000004/accelerate/model.safetensors"):
        ours, reference = load_file(str(compiled / name)), load_file(str(plain / name))
        assert sorted(ours) == sorted(reference)
        for key in ours:  # compiling changes the speed, not the training
            torch.testing.assert_close(ours[key], reference[key], atol=1e-4, rtol=1e-3)
    load_model(compiled)
    UNet2DModel.from_pretrained(compiled / "final" / "unet")
    train(tiny_config(compiled, "train.max_steps=6"), resume="auto")
    assert ckpt.read_info(ckpt.list_checkpoints(compiled)[-1]).step == 6


def test_two_process_run_resumes_exactly_with_one_snapshot_writer(tmp_path):
    """The multi-GPU path (accelerate + DDP), run as two CPU processes with torchrun and gloo. Each
    rank's RNG state and the data position are saved, so resuming the step-2 checkpoint to step 4
    gives the uninterrupted run's losses and weights. Post-hoc EMA is on: rank 0 alone tracks and
    writes its snapshots (a second writer would find a snapshot written and fail the run)."""
    from diffusion.training import phema

    def launch(out, *extra):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
             "configs/shapes.yaml", *TINY, "train.max_steps=4", "train.posthoc_ema=true", "train.posthoc_ema_every=2",
             f"output_dir={out}", *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    done = launch(straight)
    step2 = straight / "checkpoints" / "step-000002"
    assert (step2 / "accelerate" / "random_states_1.pkl").is_file()
    found = phema.snapshot_steps(straight, complete=False)
    assert [s for s, _ in found] == [2, 4]
    assert not [p for p in phema.snapshot_root(straight).iterdir() if p.name.startswith(".")]
    assert all(ckpt._read_info_json(path)["process_index"] == 0 for _, path in found)
    assert done.stdout.count("post-hoc EMA: sigma_rel") == 1

    assert "at step 2" in launch(resumed, "--resume", str(step2)).stdout
    rows = [[line.split(",")[:2] for line in (run / "metrics.csv").read_text().splitlines()[1:]] for run in (straight, resumed)]
    assert len(rows[0]) == 4 and rows[1] == rows[0][2:]
    a, b = (load_file(str(run / "final" / ckpt.EMA_FILE)) for run in (straight, resumed))
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def test_half_written_checkpoint_is_ignored(tiny_run, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / ".tmp-step-000009" / "accelerate").mkdir(parents=True)
    (run / "checkpoints" / "step-000008").mkdir()  # no info.json: never completed
    assert ckpt.list_checkpoints(run) == []
    assert ckpt.resolve_checkpoint(tiny_run).name == "step-000004"


def test_sigterm_during_a_checkpoint_write_still_stops_with_the_interrupted_line(tmp_path, monkeypatch, capsys):
    """The signal lands while step 2's checkpoint is being written: the write finishes, the run stops
    there (no second save, no export), says so, and ends in Interrupted, not in a normal return."""
    from diffusion.errors import Interrupted

    write = Trainer.save_checkpoint

    def signalled_write(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return write(self)

    monkeypatch.setattr(Trainer, "save_checkpoint", signalled_write)
    with pytest.raises(Interrupted) as stopped:
        train(tiny_config(tmp_path, "train.max_steps=6"))
    assert stopped.value.exit_status == 128 + signal.SIGTERM
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000002"]
    assert not (tmp_path / "final").exists()
    out = capsys.readouterr().out
    assert f"interrupted by SIGTERM at step 2: saved {tmp_path / 'checkpoints' / 'step-000002'}" in out


def test_a_diverging_run_stops_and_never_saves_non_finite_weights(tmp_path, capsys):
    """lr=1e8 without clipping: the loss turns non-finite; the run stops within log_every steps with one
    line and exit status 3, every checkpoint it left is finite, and sample.py refuses non-finite weights."""
    import train as train_cli

    from diffusion.checkpoints.load import load_model

    with pytest.raises(SystemExit) as stopped:
        train_cli.main(["configs/shapes.yaml", *TINY, f"output_dir={tmp_path}", "train.lr=1e8", "train.grad_clip=0",
                        "train.warmup_steps=0", "train.max_steps=40", "train.checkpoint_every=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 3 and "diverged" in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "final").exists()
    for saved in ckpt.list_checkpoints(tmp_path):
        assert all(torch.isfinite(v).all() for v in load_file(str(saved / ckpt.EMA_FILE)).values())
    broken = ckpt.list_checkpoints(tmp_path)[-1]
    weights = load_file(str(broken / ckpt.EMA_FILE))
    name = next(iter(weights))
    weights[name] = torch.full_like(weights[name], float("nan"))
    ckpt.write_weights(broken / ckpt.EMA_FILE, weights)
    ckpt.write_info(broken, ckpt.read_info(broken), ckpt.file_digests(broken))  # as saved by an older version
    with pytest.raises(UserError, match="non-finite"):
        load_model(broken)
