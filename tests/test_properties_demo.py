"""Generated demo requests (diffusion/demos/limits.py, app.py): any JSON value where the page sends a
number, a class or a flag, and editor payloads of any image size, mode and layer count. The contract:
a valid result with its invariants, or one clear message (gr.Error holding a UserError's words); never
another exception, never an image decoded past the bounds. The handlers are called in-process through
their components' preprocess, as gradio calls them (benchmarks/hostile_demo_limits.call_handler).
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

gr = pytest.importorskip("gradio")
from PIL import Image  # noqa: E402

from benchmarks.hostile_demo_limits import INPAINT, call_handler, file_data, generate_with  # noqa: E402
from benchmarks.hostile_env import png_header  # noqa: E402
from diffusion.demos import app as demo_app  # noqa: E402
from diffusion.demos import backend as B  # noqa: E402
from diffusion.demos import limits as L  # noqa: E402
from diffusion.errors import UserError  # noqa: E402

JUNK = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=8), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
CLASS_NAMES = ["red circle", "green circle", "blue circle", "yellow circle", "red square", "green square",
               "blue square", "yellow square", "red triangle", "green triangle", "blue triangle", "yellow triangle"]
CLASSES = st.one_of(st.integers(-3, 14), st.integers(-2, 13).map(str), st.integers(0, 11).map(float),
                    st.sampled_from(CLASS_NAMES), st.integers(0, 11).map(lambda i: f"{i}: {CLASS_NAMES[i]}"),
                    st.sampled_from(["any", "", "purple", "4.5", "nan"]), JUNK)


@pytest.fixture(scope="module")
def demo(tiny_run, tmp_path_factory):
    old = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio-cache"))
    try:
        models = B.load_models(B.DemoPaths(str(tiny_run), device="cpu"))
        yield models, demo_app.build_app(models)
    finally:
        os.environ.pop("GRADIO_TEMP_DIR", None) if old is None else os.environ.__setitem__("GRADIO_TEMP_DIR", old)


def answer(models, demo, api: str, values: list):
    """The handler's result, or the page's message (asserted to be one clear line); no request folder stays."""
    try:
        result = call_handler(demo, api, *values)
    except gr.Error as err:
        message = str(err.message)
        assert message and "\n" not in message and not message.startswith("unexpected error"), message
        result = None, message
    assert [p.name for p in models.workdir.iterdir() if p.name != "examples"] == []
    return result


def message_of(result) -> str | None:
    message = result[1] if isinstance(result, tuple) and len(result) == 2 and result[0] is None else None
    event("a result" if message is None else f"a message: {' '.join(message.split()[:4])}")
    return message


VALID = {"label": st.one_of(st.integers(0, 11), st.sampled_from(CLASS_NAMES)), "scale": st.floats(0, 5),
         "steps": st.integers(1, 2), "seed": st.integers(0, 2**62), "count": st.integers(1, 2),
         "rescale": st.floats(0, 1), "sampler": st.sampled_from(["ddim", "ddpm"])}
HOSTILE = {**{name: JUNK for name in VALID}, "label": CLASSES}


@st.composite
def generate_values(draw) -> dict:
    """Valid values, but for up to two fields (none, a third of the time) drawn from anything JSON holds."""
    hostile = draw(st.sets(st.sampled_from(sorted(VALID)), max_size=2))
    return {name: draw(HOSTILE[name] if name in hostile else VALID[name]) for name in VALID}


@given(fields=generate_values())
def test_generate_takes_any_json_values_with_a_result_or_a_message(demo, fields):
    models, app = demo
    steps, count = fields["steps"], fields["count"]
    if not (type(steps) is int and 1 <= steps <= 2 and type(count) is int and 1 <= count <= 2):
        fields["label"] = 0  # "any class" (12 classes x count images) only for the cheap requests
    result = answer(models, app, "on_generate", generate_with(**fields))
    if message_of(result) is None:
        gallery, files, command = result
        assert files and all(Path(f).is_file() for f in files) and len(gallery) == len(files)
        words = command.split()
        assert words[words.index("--steps") + 1] == str(int(float(steps)))
        assert words[words.index("--seed") + 1] == str(int(float(fields["seed"])))


@given(value=st.one_of(JUNK, st.sampled_from(["3", " 2.5 ", "1e3", "-0", "inf", "-nan", "0x10", "1_000"])),
       low=st.one_of(st.none(), st.floats(-10, 10)))
def test_numbers_are_finite_and_in_range_or_refused_in_one_line(value, low):
    try:
        number = L.number(value, "the field", low=low, blank=None)
    except UserError as err:
        assert str(err).startswith("the field") and "\n" not in str(err)
        return
    if number is not None:
        assert math.isfinite(number) and (low is None or number >= low) and not isinstance(value, (bool, list, dict))
    try:
        steps = L.whole(value, "steps", 1, 100, blank=None)
    except UserError as err:
        assert "steps must be a whole number from 1 to 100" in str(err) or "steps is missing" in str(err)
        return
    assert steps is None or (isinstance(steps, int) and 1 <= steps <= 100 and steps == float(value))


@given(label=CLASSES)
def test_a_class_is_one_index_whichever_form_it_comes_in(label):
    try:
        index = L.class_label(label, CLASS_NAMES)
    except UserError as err:
        assert "class" in str(err) and "\n" not in str(err)
        return
    assert index is None or 0 <= index < len(CLASS_NAMES)
    if index is not None:  # the same class in its other forms gives the same index
        for form in (index, str(index), float(index), CLASS_NAMES[index], f"{index}: {CLASS_NAMES[index]}"):
            assert L.class_label(form, CLASS_NAMES) == index


MODES = ["RGB", "RGBA", "L", "LA", "P", "1", "I;16"]
SMALL = st.integers(1, 48)
SIDES = st.one_of(SMALL, SMALL, SMALL, st.sampled_from([4096, 4097, 13000, 60000]))


@st.composite
def editor_pictures(draw):
    """(background size, mode), [(layer size, painted?)], composite? ; sizes over 64 pixels are written
    as headers only (no pixels), which a decoder would fail on and a header check refuses."""
    size = (draw(SIDES), draw(SIDES))
    count = draw(st.one_of(st.just(1), st.integers(0, L.MAX_LAYERS + 3)))
    layer_size = st.one_of(st.just(size), st.just(size), st.tuples(SIDES, SIDES))
    layers = [(draw(layer_size), draw(st.booleans())) for _ in range(count)]
    return (size, draw(st.sampled_from(MODES))), layers, draw(st.booleans())


def write(folder: Path, name: str, size: tuple[int, int], mode: str = "RGBA", painted: bool = False) -> str:
    path = folder / f"{name}.png"
    if max(size) > 64:
        path.write_bytes(png_header(*size))
    else:
        picture = Image.new(mode, size)
        if painted:
            picture.paste((255, 0, 0, 255), (0, 0, max(1, size[0] // 2), size[1]))
        picture.save(path)
    return str(path)


@given(pictures=editor_pictures())
def test_inpaint_takes_any_editor_payload_with_a_result_or_a_message(demo, pictures):
    models, app = demo
    (size, mode), layers, composite = pictures
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        payload = {"background": file_data(write(folder, "background", size, mode)),
                   "layers": [file_data(write(folder, f"layer{i}", s, "RGBA", p)) for i, (s, p) in enumerate(layers)],
                   "composite": file_data(write(folder, "composite", size)) if composite else None}
        result = answer(models, app, "on_inpaint", [payload, *INPAINT[:5], 1, *INPAINT[6:]])
    sides = [size, *[s for s, _ in layers]] + ([size] if composite else [])
    message = message_of(result)
    if len(layers) > L.MAX_LAYERS:
        assert message and "brush layers: at most" in message
    elif any(max(s) > L.MAX_SIDE for s in sides):
        assert message and ("pixels a side" in message or "million pixels" in message), message
    elif message is None:  # in-painted: every layer was the image's size and something was painted
        strip, files, command = result
        assert all(s == size for s, _ in layers) and any(p for _, p in layers)
        assert {Path(f).name for f in files} == {"sample_0000.png", "image.png", "mask.png"}
        assert "--image image.png --mask mask.png" in command


@given(events=st.lists(st.tuples(st.sampled_from(["10.0.0.1", "10.0.0.2", "::1"]), st.floats(0, 5),
                                 st.integers(-5, 400)), max_size=40),
       per_minute=st.integers(1, 4), space=st.integers(0, 1000))
def test_uploads_take_at_most_the_rate_per_address_and_never_pass_the_space(events, per_minute, space, tmp_path_factory):
    """Generated upload sequences (address, seconds since the last upload, bytes) against an exact oracle: an
    upload is taken iff its address took fewer than UPLOADS_PER_MINUTE in the trailing 60 s and the folder
    plus its bytes stay within UPLOAD_SPACE; every refusal is one line saying what to do."""
    folder = tmp_path_factory.mktemp("uploads")
    saved = L.UPLOADS_PER_MINUTE, L.UPLOAD_SPACE
    L.UPLOADS_PER_MINUTE, L.UPLOAD_SPACE = per_minute, space
    L.RECENT_UPLOADS.clear()
    try:
        now, taken, stored = 1000.0, [], 0
        for index, (client, gap, size) in enumerate(events):
            now += gap * 20
            window = [t for c, t in taken if c == client and now - t < 60]
            expected = len(window) < per_minute and stored + max(size, 0) <= space
            refusal = L.upload_refusal(client, size, folder, now=now)
            assert (refusal is None) == expected, (index, refusal)
            if refusal is None:
                taken.append((client, now))
                if size > 0:  # what gradio then stores
                    (folder / f"{index}.bin").write_bytes(b"\0" * size)
                    stored += size
            else:
                assert "\n" not in refusal and ("wait a minute" in refusal or "upload again then" in refusal), refusal
        assert len(L.RECENT_UPLOADS) <= 3
    finally:
        L.UPLOADS_PER_MINUTE, L.UPLOAD_SPACE = saved
        L.RECENT_UPLOADS.clear()
