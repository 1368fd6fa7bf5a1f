"""The hostile-input drill's runners that are more than one command: runs stopped by signals (as a
scheduler, a launcher or a closing terminal sends them) and demo requests made through the page's
functions (`hostile_inputs.py --demo-case`).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from benchmarks.hostile_env import Case, Env, Result
from tests.conftest import ROOT, TINY


# -- signals --------------------------------------------------------------------------------------------

def as_from_a_terminal() -> None:
    """A command typed into a terminal handles Ctrl-C and SIGHUP; a process started in the background of
    a script (like this drill, perhaps) would inherit them ignored, and a run keeps ignored signals ignored."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def signalled(signals: tuple[int, ...], launcher: tuple[str, ...] = (), gap: float = 0.01,
              *extra: str) -> Callable[[Env, Path], Result]:
    """Start an endless run with 2 loader workers in its own process group, wait for its first logged
    step, then send `signals` to the whole group `gap` seconds apart."""
    def runner(env: Env, folder: Path) -> Result:
        out = folder / "out"
        command = [sys.executable, *launcher, "train.py", "configs/shapes.yaml", *TINY, "train.max_steps=100000",
                   "train.checkpoint_every=100000", "data.num_workers=2", f"output_dir={out}", *extra]
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                                preexec_fn=as_from_a_terminal)
        try:
            while not (out / "metrics.csv").exists() and proc.poll() is None and time.perf_counter() - start < 150:
                time.sleep(0.2)
            time.sleep(0.5)
            for number, sig in enumerate(signals):
                if number:
                    time.sleep(gap)
                os.killpg(proc.pid, sig)
            stdout, stderr = proc.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            return Result(None, stdout, stderr, time.perf_counter() - start)
        status = proc.returncode
        if launcher:  # torchrun reports the SIGTERM it got with its own traceback and exit 1: judge the ranks
            stderr = stderr.split("Traceback (most recent call last):")[0] if "SignalException" in stderr else stderr
            status = 128 + signal.SIGTERM if status == 1 and "interrupted by SIGTERM" in stdout + stderr else status
        return Result(status, stdout, stderr, time.perf_counter() - start)
    return runner


def saved_checkpoint(env: Env, folder: Path, result: Result) -> str | None:
    checkpoints = sorted((folder / "out" / "checkpoints").glob("step-*"))
    if not checkpoints or not (checkpoints[-1] / "info.json").is_file():
        return "no checkpoint was saved"
    return None if "saved" in result.out else "it did not say what it saved"


def stopped_or_saved(env: Env, folder: Path, result: Result) -> str | None:
    """A second Ctrl-C stops at once (saying so) if it comes before the first one's save is done."""
    if "stopped at once, without saving" in result.err:
        return None
    return saved_checkpoint(env, folder, result)


def killed_then_resumed(env: Env, folder: Path) -> Result:
    """SIGKILL a run after its first checkpoint, then `--resume auto`: it continues from that checkpoint."""
    first = signalled((signal.SIGKILL,), (), 0.0, "train.checkpoint_every=2")(env, folder)
    proc = subprocess.run([sys.executable, "train.py", "configs/shapes.yaml", *TINY, "train.max_steps=6",
                           f"output_dir={folder / 'out'}", "--resume", "auto"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, timeout=150)
    return Result(proc.returncode, proc.stdout, proc.stderr, first.seconds)


# -- the demo (run as `hostile_inputs.py --demo-case NAME RUN FOLDER`) ----------------------------------------

def run_demo_case(argv: list[str]) -> int:
    """One demo request through diffusion.demos (backend and page helpers), as the page would make it;
    a refusal prints `error: ...` and returns 2."""
    name, run, folder = argv[0], argv[1], Path(argv[2])
    from diffusion.demos import app
    from diffusion.demos import backend as B

    try:
        if name.startswith("upload "):
            B.read_upload(argv[3])
            return 0
        if name == "editor upload":
            import gradio as gr
            from gradio.components.image_editor import EditorData
            from gradio.data_classes import FileData

            editor = app.guard_uploads(gr.ImageEditor(type="pil", image_mode="RGBA"), gr)
            try:
                editor.preprocess(EditorData(background=FileData(path=argv[3]), layers=[], composite=None))
            except gr.Error as err:
                print(f"error: {err.message}", file=sys.stderr)
                return 2
            return 0
        models = B.load_models(B.DemoPaths(run))
        info = models.info()
        fields = dict(label=0, prompt=None, negative=None, scale=3.0, sampler="ddim", steps=2, seed=0, count=1,
                      classifier_scale=None, clip_scale=None, rescale=0, threshold=None, lo=None, hi=None)
        fields.update(json.loads(argv[3]) if len(argv) > 3 else {})
        request = app.request_from(info, *fields.values())
        image = Image.new("RGB", (16, 12), (90, 90, 90))
        if name.startswith("mask"):
            size = tuple(json.loads(argv[4]))
            mask = Image.new("L", size, 0)
            mask.paste(255, (0, 0, size[0] // 2, size[1]))
            B.inpaint(models, image, mask, request)
        elif name.startswith("layer"):
            layer = np.zeros((6, 8, 4), np.uint8)
            layer[:, :4, 3] = 255
            B.paint_mask_from_layers(image.size, [layer])
        else:
            B.generate(models, request)
        return 0
    except B.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def demo(name: str, words: str, fields: dict | None = None, *extra: str, status: int = 2) -> Case:
    def argv(env: Env, folder: Path) -> list[str]:
        files = env.root / "files"
        return ["demo", name, str(env.run), str(folder), json.dumps(fields or {}), *(e.format(files=files) for e in extra)]
    return Case("demo", name, argv, words, status)


def upload(name: str, file: str, words: str, status: int = 2) -> Case:
    def argv(env: Env, folder: Path) -> list[str]:
        return ["demo", name, str(env.run), str(folder), str(env.file(file))]
    return Case("demo", name, argv, words, status)
