"""The hostile-input drill's cases for the demo's bounds (issue #34): oversized brush layers and images,
too many layers, values of the wrong type in the HTTP API, leftover files, a bad --port. Each case is
one process:

    python benchmarks/hostile_demo_limits.py CASE RUN FOLDER [UP_RUN]

It builds the demo app on RUN (a tiny trained run; UP_RUN an upsampler for the Upscale tab), sends the request through the page's components
(their preprocess, as gradio does, then the handler) and prints `error: ...` and exits 2 when the page
would show a message; `peak RSS growth: N MB` says how much memory the request took. The helpers
(`blank_png`, `call_handler`, `peak_rss_growth_mb`) are shared with tests/test_demo_limits.py.
"""
from __future__ import annotations

import json
import os
import struct
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HUGE = 13000  # the tester's layers: 13000 x 13000 pixels
RSS_LIMIT_MB = 200  # a refused request may not grow the server's memory more than this


def blank_png(path: Path, width: int, height: int) -> Path:
    """A real, decodable 1-bit PNG of width x height blank pixels: a few kB on disk however large it is
    (written row by row through zlib, without the pixels ever in memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\x00" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def file_data(path: str | Path) -> dict:
    return {"path": str(path), "meta": {"_type": "gradio.FileData"}}


def call_handler(demo, api_name: str, *values: Any):
    """Call an event handler as gradio does after a request's JSON arrives: each input component's data
    model and preprocess on the raw value, then the handler."""
    block_fn = next(f for f in demo.fns.values() if f.api_name == api_name)
    processed = []
    for block, value in zip(block_fn.inputs, values):
        model = getattr(block, "data_model", None)
        if model is not None and value is not None:
            value = model.model_validate(value)
        processed.append(block.preprocess(value))
    return block_fn.fn(*processed)


def _rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_growth_mb(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(peak resident memory during fn() minus before it, in MB; fn's result or exception). The kernel's
    peak (VmHWM, reset through /proc/self/clear_refs) where allowed, else RSS sampled every 5 ms."""
    before = _rss_mb()
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        exact = _rss_mb("VmHWM") <= before + 1
    except OSError:
        exact = False
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.005)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        outcome: Any = fn()
    except Exception as err:  # noqa: BLE001 - the caller judges it
        outcome = err
    done.set()
    sampler.join()
    top = max(peak[0], _rss_mb("VmHWM")) if exact else peak[0]
    return top - before, outcome


# -- the cases ----------------------------------------------------------------------------------------------

BASE = [0, "", "", 3, "ddim", 2, 0, 1, None, None, 0, None, None, None]  # on_generate's values: class 0, 2 steps
INPAINT = [0, "", "", 3, "ddim", 2, 0, None, None, 0, None, None, None, "replace", 5, 5]  # after the editor
UPSCALE = [4, "", "", 3, "ddim", 2, 0, 0.1, True]  # after the upload


def generate_with(**changes: Any) -> list:
    names = ["label", "prompt", "negative", "scale", "sampler", "steps", "seed", "count", "classifier_scale",
             "clip_scale", "rescale", "threshold", "lo", "hi"]
    values = list(BASE)
    for name, value in changes.items():
        values[names.index(name)] = value
    return values


def request(name: str, folder: Path) -> tuple[str, list]:
    """(the handler, its values) of a case that sends one request."""
    small = folder / "small.png"
    if not small.exists():
        from PIL import Image

        Image.new("RGB", (64, 64), (90, 90, 90)).save(small)
    huge = lambda i=0: blank_png(folder / f"huge_{i}.png", HUGE, HUGE)  # noqa: E731
    layer = lambda: blank_png(folder / "layer.png", 64, 64)  # noqa: E731
    editor = lambda bg, layers: {"background": file_data(bg), "layers": [file_data(p) for p in layers],  # noqa: E731
                                 "composite": None}
    table: dict[str, tuple[str, list]] = {
        "inpaint 5 huge layers": ("on_inpaint", [editor(small, [huge(i) for i in range(5)]), *INPAINT]),
        "inpaint 1 huge layer": ("on_inpaint", [editor(small, [huge()]), *INPAINT]),
        "inpaint huge background": ("on_inpaint", [editor(huge(), [layer()]), *INPAINT]),
        "inpaint 4 layers of 4096": ("on_inpaint", [editor(small, [blank_png(folder / f"l{i}.png", 4096, 4096)
                                                                    for i in range(4)]), *INPAINT]),
        "inpaint 9 small layers": ("on_inpaint", [editor(small, [layer()] * 9), *INPAINT]),
        "upscale huge upload": ("on_upscale", [file_data(huge()), *UPSCALE]),
        "upscale consistency maybe": ("on_upscale", [file_data(small), *UPSCALE[:-1], "maybe"]),
        "cascade from a huge file": ("on_cascade", [[file_data(huge())]]),
        "steps nan": ("on_generate", generate_with(steps=float("nan"))),
        "steps 'abc'": ("on_generate", generate_with(steps="abc")),
        "guidance scale 'abc'": ("on_generate", generate_with(scale="abc")),
        "guidance scale [3]": ("on_generate", generate_with(scale=[3])),
        "seed true": ("on_generate", generate_with(seed=True)),
        "class '4'": ("on_generate", generate_with(label="4")),
        "class 4.0": ("on_generate", generate_with(label=4.0)),
        "class 'red square'": ("on_generate", generate_with(label="red square")),
        "class '4: red square'": ("on_generate", generate_with(label="4: red square")),
        "class 'purple'": ("on_generate", generate_with(label="purple")),
        "class 99": ("on_generate", generate_with(label=99)),
        "class {}": ("on_generate", generate_with(label={})),
        "sampler 5": ("on_generate", generate_with(sampler=5)),
        "prompt of 5000 characters": ("on_generate", generate_with(prompt="a" * 5000)),
    }
    return table[name]


