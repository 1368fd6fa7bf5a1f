"""The demo's bounds (diffusion/demos/limits.py) against a hostile client of its HTTP API, as an outside
tester met them: brush layers of 13000x13000 pixels, values of the wrong type, files left behind, a bad
--port. The app is served on a free port and driven through gradio's own HTTP routes (upload, then
/gradio_api/call/NAME), so gradio's preprocessing runs exactly as for a browser or a script.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("gradio")
import httpx  # noqa: E402  (gradio's dependency)

from benchmarks.hostile_demo_limits import (  # noqa: E402
    BASE, HUGE, INPAINT, RSS_LIMIT_MB, UPSCALE, blank_png, file_data, generate_with, peak_rss_growth_mb,
)
from diffusion.demos import app as demo_app  # noqa: E402
from diffusion.demos import backend as B  # noqa: E402
from diffusion.demos import limits as L  # noqa: E402


@dataclass
class Served:
    models: B.Models
    demo: object
    client: httpx.Client
    cache: Path  # gradio's upload and served-file folder (GRADIO_TEMP_DIR)
    exit_index: int  # limits.EXIT_TASKS registered from here on are this app's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_run, up_run, tmp_path_factory):
    cache = tmp_path_factory.mktemp("gradio-cache")
    old = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(cache)
    try:
        exit_index = len(L.EXIT_TASKS)
        models = B.load_models(B.DemoPaths(str(tiny_run), upsampler=str(up_run), device="cpu"))
        demo = demo_app.build_app(models)
        port = free_port()
        demo_app.launch(demo, "127.0.0.1", port, block=False)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            yield Served(models, demo, client, cache, exit_index)
        demo.close()
    finally:
        if old is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = old


def upload(served: Served, path: Path) -> str:
    with open(path, "rb") as f:
        response = served.client.post("/gradio_api/upload", files={"files": (path.name, f, "image/png")})
    response.raise_for_status()
    return response.json()[0]


def call(served: Served, api: str, data: list) -> tuple[str, object]:
    """(the last event's name, its data) of one request through gradio's HTTP API; `data` may hold NaN
    (sent as the bare NaN that Python's and JavaScript's JSON writers produce)."""
    body = json.dumps({"data": data}, allow_nan=True)
    response = served.client.post(f"/gradio_api/call/{api}", content=body, headers={"content-type": "application/json"})
    response.raise_for_status()
    stream = served.client.get(f"/gradio_api/call/{api}/{response.json()['event_id']}").text
    events = [line[len("event: "):] for line in stream.splitlines() if line.startswith("event: ")]
    datas = [line[len("data: "):] for line in stream.splitlines() if line.startswith("data: ")]
    return events[-1], json.loads(datas[-1]) if datas[-1] != "null" else None


def refused(served: Served, api: str, data: list, words: str, capfd) -> str:
    """The request is answered with a message holding `words`, and the server logs no traceback."""
    capfd.readouterr()
    event, payload = call(served, api, data)
    assert event == "error" and payload and payload.get("error"), (event, payload)
    message = payload["error"]
    assert words in message and "\n" not in message, message
    assert "Traceback" not in capfd.readouterr().err
    return message


def editor(background: str, layers: list[str]) -> dict:
    return {"background": file_data(background), "layers": [file_data(p) for p in layers], "composite": None}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, Path]:
    from PIL import Image

    folder = tmp_path_factory.mktemp("pictures")
    Image.new("RGB", (64, 64), (90, 90, 90)).save(folder / "small.png")
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((255, 0, 0, 255), (0, 16, 64, 40))
    layer.save(folder / "layer.png")
    return {"small": folder / "small.png", "layer": folder / "layer.png",
            "huge": blank_png(folder / "huge.png", HUGE, HUGE), "big": blank_png(folder / "big.png", 4096, 4096)}


@pytest.mark.parametrize("layers, words", [
    (["huge"] * 5, "5 brush layers: at most 4"),  # the tester's request
    (["huge"], "13000x13000: at most 4096 pixels a side"),
    (["big"] * 4, "million pixels together"),  # each within the side limit, too many pixels in all
])
def test_hostile_brush_layers_are_refused_from_their_headers_in_bounded_memory(served, pictures, layers, words, capfd):
    background = upload(served, pictures["small"])
    sent = [upload(served, pictures[name]) for name in layers]
    growth, message = peak_rss_growth_mb(
        lambda: refused(served, "on_inpaint", [editor(background, sent), *INPAINT], words, capfd))
    assert not isinstance(message, BaseException), message
    assert growth < RSS_LIMIT_MB, f"the refused request grew the server's memory by {growth:.0f} MB"
    assert {background, *sent} <= served.demo.upload_file_set  # deleted on delete_cache's schedule and at exit


def test_a_huge_upload_and_a_huge_cascade_source_are_refused_before_decoding(served, pictures, capfd):
    growth, _ = peak_rss_growth_mb(lambda: refused(served, "on_upscale", [file_data(upload(served, pictures["huge"])),
                                                                          *UPSCALE], "at most 4096 pixels a side", capfd))
    assert growth < RSS_LIMIT_MB
    refused(served, "on_cascade", [[file_data(upload(served, pictures["huge"]))]], "at most 4096 pixels a side", capfd)


@pytest.mark.parametrize("field, value, words", [
    ("steps", float("nan"), "steps must be a whole number"),  # the tester's cases
    ("scale", "abc", "the guidance scale: expected a number, got 'abc'"),
    ("steps", "abc", "steps must be a whole number"),
    ("steps", 2.5, "steps must be a whole number"),
    ("scale", float("inf"), "the guidance scale must be a finite number"),
    ("scale", [3], "the guidance scale must be a number"),
    ("seed", True, "the seed must be a whole number"),
    ("count", 0, "the number of images must be a whole number from 1"),
    ("label", "purple", "'purple' is not one of this run's classes"),
    ("label", 99, "not one of this run's classes 0..11"),
    ("label", {"a": 1}, "the class must be a class number or name"),
    ("sampler", 5, "the sampler must be one of"),
    ("prompt", "a" * 5000, "at most 1000"),
    ("rescale", 2, "the CFG rescale must be from 0 to 1"),
])
def test_api_values_of_the_wrong_type_get_a_message_and_no_traceback(served, field, value, words, capfd):
    refused(served, "on_generate", generate_with(**{field: value}), words, capfd)


@pytest.mark.parametrize("label", [4, "4", 4.0, "red square", "4: red square"])
def test_the_class_is_read_the_same_in_every_form_a_client_sends(served, label):
    event, payload = call(served, "on_generate", generate_with(label=label))
    assert event == "complete", payload
    assert "--class-label 4 " in payload[2]  # the reproduce command: class 4, whichever form was sent
    assert len(payload[1]) == 1 and payload[1][0]["orig_name"] == "sample_0000.png"


def test_payloads_gradio_cannot_read_get_a_message(served, capfd):
    refused(served, "on_inpaint", [{"background": 5, "layers": "x"}, *INPAINT], "the request's values cannot be read", capfd)
    refused(served, "on_upscale", [file_data("/etc/hostname"), *UPSCALE], "the request's values cannot be read", capfd)
    refused(served, "on_upscale", [file_data(upload(served, Path(__file__))), *UPSCALE], "is not an image PIL can read", capfd)


def test_an_upload_that_is_no_image_gets_a_message(served, tmp_path, capfd):
    (tmp_path / "notes.png").write_text("not an image")
    refused(served, "on_upscale", [file_data(upload(served, tmp_path / "notes.png")), *UPSCALE],
            "notes.png is not an image PIL can read", capfd)
    refused(served, "on_inpaint", [editor(upload(served, tmp_path / "notes.png"), []), *INPAINT],
            "notes.png is not an image PIL can read", capfd)


def test_the_editor_takes_no_blobs(served):
    """gradio's ImageEditor.accept_blobs keeps whatever bytes a client sends in memory; this page has none."""
    editor_block = next(b for b in served.demo.blocks.values() if b.get_block_name() == "imageeditor")
    with pytest.raises(Exception, match="does not take image blobs"):
        editor_block.accept_blobs({"data": {"type": "layer", "index": 10**9, "id": "x", "file": b""}, "files": []})


def test_the_server_is_bounded_where_gradio_bounds_it(served, tmp_path):
    assert served.demo.delete_cache == L.DELETE_CACHE
    assert served.demo._queue.max_size == L.QUEUE_SIZE  # noqa: SLF001
    sampling = [f for f in served.demo.fns.values() if f.api_name in ("on_generate", "on_inpaint", "on_upscale")]
    assert len(sampling) == 3 and {(f.concurrency_id, f.concurrency_limit) for f in sampling} == {("models", L.CONCURRENCY)}
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (11 * 2**20))  # over max_file_size (10 MB)
    with open(big, "rb") as f:
        response = served.client.post("/gradio_api/upload", files={"files": ("big.png", f, "image/png")})
    assert response.status_code == 413 or "maximum" in response.text.lower(), response.text[:200]


