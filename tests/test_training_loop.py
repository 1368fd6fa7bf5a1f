"""The training loop under stop requests, many ranks and resumes: stops at sync points only,
agreed across ranks; logs that do not repeat rows after a resume."""
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from diffusion.checkpoints import store as ckpt
from diffusion.errors import Interrupted
from diffusion.training.stop import StopRequest
from diffusion.training.trainer import Trainer, train
from tests.conftest import tiny_config

ACCUM = ["train.grad_accum=2", "train.checkpoint_every=3"]


def test_a_stop_inside_an_accumulation_finishes_the_step_and_resumes_exactly(tmp_path, monkeypatch):
    """SIGTERM lands on the first micro-batch of step 2 (grad_accum=2). The run must finish that
    optimizer step before stopping, so the checkpoint's data position counts only stepped micro-batches,
    and the resumed run ends bit for bit where the uninterrupted one does."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny_config(straight, "train.max_steps=4", *ACCUM))

    step, agreed, calls = Trainer.train_step, getattr(StopRequest, "agreed", None), []

    def signalled_step(self, batch):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch)

    def recorded_agreed(self, accelerator):
        assert accelerator.sync_gradients  # asked only where gradients sync
        return agreed(self, accelerator)

    monkeypatch.setattr(Trainer, "train_step", signalled_step)
    monkeypatch.setattr(StopRequest, "agreed", recorded_agreed, raising=False)
    with pytest.raises(Interrupted):
        train(tiny_config(split, "train.max_steps=4", *ACCUM))
    monkeypatch.undo()
    info = ckpt.read_info(ckpt.list_checkpoints(split)[-1])
    assert (info.step, info.batch_in_epoch) == (2, 4)
    train(tiny_config(split, "train.max_steps=4", *ACCUM), resume="auto")
    a, b = (load_file(str(run / "final" / ckpt.EMA_FILE)) for run in (straight, split))
    assert all(torch.equal(a[name], b[name]) for name in a)


class TwoRanks:
    """An accelerator stand-in for rank 0 of two, where rank 1 got SIGTERM and rank 0 nothing."""
    num_processes, device = 2, torch.device("cpu")

    def __init__(self):
        self.reductions = []

    def reduce(self, tensor, reduction):
        self.reductions.append(reduction)
        return torch.maximum(tensor, torch.tensor([int(signal.SIGTERM)]))


def test_the_stop_flag_is_reduced_across_ranks():
    stop = StopRequest()
    try:
        acc = TwoRanks()
        assert not stop.requested
        assert stop.agreed(acc) and acc.reductions == ["max"]
        assert stop.signum == signal.SIGTERM  # rank 0 stops too, and says why
    finally:
        stop.restore()


def test_a_resume_does_not_repeat_logged_steps(tmp_path):
    """Killed after logging steps 3-4 but before checkpointing step 4: the resume from step 2 logs 3-4
    again, and metrics.csv and TensorBoard must list each step once."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny_config(tmp_path, "train.max_steps=4"))
    shutil.rmtree(tmp_path / "checkpoints" / "step-000004")
    shutil.rmtree(tmp_path / "final")
    train(tiny_config(tmp_path, "train.max_steps=4"), resume="auto")
    steps = [line.split(",")[0] for line in (tmp_path / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4"]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]


def test_inpainting_masks_come_with_the_batch_and_the_mask_config_is_checked_once(tmp_path, monkeypatch):
    """The keep-masks are drawn in the data pipeline (loader workers), and the loop neither draws masks
    nor re-checks the mask config per step."""
    from diffusion.conditioning.inpaint import masks
    from diffusion.training import batches

    checks, draws = [], []
    check, draw = masks.check_mask_config, masks.training_keep_masks
    monkeypatch.setattr(batches, "check_mask_config", lambda cfg: checks.append(1) or check(cfg))
    monkeypatch.setattr(batches, "training_keep_masks", lambda *a: draws.append(a[0]) or draw(*a))
    losses = []
    loss = Trainer.train_step

    def recorded(self, batch):
        assert batch["keep"].shape == (4, 1, 8, 8)  # the mask arrives with the batch
        losses.append(1)
        return loss(self, batch)

    monkeypatch.setattr(Trainer, "train_step", recorded)
    train(tiny_config(tmp_path, "train.max_steps=3", "model.inpaint=true"))
    assert len(losses) == 3 and checks == [1]
    assert set(draws) == {1} and len(draws) >= 4 * len(losses)  # one mask per item (the loader reads ahead)


def children(pid: int) -> list[int]:
    path = f"/proc/{pid}/task/{pid}/children"
    return [int(p) for p in open(path).read().split()] if os.path.exists(path) else []


def rank_of(pid: int) -> int | None:
    try:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return None
    ranks = [int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc to find the ranks")
def test_sigterm_to_one_rank_stops_every_rank_with_a_checkpoint(tmp_path):
    """Two CPU ranks (torchrun, gloo); only rank 1 gets SIGTERM. Every rank must stop after the same
    step and save, rather than rank 1 leaving for the checkpoint while rank 0 waits in the next all-reduce."""
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT, TINY

    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
         "configs/shapes.yaml", *TINY, "train.max_steps=100000", "train.checkpoint_every=100000", f"output_dir={tmp_path}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 240
        while not (tmp_path / "metrics.csv").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        rank1 = [pid for pid in children(proc.pid) if rank_of(pid) == 1]
        assert rank1, "rank 1 not found"
        os.kill(rank1[0], signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)  # the old code hangs here until the gloo timeout
    finally:
        if proc.poll() is None:  # a hung job: end the ranks too, not only torchrun
            for pid in children(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
    assert "interrupted by SIGTERM at step" in out, out[-3000:]
    step = ckpt.read_info(ckpt.list_checkpoints(tmp_path)[-1]).step
    assert step >= 1 and f"at step {step}: saved" in out
