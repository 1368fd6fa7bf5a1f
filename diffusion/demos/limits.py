"""Every bound the browser demo puts on a request, in one place: image sizes read from file headers
before anything is decoded, brush-layer counts, upload sizes, the queue, how long files are kept,
and the page's and the HTTP API's values checked the way the command lines check them.

A client of the demo's HTTP API can send any JSON where the page sends a number, a class or an
image, and any file it uploaded where the page sends a brush layer. Each such value is checked here
and refused with a `UserError` naming the field and the fix (the page shows it as a message); no
value reaches a decoder, the sampler or the disk unbounded. Imports neither torch nor gradio (the
few gradio helpers import it when called), so the checks are cheap to test.
"""
from __future__ import annotations

import argparse
import atexit
import errno
import functools
import html
import os
import math
import re
import shutil
import socket
import time
from collections import deque
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from PIL import Image

from ..cli.args import check_text, finite_float
from ..data.common import IMAGE_ERRORS
from ..errors import UserError, first_line, preview

# -- the bounds (docs/demo.md, "Limits") ------------------------------------------------------------------------
MAX_FILE_SIZE = "10mb"  # one uploaded file (gradio's launch(max_file_size=...)): refused by the upload itself
MAX_SIDE = 4096  # pixels a side of any image a request carries (upload, editor background, layer, composite)
MAX_REQUEST_PIXELS = 3 * MAX_SIDE * MAX_SIDE  # all images of one request together: background + layer + composite
MAX_LAYERS = 4  # brush layers in one in-paint request (the page sends one)
MAX_TEXT = 1000  # characters of a prompt or negative prompt
QUEUE_SIZE = 16  # requests waiting; more are refused by gradio ("queue is full")
CONCURRENCY = 1  # requests sampling at once (Generate, In-paint and Upscale share the models)
DELETE_CACHE = (60, 300)  # gradio deletes uploads and served results older than 300 s, every 60 s, and all at exit
UPLOADS_PER_MINUTE = 60  # uploads one client address may send in any 60 s; more are answered 429
UPLOAD_SPACE = 2**30  # bytes gradio's folder may hold (all clients): an upload that would pass it is answered 429
ANY_CLASS = -1  # the class dropdown's "any (cycle through the classes)"


# -- values from the page or the API ------------------------------------------------------------------------------

def number(value: Any, what: str, low: float | None = None, high: float | None = None,
           blank: float | None | str = "refuse") -> float | None:
    """A finite number in [low, high] from a JSON number or a numeric string, as the command lines read
    one (cli.args.finite_float); None or "" is `blank` (refused when blank is "refuse")."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if blank == "refuse":
            raise UserError(f"{what} is missing: enter a number")
        return blank  # type: ignore[return-value]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{what} must be a number, got {preview(value)}")
    try:
        result = finite_float(str(value)) if isinstance(value, str) else float(value)
    except (argparse.ArgumentTypeError, OverflowError) as err:
        raise UserError(f"{what}: {err}") from None
    if not math.isfinite(result):
        raise UserError(f"{what} must be a finite number, got {preview(value)}")
    if (low is not None and result < low) or (high is not None and result > high):
        span = f"from {low:g} to {high:g}" if low is not None and high is not None else (
            f">= {low:g}" if low is not None else f"<= {high:g}")
        raise UserError(f"{what} must be {span}, got {preview(value)}")
    return result


def whole(value: Any, what: str, low: int = 0, high: int = 2**62, blank: int | None | str = "refuse") -> int | None:
    """A whole number in [low, high] (a page or API can send NaN, 1e30, 2.5, "abc" or a list)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return number(value, what, blank=blank)  # type: ignore[return-value]
    try:
        result = number(value, what)
    except UserError:
        result = math.nan
    if not (result == result and result == int(result) and low <= result <= high):  # noqa: PLR0124 - NaN check
        raise UserError(f"{what} must be a whole number from {low} to {high}, got {preview(value)}")
    return int(result)


def text(value: Any, what: str, limit: int = MAX_TEXT) -> str | None:
    """A prompt-like text field: a string (None or "" is blank) of at most `limit` characters, UTF-8."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise UserError(f"{what} must be text, got {preview(value)}")
    if len(value) > limit:
        raise UserError(f"{what} is {len(value)} characters long: at most {limit}")
    check_text(what, value)
    return value


def choice(value: Any, what: str, choices: Sequence[str]) -> str:
    """One of `choices` (a sampler, an in-painting method)."""
    if not isinstance(value, str) or value not in choices:
        raise UserError(f"{what} must be one of {', '.join(choices)}, got {preview(value)}")
    return value


def flag(value: Any, what: str) -> bool:
    """A checkbox: true/false (also 1/0 and the strings "true"/"false")."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise UserError(f"{what} must be true or false, got {preview(value)}")


