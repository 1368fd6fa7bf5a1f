"""The user trial of issue 27, as a new user would make the mistakes:

1. start the shapes quickstart from an interactive shell, then close its terminal window;
2. start the same command again in the same folder, by mistake;
3. continue it properly with --resume auto;
4. open the demo on the run and send it a mask of another size than its image and a NaN guidance
   scale (through the page's API, as gradio_client does).

    python benchmarks/user_trial.py [--out DIR] [--steps N]

Prints each step's outcome and the one line each mistake got; exit status 0 when nothing was lost
and every mistake was named in one line.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import pty
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
QUICKSTART = ["configs/shapes.yaml", "data.num_workers=2", "train.sample_every=0"]


def tree_digest(run: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(run.rglob("*")):
        if path.is_file() and path.name != ".lock":
            digest.update(path.relative_to(run).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def in_a_terminal_then_close_it(run: Path, seconds: float) -> int | None:
    """`python train.py ...` typed into an interactive bash on a pty; the pty is closed `seconds` after
    the run's first logged step. Returns the run's exit status (recorded by a wrapping sh)."""
    status = run.with_suffix(".status")
    master, slave = pty.openpty()

    def own_terminal():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    shell = subprocess.Popen(["bash", "--norc", "--noprofile", "-i"], cwd=ROOT, env={**ENV, "PS1": "$ "},
                             stdin=slave, stdout=slave, stderr=slave, preexec_fn=own_terminal)
    os.close(slave)
    train = shlex.join([sys.executable, "train.py", *QUICKSTART, f"output_dir={run}"])
    os.write(master, f"sh -c 'trap : HUP; {train}; echo $? > {status}'\n".encode())
    deadline = time.time() + 600
    while not (run / "metrics.csv").exists() and time.time() < deadline:
        if select.select([master], [], [], 0.2)[0]:
            os.read(master, 65536)  # a terminal shows what it is sent; unread, the run would block
    end = time.time() + seconds
    while time.time() < end:
        if select.select([master], [], [], 0.2)[0]:
            os.read(master, 65536)
    os.close(master)  # the window is closed
    shell.wait(timeout=30)
    while not status.exists() and time.time() < deadline + 300:
        time.sleep(0.5)
    return int(status.read_text()) if status.exists() else None


def one_line(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raw_call(port: int, api_name: str, data: list) -> None:
    """Call the page's API with plain HTTP: JSON allows NaN there (gradio_client refuses to send it).
    Raises RuntimeError with the page's message if the call ends in an error."""
    import httpx

    base = f"http://127.0.0.1:{port}/gradio_api/call/{api_name}"
    body = json.dumps({"data": data})  # NaN is written as NaN, as a browser's JSON.stringify would not
    event = httpx.post(base, content=body, headers={"Content-Type": "application/json"}, timeout=60).json()["event_id"]
    with httpx.stream("GET", f"{base}/{event}", timeout=600) as stream:
        lines = list(stream.iter_lines())
    if any(line.startswith("event: error") for line in lines):
        data_lines = [line[len("data: "):] for line in lines if line.startswith("data: ")]
        message = json.loads(data_lines[-1]) if data_lines else "error"
        raise RuntimeError(message.get("error") if isinstance(message, dict) else message)


def demo_mistakes(run: Path, folder: Path) -> dict[str, str]:
    """Start the demo on `run`, send the two mistakes through its API; {mistake: the message shown}."""
    import numpy as np
    from gradio_client import Client, handle_file
    from PIL import Image

    port = free_port()
    app = subprocess.Popen([sys.executable, "-m", "diffusion.demos.app", "--checkpoint", str(run), "--port", str(port)],
                           cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        Image.fromarray(np.full((64, 64, 4), 128, np.uint8), "RGBA").save(folder / "photo.png")
        layer = np.zeros((32, 48, 4), np.uint8)
        layer[:, :24] = (255, 48, 48, 255)
        Image.fromarray(layer, "RGBA").save(folder / "layer.png")
        shown = {}
        common = [0, "", "", 3.0, "ddim", 10, 0]  # class, prompt, negative, scale, sampler, steps, seed
        more = [None, None, 0, None, None, None]  # classifier/CLIP scales, rescale, threshold, interval
        for mistake, call in (
                ("a NaN guidance scale", lambda: raw_call(port, "on_generate", [0, "", "", float("nan"), "ddim", 10, 0, 1,
                                                                                *more])),
                ("a mask layer of another size than the image",
                 lambda: client.predict({"background": handle_file(str(folder / "photo.png")),
                                         "layers": [handle_file(str(folder / "layer.png"))], "composite": None},
                                        *common, *more, "replace", 5, 5, api_name="/on_inpaint"))):
            try:
                call()
                shown[mistake] = "(accepted)"
            except Exception as err:  # noqa: BLE001 - gradio_client's AppError carries the page's message
                shown[mistake] = str(err).strip().splitlines()[-1] if str(err).strip() else f"{type(err).__name__}"
        return shown
    finally:
        app.terminate()
        app.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--seconds", type=float, default=20, help="how long the first run trains before its terminal closes")
    args = parser.parse_args(argv)
    folder = args.out or Path(tempfile.mkdtemp(prefix="user-trial-"))
    run, ok = folder / "run", True

    status = in_a_terminal_then_close_it(run, args.seconds)
    from diffusion.checkpoints import store

    checkpoints = store.list_checkpoints(run)
    logged = int((run / "metrics.csv").read_text().splitlines()[-1].split(",")[0])
    saved = store.read_info(checkpoints[-1]).step if checkpoints else None
    print(f"1. terminal closed (last logged step {logged}): exit status {status}, checkpoint saved at step {saved}")
    ok &= status == 128 + signal.SIGHUP and saved is not None and saved >= logged

    before = tree_digest(run)
    again = subprocess.run([sys.executable, "train.py", *QUICKSTART, f"output_dir={run}"], cwd=ROOT, env=ENV,
                           capture_output=True, text=True, timeout=300)
    unchanged = tree_digest(run) == before
    print(f"2. the same command again: exit {again.returncode}, run {'unchanged' if unchanged else 'CHANGED'}:\n   "
          + "\n   ".join(one_line(again)))
    ok &= again.returncode == 2 and len(one_line(again)) == 1 and unchanged

    resumed = subprocess.run([sys.executable, "train.py", *QUICKSTART, f"output_dir={run}",
                              f"train.max_steps={saved + 20}", "--resume", "auto"], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=900)
    line = next((l for l in resumed.stdout.splitlines() if l.startswith("resumed from")), "(no 'resumed from' line)")
    print(f"3. --resume auto: exit {resumed.returncode}: {line}")
    ok &= resumed.returncode == 0 and f"at step {saved}" in line

    for mistake, message in demo_mistakes(run, folder).items():
        print(f"4. the demo, {mistake}: {message}")
        ok &= message != "(accepted)" and "\n" not in message
    print("PASS: nothing lost, every mistake named in one line" if ok else "FAIL")
    if args.out is None:
        shutil.rmtree(folder, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
