"""Signals as clusters and terminals send them: to the whole process group, data-loader workers
included, sometimes twice; a closed terminal's SIGHUP; torchrun forwarding SIGTERM to its ranks.
Each must end with a checkpoint and exit status 128 + the signal number."""
from __future__ import annotations

import fcntl
import os
import pty
import select
import shlex
import shutil
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from diffusion.checkpoints import store as ckpt
from diffusion.training.stop import StopRequest
from tests.conftest import ROOT, TINY

ENDLESS = ["train.max_steps=100000", "train.checkpoint_every=100000", "data.num_workers=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def train_command(out: Path, *launcher: str) -> list[str]:
    return [sys.executable, *launcher, "train.py", "configs/shapes.yaml", *TINY, *ENDLESS, f"output_dir={out}"]


def wait_for_training(proc: subprocess.Popen, out: Path, timeout: float = 240) -> None:
    """Until the run has logged a step (its workers are running by then)."""
    deadline = time.time() + timeout
    while not (out / "metrics.csv").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    assert proc.poll() is None, "the run ended before it was signalled"


def session_members(sid: int) -> list[int]:
    """The processes still in session `sid`."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.getsid(int(entry)) == sid:
                found.append(int(entry))
        except OSError:
            continue
    return found


def saved_step(out: Path, text: str, name: str) -> int:
    """The step of the checkpoint the run says it saved on `name`, checked against the folder."""
    step = ckpt.read_info(ckpt.list_checkpoints(out)[-1]).step
    assert step >= 1 and f"interrupted by {name} at step {step}: saved" in text, text[-3000:]
    return step


def test_process_group_sigterm_twice_with_workers_saves_and_exits_143(tmp_path):
    """SLURM, Kubernetes and `timeout` signal the process group: the loader workers get SIGTERM too.
    They must ignore it, and a second SIGTERM 10 ms later must not abort the save."""
    proc = subprocess.Popen(train_command(tmp_path), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_training(proc, tmp_path)
        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]  # not 0: a scheduler must not take it for a finished run
    assert "Traceback" not in out and "run saved" not in out
    saved_step(tmp_path, out, "SIGTERM")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_closing_the_terminal_saves_and_exits_129(tmp_path):
    """A run started from an interactive shell whose terminal window is then closed (the pty's master
    end): the shell gets SIGHUP and sends it on to the run's process group, workers included. The run
    saves, does not die writing to the dead terminal, and exits 128 + SIGHUP."""
    out, status = tmp_path / "run", tmp_path / "status"
    master, slave = pty.openpty()

    def own_terminal():  # a session of its own, with the pty as its controlling terminal
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # even if this test runs under nohup

    shell = subprocess.Popen(["bash", "--norc", "--noprofile", "-i"], cwd=ROOT, env={**ENV, "PS1": "$ "},
                             stdin=slave, stdout=slave, stderr=slave, preexec_fn=own_terminal)
    os.close(slave)
    # sh (in the job, so it gets the SIGHUP too) outlives the run to record its exit status
    os.write(master, f"sh -c 'trap : HUP; {shlex.join(train_command(out))}; echo $? > {status}'\n".encode())
    stop, shown = threading.Event(), []

    def read_terminal():  # what the terminal shows; it must be read, or the run blocks writing to it
        while not stop.is_set():
            if select.select([master], [], [], 0.1)[0]:
                try:
                    shown.append(os.read(master, 65536))
                except OSError:
                    return

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        deadline = time.time() + 240
        while not (out / "metrics.csv").exists() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        stop.set()
        reader.join()
        os.close(master)  # the terminal window closes
        shell.wait(timeout=30)
        while not status.exists() and time.time() < deadline + 120:
            time.sleep(0.2)
    finally:
        for pid in session_members(shell.pid):  # a run that hung: end it
            os.kill(pid, signal.SIGKILL)
    assert status.exists() and status.read_text().strip() == str(128 + signal.SIGHUP), b"".join(shown)[-3000:]
    step = ckpt.read_info(ckpt.list_checkpoints(out)[-1]).step
    rows = (out / "metrics.csv").read_text().splitlines()
    assert step >= 1 and int(rows[-1].split(",")[0]) <= step  # saved at or after the last step it logged


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux")
def test_process_group_sigterm_under_torchrun_with_workers_saves_on_every_rank(tmp_path):
    """torchrun forwards the SIGTERM it gets to each rank's process group (rank + its workers): every
    rank saves and exits 143. (torchrun itself then exits 1 with its own SignalException report.)"""
    proc = subprocess.Popen(train_command(tmp_path, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for_training(proc, tmp_path)
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "killed by signal" not in out and "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out, out[-3000:]
    assert "Unable to shutdown process" not in out  # no rank needed torchrun's SIGKILL
    step = saved_step(tmp_path, out, "SIGTERM")
    assert (tmp_path / "checkpoints" / f"step-{step:06d}" / "accelerate" / "random_states_1.pkl").is_file()


def test_only_a_second_ctrl_c_aborts():
    """Repeated SIGTERMs keep the save going, and so does one Ctrl-C after them; the second Ctrl-C
    raises KeyboardInterrupt (stop at once, without saving)."""
    stop = StopRequest()
    try:
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):
            stop._handle(sig, None)
        assert stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)
    finally:
        stop.restore()


def test_a_signal_ignored_at_start_stays_ignored():
    """`nohup python train.py ...` ignores SIGHUP: the run must not start handling it."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        stop = StopRequest()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        stop.restore()
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_an_unreadable_image_read_by_a_worker_ends_the_run_in_one_line(tmp_path):
    """The workers ignore SIGTERM, so the interpreter's exit (which terminates leftover workers with
    SIGTERM, then joins them) would wait forever after an error: the trainer shuts them down itself.
    The worker's error is one line naming the file."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    proc = subprocess.run([sys.executable, "train.py", "configs/shapes.yaml", *TINY, "train.max_steps=2",
                           "data.name=imagefolder", f"data.root={tmp_path / 'images'}", "data.num_workers=2",
                           "train.batch_size=2", f"output_dir={tmp_path / 'run'}"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and "cannot read image" in errors[0] and "broken.png" in errors[0], errors