def class_label(value: Any, names: Sequence[str], allow_any: bool = True) -> int | None:
    """The class dropdown's value, the same way whichever form a client sends: 4, 4.0, "4", "red square"
    or "4: red square" (as the dropdown shows it); -1, "any" or None mean any class (None returned)."""
    if value is None or value == "" or (isinstance(value, str) and value.strip().lower().startswith("any")):
        index = ANY_CLASS
    elif isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"the class must be a class number or name, got {preview(value)}")
    elif isinstance(value, str) and not _is_number(value):
        wanted = value.strip().lower()
        head, _, tail = wanted.partition(":")
        found = [i for i, name in enumerate(names)
                 if wanted in (name.lower(), f"{i}: {name.lower()}") or (tail and head.strip() == str(i) and tail.strip() == name.lower())]
        if not found:
            raise UserError(f"the class {preview(value)} is not one of this run's classes: "
                            + (", ".join(f"{i}: {n}" for i, n in enumerate(names)) or "it has none"))
        index = found[0]
    else:
        index = whole(value, "the class", ANY_CLASS)
    if index == ANY_CLASS:
        if not allow_any:
            raise UserError("pick a class: this model makes one image a request")
        return None
    if not names:
        raise UserError(f"this run has no classes: leave the class blank (got {preview(value)})")
    if index >= len(names):
        raise UserError(f"the class {preview(value)} is not one of this run's classes 0..{len(names) - 1}")
    return index


def _is_number(text_value: str) -> bool:
    try:
        float(text_value)
    except ValueError:
        return False
    return True


# -- images: sizes from the header, before decoding ------------------------------------------------------------