def run_request(name: str, run: str, folder: Path, up_run: str | None = None) -> int:
    os.environ["GRADIO_TEMP_DIR"] = str(folder / "gradio")
    from diffusion.demos import app
    from diffusion.demos import backend as B
    import gradio as gr

    models = B.load_models(B.DemoPaths(run, upsampler=up_run))
    demo = app.build_app(models)
    api, values = request(name, folder)
    growth, outcome = peak_rss_growth_mb(lambda: call_handler(demo, api, *values))
    print(f"peak RSS growth: {growth:.0f} MB")
    leftovers = [p.name for p in models.workdir.iterdir() if p.name != "examples"]
    if leftovers:
        print(f"left in the demo's folder: {leftovers}")
    if isinstance(outcome, gr.Error):
        print(f"error: {outcome.message}", file=sys.stderr)
        return 2
    if isinstance(outcome, BaseException):
        raise outcome
    return 0


def run_exit(run: str, folder: Path) -> int:
    """Serve the app, upload, generate and upscale through HTTP, then end the process without closing
    the server: the check finds the uploads, served files and request folders gone."""
    import socket

    import httpx

    os.environ["GRADIO_TEMP_DIR"] = str(folder / "gradio")
    from diffusion.demos import app
    from diffusion.demos import backend as B

    models = B.load_models(B.DemoPaths(run))
    demo = app.build_app(models)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app.launch(demo, "127.0.0.1", port, block=False)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    small, layer = folder / "small.png", blank_png(folder / "layer.png", 64, 64)
    from PIL import Image

    Image.new("RGB", (64, 64), (90, 90, 90)).save(small)
    uploaded = []
    for path in (small, layer):
        with open(path, "rb") as f:
            uploaded.append(client.post("/gradio_api/upload", files={"files": (path.name, f, "image/png")}).json()[0])
    for api, data in [("on_generate", BASE), ("on_inpaint", [{"background": file_data(uploaded[0]),
                                                              "layers": [file_data(uploaded[1])], "composite": None},
                                                             *INPAINT])]:
        event = client.post(f"/gradio_api/call/{api}", json={"data": data}).json()["event_id"]
        print(api, client.get(f"/gradio_api/call/{api}/{event}").text.split("\n")[0])
    print(json.dumps({"workdir": str(models.workdir),
                      "files_while_serving": sum(1 for p in (folder / "gradio").rglob("*") if p.is_file())}))
    return 0  # no demo.close(): the process ends as a killed or finished server does, through atexit


def main(argv: list[str]) -> int:
    name, run, folder = argv[0], argv[1], Path(argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    from diffusion.errors import UserError

    try:
        return run_exit(run, folder) if name == "exit" else run_request(name, run, folder, *argv[3:4])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# -- the drill's side: case builders and checks (benchmarks/hostile_cases.py, ROUND3_DEMO_LIMITS) -----------------

_UP_RUN_LOCK = threading.Lock()


def up_run(env) -> Path:
    """A tiny 8 -> 16 upsampler beside the drill's shared run, trained once (for the Upscale tab's cases)."""
    import subprocess

    from tests.conftest import TINY, UP

    run = env.root / "up_run"
    with _UP_RUN_LOCK:
        if not (run / "final").is_dir():
            subprocess.run([sys.executable, "train.py", "configs/shapes.yaml", *TINY, "train.max_steps=2", *UP,
                            f"output_dir={run}"], cwd=ROOT, check=True, capture_output=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    return run


def bounded_memory(env, folder: Path, result) -> str | None:
    """The request took at most RSS_LIMIT_MB of memory and left no request folder."""
    growth = [float(line.split()[3]) for line in result.out.splitlines() if line.startswith("peak RSS growth:")]
    if not growth:
        return "it did not report its memory"
    if growth[0] > RSS_LIMIT_MB:
        return f"the request grew the server's memory by {growth[0]:.0f} MB (limit {RSS_LIMIT_MB})"
    return "a request folder was left behind" if "left in the demo's folder" in result.out else None


def nothing_left(env, folder: Path, result) -> str | None:
    """After the server process ended: no file in gradio's folder, no demo folder."""
    lines = [json.loads(line) for line in result.out.splitlines() if line.startswith("{")]
    if not lines:
        return "it did not report its folders"
    if not lines[0]["files_while_serving"]:
        return "nothing was served, so nothing was checked"
    left = [p for p in (folder / "gradio").rglob("*") if p.is_file()]
    if left:
        return f"{len(left)} files stayed in gradio's folder after exit, e.g. {left[0].name}"
    return f"the demo's folder {lines[0]['workdir']} stayed after exit" if Path(lines[0]["workdir"]).exists() else None


def limits_case(name: str, words: str | None, status: int = 2, upscale: bool = False):
    """A drill case for one request of the table in `request` (or "exit"), run as its own process."""
    from benchmarks.hostile_env import Case

    def argv(env, folder: Path) -> list[str]:
        extra = [str(up_run(env))] if upscale else []
        return ["python", str(Path(__file__).resolve()), name, str(env.run), str(folder), *extra]
    check = nothing_left if name == "exit" else bounded_memory
    return Case("demo limits", name, argv, words, status, check=check, quick=False, timeout=600)


def port_case(flags: list[str], words: str):
    """`python -m diffusion.demos.app` refusing --port/--host before it loads a model (the checkpoint does not exist)."""
    from benchmarks.hostile_env import Case

    def argv(env, folder: Path) -> list[str]:
        return ["python", "-m", "diffusion.demos.app", "--checkpoint", str(folder / "nowhere"), *flags]
    return Case("demo limits", "app " + " ".join(flags), argv, words, quick=False, timeout=120)