def test_uploads_are_limited_per_address_and_in_total_space(served, pictures, monkeypatch):
    """gradio's /upload stores files before any handler runs: a client looping on it is answered 429 after
    UPLOADS_PER_MINUTE, and nobody can fill the disk past UPLOAD_SPACE (the demo's own middleware)."""
    monkeypatch.setattr(L, "UPLOADS_PER_MINUTE", 3)
    L.RECENT_UPLOADS.clear()
    try:
        for _ in range(3):
            upload(served, pictures["small"])
        with open(pictures["small"], "rb") as f:
            refused = served.client.post("/gradio_api/upload", files={"files": ("a.png", f, "image/png")})
        assert refused.status_code == 429 and "too many uploads" in refused.text, refused.text
        L.RECENT_UPLOADS.clear()
        monkeypatch.setattr(L, "UPLOAD_SPACE", L.folder_bytes(served.cache) + 10)
        with open(pictures["small"], "rb") as f:
            full = served.client.post("/gradio_api/upload", files={"files": ("a.png", f, "image/png")})
        assert full.status_code == 429 and "upload space" in full.text, full.text
        assert served.client.get("/gradio_api/info").status_code == 200  # other routes are untouched
    finally:
        L.RECENT_UPLOADS.clear()


def test_behind_a_reverse_proxy_on_this_machine_uploads_are_counted_per_forwarded_client(served, pictures, monkeypatch):
    """A proxy on this machine (a connection from 127.0.0.1) names each client in X-Forwarded-For; uvicorn, which
    gradio serves with, trusts that header from 127.0.0.1 only (FORWARDED_ALLOW_IPS for a proxy elsewhere), so
    two clients behind one proxy get a budget each rather than sharing the proxy's."""
    monkeypatch.setattr(L, "UPLOADS_PER_MINUTE", 2)
    L.RECENT_UPLOADS.clear()

    def post(forwarded_for: str) -> int:
        with open(pictures["small"], "rb") as f:
            return served.client.post("/gradio_api/upload", files={"files": ("a.png", f, "image/png")},
                                      headers={"X-Forwarded-For": forwarded_for}).status_code

    try:
        assert [post("203.0.113.5") for _ in range(3)] == [200, 200, 429]
        assert post("203.0.113.6") == 200  # another client behind the same proxy
        assert {"203.0.113.5", "203.0.113.6"} <= set(L.RECENT_UPLOADS)
    finally:
        L.RECENT_UPLOADS.clear()