def header_size(path: str | Path, what: str = "image") -> tuple[int, int]:
    """(width, height) from an image file's header; PIL's lazy open decodes no pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked next
            with Image.open(path) as picture:
                return picture.size
    except FileNotFoundError:
        raise UserError(f"the {what} is gone from the server (files are kept {DELETE_CACHE[1] // 60} minutes): "
                        "upload or generate it again") from None
    except IMAGE_ERRORS as err:  # damaged, not an image, or a "decompression bomb" header
        bound = f"; images may have at most {MAX_SIDE} pixels a side" if isinstance(err, Image.DecompressionBombError) else ""
        raise UserError(f"the uploaded file {Path(path).name} is not an image PIL can read (PNG, JPEG, ...): "
                        f"it cannot be read as the {what} ({first_line(err)}){bound}") from None


class PixelBudget:
    """The images of one request: each at most MAX_SIDE a side, all together at most MAX_REQUEST_PIXELS."""

    def __init__(self, total: int = MAX_REQUEST_PIXELS):
        self.left = total

    def take(self, size: tuple[int, int], what: str = "image") -> tuple[int, int]:
        width, height = size
        if max(width, height) > MAX_SIDE:
            raise UserError(f"the {what} is {width}x{height}: at most {MAX_SIDE} pixels a side")
        self.left -= width * height
        if self.left < 0:
            raise UserError(f"the request's images hold more than {MAX_REQUEST_PIXELS / 1e6:.0f} million pixels "
                            f"together (the {what} is {width}x{height}): send fewer or smaller images")
        return size

    def file(self, path: str | Path, what: str = "image") -> tuple[int, int]:
        return self.take(header_size(path, what), what)


def check_editor_files(background: str | None, layers: Sequence[str | None], composite: str | None) -> None:
    """An in-paint request's files, refused from their headers before any is decoded: at most
    MAX_LAYERS layers, each image at most MAX_SIDE a side, all together within the pixel budget."""
    if len(layers) > MAX_LAYERS:
        raise UserError(f"the request has {len(layers)} brush layers: at most {MAX_LAYERS}")
    budget = PixelBudget()
    for what, path in [("image", background), *[(f"brush layer {i + 1}", p) for i, p in enumerate(layers)],
                       ("composite", composite)]:
        if path is not None:
            budget.file(path, what)


# -- the server: port, host, and the files it writes --------------------------------------------------------------

HOST_NAME = re.compile(r"[0-9A-Fa-f:.]{2,45}|(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


def check_listen(host: Any, port: Any) -> tuple[str, int]:
    """--host and --port checked before any model loads: a port in 1..65535, a host this machine has,
    and that the two can be listened on now (not taken by another server)."""
    port = whole(port, "--port", 1, 65535)
    if not isinstance(host, str) or not HOST_NAME.fullmatch(host):
        raise UserError(f"--host must be an address or name of this machine (127.0.0.1, 0.0.0.0, ::, localhost), "
                        f"got {preview(host)}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as err:
        raise UserError(f"--host {preview(host)} is not an address of this machine ({err}): use 127.0.0.1 "
                        "(this machine only) or 0.0.0.0 (every network)") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address[:2] if family == socket.AF_INET else address)
        except OSError as err:
            fix = {errno.EADDRINUSE: "another program uses it: pass another --port",
                   errno.EACCES: "ports below 1024 need root: pass a --port from 1024 to 65535"}.get(
                err.errno, "pass a --host this machine has (127.0.0.1, 0.0.0.0)")
            raise UserError(f"cannot listen on {host} port {port} ({err.strerror or err}): {fix}") from None
    return host, port


def remove_tree(path: str | Path | None) -> None:
    """Delete a request folder (or the demo's temp root); a missing one is fine."""
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


EXIT_TASKS: list[Callable[[], None]] = []  # run at exit, newest first (run_exit_tasks)


def at_exit(task: Callable[[], None]) -> None:
    """Run `task` when the process ends (atexit: a finished, Ctrl-C'd or SIGTERM'd server alike)."""
    if not EXIT_TASKS:
        atexit.register(run_exit_tasks)
    EXIT_TASKS.append(task)


def run_exit_tasks(since: int = 0) -> None:
    """The exit tasks registered since the `since`-th, newest first (atexit runs them all; tests run theirs)."""
    while len(EXIT_TASKS) > since:
        task = EXIT_TASKS.pop()
        try:
            task()
        except Exception:  # noqa: BLE001 - best effort while the interpreter ends
            pass


def remove_at_exit(path: Path) -> None:
    """The demo's temp root goes when the process ends, however the server stopped."""
    at_exit(functools.partial(remove_tree, path))


# -- gradio: the payload checks, before gradio decodes anything -------------------------------------------------

def shown(err: UserError, gr) -> Exception:
    """A UserError as the page's message (escaped: messages quote client values; no traceback in the log)."""
    return gr.Error(html.escape(str(err), quote=False), print_exception=False)


def raw_values(component, gr):
    """Let a value component (number, slider, dropdown, radio, checkbox, textbox) pass the client's JSON
    value to the handler unchanged: gradio's own preprocess rounds NaN, floats "abc" or rejects "4" for 4
    with an error but no message; the handler checks every value with the functions above instead."""
    component.preprocess = lambda payload: payload
    return component


def file_paths(component):
    """A gr.File input passes its files' paths (the handlers read their headers before decoding): gradio's
    own preprocess also leaves an empty temporary file in its cache for every request, which its
    delete_cache never deletes."""
    def preprocess(payload):
        if payload is None:
            return None
        items = getattr(payload, "root", payload)
        return [str(item.path) for item in items] if isinstance(items, list) else str(items.path)

    component.preprocess = preprocess
    return component


def guard_files(component, gr, check: Callable[[Any], None] | None = None):
    """Check an upload component's files from their headers (`check` gets gradio's payload) before its
    preprocess decodes them, and make any decoding error a message in the page."""
    decode = component.preprocess

    @functools.wraps(decode)
    def preprocess(payload):
        try:
            if payload is not None and check is not None:
                check(payload)
            return decode(payload)
        except UserError as err:
            raise shown(err, gr) from None
        except gr.Error as err:  # gradio's own refusals (a file type): the message, without a traceback in the log
            raise shown(UserError(str(err.message)), gr) from None
        except IMAGE_ERRORS as err:
            raise shown(UserError(f"the uploaded image cannot be read: {first_line(err)}"), gr) from None

    component.preprocess = preprocess
    return component


def editor_files(payload) -> list[str | None]:
    """The files of gradio's EditorData: background, layers..., composite."""
    return [None if data is None else data.path for data in [payload.background, *(payload.layers or []), payload.composite]]


def editor_payload_check(payload) -> None:
    """gradio's EditorData (files the client uploaded) through check_editor_files."""
    paths = editor_files(payload)
    check_editor_files(paths[0], paths[1:-1], paths[-1])


def guard_editor(editor, gr):
    """An ImageEditor whose files are checked from their headers before gradio decodes them. (They stay
    until delete_cache's schedule: one upload can be the picture of several requests, or of two tabs.)"""
    return guard_files(no_blobs(editor, gr), gr, editor_payload_check)


def no_blobs(editor, gr):
    """The editor's `accept_blobs` server function (used only by editors with change events, which this
    page has none of) would keep any bytes a client sends in memory, and a large layer index allocates
    a list that long: refuse it."""
    def accept_blobs(data):
        raise gr.Error("this page does not take image blobs: send the files with the request", print_exception=False)
    accept_blobs._is_server_fn = True  # noqa: SLF001 - gradio's marker for component server functions
    editor.accept_blobs = accept_blobs
    return editor


def guard_inputs(demo, gr) -> None:
    """Every event's value inputs pass the client's JSON through (raw_values: the handlers check them), and
    errors gradio raises before any preprocess become messages (guard_payloads). Upload components are
    guarded where they are built (guard_files, guard_editor)."""
    value_types = (gr.Number, gr.Slider, gr.Dropdown, gr.Radio, gr.Checkbox, gr.Textbox)
    for block_fn in demo.fns.values():
        for block in block_fn.inputs:
            if isinstance(block, value_types):
                raw_values(block, gr)
            elif isinstance(block, gr.File):
                file_paths(block)
    guard_payloads(demo, gr)


def guard_payloads(demo, gr) -> None:
    """Errors gradio raises on a request's JSON before any component's preprocess (a value of the wrong
    shape for a file, a path that was never uploaded, too few values) become a message too."""
    preprocess_data = demo.preprocess_data

    @functools.wraps(preprocess_data)
    async def checked(block_fn, inputs, state, explicit_call=False):
        try:
            return await preprocess_data(block_fn, inputs, state, explicit_call)
        except gr.Error:
            raise
        except Exception as err:  # noqa: BLE001 - any client JSON gradio cannot take is the client's error
            raise shown(UserError(f"the request's values cannot be read: {first_line(err)}"), gr) from None

    demo.preprocess_data = checked


def delete_served_files(demo) -> None:
    """What gradio's delete_cache does at shutdown, also at exit (a server killed by Ctrl-C included), and
    the examples' copies too: nothing of this server stays in gradio's folder."""
    def delete() -> None:
        from gradio.route_utils import delete_files_created_by_app

        examples = [f for block in demo.blocks.values() for f in getattr(block, "keep_in_cache", ())]
        folders = {Path(f).parent for files in [*demo.temp_file_sets, examples] for f in files}
        delete_files_created_by_app(demo, None)  # what delete_cache deletes at a clean shutdown
        for file in examples:  # the examples' copies, which it keeps
            Path(file).unlink(missing_ok=True)
        for folder in folders:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    at_exit(delete)


def serve_copies(component, paths: Iterable[str | Path]) -> list[str]:
    """Copy a response's files into gradio's cache (which delete_cache empties) so that the request
    folder can be deleted before the response leaves."""
    return [component.move_resource_to_block_cache(str(p)) for p in paths]


# -- gradio's /upload route, which stores files before any handler runs -----------------------------------------
RECENT_UPLOADS: dict[str, deque] = {}  # client address -> the times of its uploads in the last minute


def folder_bytes(folder: str | Path) -> int:
    """Bytes of the files under `folder` (0 when it does not exist)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # deleted meanwhile by delete_cache
                pass
    return total


def upload_refusal(client: str, incoming: int, folder: str | Path, now: float | None = None) -> str | None:
    """Why an upload of `incoming` bytes from `client` is refused (None: take it, and count it): more than
    UPLOADS_PER_MINUTE from one address, or gradio's folder would pass UPLOAD_SPACE."""
    now = time.monotonic() if now is None else now
    for address in list(RECENT_UPLOADS):  # forget addresses quiet for a minute (the table stays small)
        times = RECENT_UPLOADS[address]
        while times and now - times[0] >= 60:
            times.popleft()
        if not times:
            del RECENT_UPLOADS[address]
    if len(RECENT_UPLOADS.get(client, ())) >= UPLOADS_PER_MINUTE:
        return f"too many uploads: at most {UPLOADS_PER_MINUTE} a minute from one address; wait a minute and upload again"
    if folder_bytes(folder) + max(incoming, 0) > UPLOAD_SPACE:
        return (f"the demo's upload space ({UPLOAD_SPACE // 2**20} MB) is full: uploads are deleted after "
                f"{DELETE_CACHE[1] // 60} minutes; upload again then")
    RECENT_UPLOADS.setdefault(client, deque()).append(now)
    return None


class UploadBudget:
    """ASGI middleware in front of gradio's POST .../upload: answers 429 with `upload_refusal`'s reason
    before the body is read. (max_file_size bounds one file; this bounds how many, and all of them.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path", "").rstrip("/").endswith("/upload"):
            from gradio.utils import get_upload_folder

            headers = dict(scope.get("headers") or ())
            length = headers.get(b"content-length", b"0")
            incoming = int(length) if length.isdigit() else 0
            client = (scope.get("client") or ("unknown", 0))[0]
            refusal = upload_refusal(client, incoming, get_upload_folder())
            if refusal:
                from starlette.responses import PlainTextResponse

                await PlainTextResponse(refusal, status_code=429)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def upload_middleware() -> list:
    """launch(app_kwargs={"middleware": ...}): the upload budget in front of every route."""
    from starlette.middleware import Middleware

    return [Middleware(UploadBudget)]