def test_request_folders_go_after_each_response_and_what_is_served_is_on_the_cache_schedule(served, pictures):
    background, layer, low = (upload(served, pictures[n]) for n in ("small", "layer", "small"))
    for api, data in [("on_generate", BASE), ("on_inpaint", [editor(background, [layer]), *INPAINT]),
                      ("on_upscale", [file_data(low), *UPSCALE])]:
        event, payload = call(served, api, data)
        assert event == "complete", payload
        assert [p.name for p in served.models.workdir.iterdir()] == ["examples"], f"{api} left its request folder"
    tracked = set().union(*served.demo.temp_file_sets)
    kept = [str(p) for p in served.cache.rglob("*") if p.is_file()]
    assert kept and not [p for p in kept if p not in tracked], "files in gradio's cache that delete_cache would not delete"


def test_the_demo_checks_port_and_host_before_it_loads_a_model(monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("the models were loaded before --port/--host were checked")

    monkeypatch.setattr(B, "load_models", no_loading)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        for flags, words in [(["--port", "99999"], "--port must be a whole number from 1 to 65535, got 99999"),
                             (["--port", "0"], "--port"), (["--port", "-1"], "--port"),
                             (["--host", "not a host!"], "--host must be an address"),
                             (["--host", "10.255.255.1"], "pass a --host this machine has"),
                             (["--port", busy], "another program uses it: pass another --port")]:
            with pytest.raises(SystemExit) as stop:
                demo_app.main(["--checkpoint", "nowhere", *flags])
            err = capsys.readouterr().err
            assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and words in err, err


def test_at_exit_the_uploads_served_files_and_the_demo_folder_are_deleted(served, pictures):
    """Last in this module: runs this app's exit tasks, as the interpreter does when the server ends."""
    upload(served, pictures["small"])
    assert call(served, "on_generate", BASE)[0] == "complete"
    assert any(p.is_file() for p in served.cache.rglob("*"))
    L.run_exit_tasks(since=served.exit_index)
    assert not [p for p in served.cache.rglob("*") if p.is_file()]
    assert not served.models.workdir.exists()
