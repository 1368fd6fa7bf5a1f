"""The demo app in a real headless Chromium: paint a mask with the mouse, in-paint, generate, upscale, download.

Needs the Debian `chromium` package (`apt-get install -y chromium`; Playwright drives it through
`executable_path`, no `playwright install`) and the `[dev]` extra (gradio, playwright).
"""
from __future__ import annotations

import importlib.util
import re
import shlex
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")


def missing() -> str | None:
    """Why the browser tests cannot run here, or None. Each test is then skipped with this reason."""
    if not CHROMIUM.exists():
        return (f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium as root, "
                "else with sudo) to run the browser tests")
    for module, why in (("gradio", "the demo needs gradio"), ("playwright", "the browser tests need playwright")):
        if importlib.util.find_spec(module) is None:
            return f'{why}: pip install -e ".[dev]"'
    return None


pytestmark = [pytest.mark.browser, pytest.mark.skipif(missing() is not None, reason=missing() or "")]
SIDE = 256  # uploaded image side; the tiny model works at 8x8, so one model pixel is 32x32 here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tiny_run, up_run):
    from diffusion.demos import app as demo_app
    from diffusion.demos import backend

    models = backend.load_models(backend.DemoPaths(str(tiny_run), upsampler=str(up_run), device="cpu"))
    demo = demo_app.build_app(models)
    port = free_port()
    demo_app.launch(demo, "127.0.0.1", port, block=False)
    yield models, f"http://127.0.0.1:{port}"
    demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright import sync_api

    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, app):
    page = browser.new_page(viewport={"width": 900, "height": 700}, accept_downloads=True)
    page.goto(app[1])
    page.wait_for_load_state("networkidle")
    yield page
    page.close()


def download(page, selector: str, path: Path) -> Path:
    with page.expect_download() as info:
        page.locator(selector).click()
    info.value.save_as(path)
    return path


def test_inpaint_a_brush_stroke(app, page, tmp_path):
    models, _ = app
    from diffusion.demos import backend

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    upload = Image.fromarray(small).resize((SIDE, SIDE), Image.NEAREST)
    upload.save(tmp_path / "photo.png")

    page.get_by_role("tab", name="In-paint").click()
    editor = page.locator("#inpaint-editor")
    placeholder = editor.get_by_text("Upload an image")
    with page.expect_file_chooser() as chooser:  # as a user does: click the drop zone, pick a file
        placeholder.click()
    chooser.value.set_files(str(tmp_path / "photo.png"))
    placeholder.wait_for(state="hidden", timeout=20_000)

    page.locator("#ip-button").click()  # nothing painted yet: a message in the page, not a traceback
    page.get_by_text("no mask painted").first.wait_for(timeout=20_000)

    editor.scroll_into_view_if_needed()
    box = editor.locator("canvas").first.bounding_box()  # the image is centred in it, shown at the zoom shown
    zoom = float(editor.get_by_text(re.compile(r"^\d+%$")).inner_text().rstrip("%")) / 100
    cx, cy, side = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, SIDE * zoom
    for dy in (-0.08, 0, 0.08):  # a band across the middle, drawn with the mouse (few events: software GL is slow)
        page.mouse.move(cx - 0.3 * side, cy + dy * side)
        page.mouse.down()
        page.mouse.move(cx + 0.3 * side, cy + dy * side, steps=2)
        page.mouse.up()
    page.locator("#ip-button").click()
    page.locator('#ip-files a[download="sample_0000.png"]').wait_for(timeout=60_000)
    result = np.asarray(Image.open(download(page, '#ip-files a[download="sample_0000.png"]', tmp_path / "r.png")))
    mask = np.asarray(Image.open(download(page, '#ip-files a[download="mask.png"]', tmp_path / "m.png")))

    # The painted band: the middle of the image, clear of the top and bottom quarters.
    rows = np.flatnonzero(mask.any(1))
    assert 32 < rows.min() < rows.max() < SIDE - 32 and mask.mean() > 0.1 * 255
    expected = np.asarray(backend.model_input(models, upload))
    assert result.shape == expected.shape == (8, 8, 3)
    kept = [0, 1, 6, 7]  # model rows the band does not touch
    np.testing.assert_array_equal(result[kept], expected[kept])
    painted = result[3:5, 2:6].astype(int) - expected[3:5, 2:6]
    assert np.abs(painted).max() > 0, "the painted region was not regenerated"
    assert "--image image.png --mask mask.png" in page.locator("#ip-command textarea").input_value()


def test_generate_a_class_and_reproduce_it_with_sample_py(app, page, tmp_path):
    from diffusion.cli.sample import main as sample_main

    page.locator("#gen-class input").click()
    page.get_by_role("option", name="2: blue circle").click()
    page.locator("#gen-seed input").fill("7")
    count = page.locator("#gen-count input[type=number]")
    count.fill("2")
    count.press("Tab")
    page.locator("#gen-button").click()
    page.locator('#gen-files a[download="sample_0001.png"]').wait_for(timeout=60_000)
    files = [download(page, f'#gen-files a[download="sample_000{i}.png"]', tmp_path / f"s{i}.png") for i in range(2)]

    for i, path in enumerate(files):
        meta = Image.open(path).text
        assert meta["label"] == "2" and meta["class_name"] == "blue circle" and meta["seed"] == str(7 + i)
        assert meta["sampler"] == "ddim" and meta["steps"] == "3" and meta["guidance_scale"] == "3.0"
        assert meta["checkpoint"].endswith("step-000004")

    commands = page.locator("#gen-command textarea").input_value().splitlines()
    alone = [c for c in commands if c.startswith("python sample.py") and "--seed 8" in c]
    assert alone, commands
    argv = shlex.split(alone[0])[2:]
    assert "--out" not in argv  # the shown command writes to a fresh samples/RUN[-N]
    argv += ["--out", str(tmp_path / "again")]
    sample_main(argv)
    again = np.asarray(Image.open(tmp_path / "again" / "sample_0000.png"))
    np.testing.assert_array_equal(again, np.asarray(Image.open(files[1])))


def upload_file(page, zone: str, path: Path) -> None:
    """Pick a file for a gr.File as a user does: click its drop zone, choose the file."""
    with page.expect_file_chooser() as chooser:
        page.locator(zone).get_by_text("Click to Upload").click()
    chooser.value.set_files(str(path))
    page.locator(f'{zone} td[aria-label="{path.name}"]').wait_for(timeout=20_000)


def set_number(page, selector: str, value: str) -> None:
    field = page.locator(selector)
    field.fill(value)
    field.press("Tab")


def test_upscale_an_upload_and_reproduce_it_with_sample_py(app, page, tmp_path):
    from diffusion.cli.sample import main as sample_main

    small = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)  # the upsampler's 8 px input
    Image.fromarray(small).save(tmp_path / "small.png")
    (tmp_path / "notes.png").write_text("not an image")

    page.get_by_role("tab", name="Upscale").click()
    upload_file(page, "#up-upload", tmp_path / "notes.png")
    page.locator("#up-button").click()  # an unreadable upload: a message in the page, not a traceback
    page.get_by_text("notes.png is not an image").first.wait_for(timeout=20_000)
    page.locator("#up-upload").get_by_label("Clear").first.click()
    upload_file(page, "#up-upload", tmp_path / "small.png")
    for selector, bad, message in [("#up-aug input", "1.5", "got 1.5"), ("#up-steps input", "0", "steps must be a whole number from 1 to 100")]:
        set_number(page, selector, bad)
        page.locator("#up-button").click()
        page.get_by_text(message).first.wait_for(timeout=20_000)
    set_number(page, "#up-steps input", "3")
    set_number(page, "#up-aug input", "0.2")
    set_number(page, "#up-seed input", "5")
    page.locator("#up-consistency input").uncheck()  # on by default (the config's); the command must say off
    page.locator("#up-class input").click()
    page.get_by_role("option", name="4: red square").click()
    page.locator("#up-button").click()
    page.locator('#up-files a[download="sample_0000.png"]').wait_for(timeout=60_000)
    result = Image.open(download(page, '#up-files a[download="sample_0000.png"]', tmp_path / "sr.png"))
    bicubic = Image.open(download(page, '#up-files a[download="bicubic_0000.png"]', tmp_path / "bicubic.png"))

    assert result.size == bicubic.size == (16, 16)  # the upsampler's resolution (8 px x factor 2)
    meta = result.text
    assert meta["seed"] == "5" and meta["aug_level"] == "0.2" and meta["aug_level_input"] == "20" and meta["label"] == "4" and meta["class_name"] == "red square"
    assert meta["sampler"] == "ddim" and meta["steps"] == "3" and meta["checkpoint"].endswith("step-000002")
    assert meta["low_res"].endswith("input.png") and meta["consistency"] == "False"

    command = page.locator("#up-command textarea").input_value().splitlines()[0]
    argv = shlex.split(command)[2:]
    assert argv[argv.index("--low-res") + 1] == "input.png" and argv[argv.index("--aug-level") + 1] == "0.2"
    assert "--no-consistency" in argv
    argv[argv.index("--low-res") + 1] = str(tmp_path / "small.png")  # the same pixels as the page's input.png
    assert "--out" not in argv  # the shown command writes to a fresh samples/RUN[-N]
    argv += ["--out", str(tmp_path / "again")]
    sample_main(argv)
    for name, picture in [("sample", result), ("bicubic", bicubic)]:
        again = np.asarray(Image.open(tmp_path / "again" / f"{name}_0000.png"))
        np.testing.assert_array_equal(again, np.asarray(picture.convert("RGB")))


def test_cascade_from_a_generated_image_equals_sample_py_cascade(app, page, tmp_path):
    from diffusion.cli.sample import main as sample_main

    models, _ = app
    page.locator("#gen-class input").click()
    page.get_by_role("option", name="6: blue square").click()
    set_number(page, "#gen-seed input", "11")
    set_number(page, "#gen-count input[type=number]", "1")
    page.locator("#gen-button").click()
    page.locator('#gen-files a[download="sample_0000.png"]').wait_for(timeout=60_000)

    page.get_by_role("tab", name="Upscale").click()
    page.locator("#up-cascade").click()
    page.locator('#up-upload td[aria-label="sample_0000.png"]').wait_for(timeout=20_000)
    assert page.locator("#up-seed input").input_value() == "11"
    assert page.locator("#up-class input").input_value() == "6: blue square"
    page.locator("#up-button").click()
    page.locator('#up-files a[download="sample_0000.png"]').wait_for(timeout=60_000)
    result = Image.open(download(page, '#up-files a[download="sample_0000.png"]', tmp_path / "sr.png"))
    assert result.size == (16, 16) and result.text["seed"] == "11" and result.text["label"] == "6"

    out = tmp_path / "cascade"  # the same two stages through sample.py's cascade
    sample_main(["--checkpoint", str(models.paths.checkpoint), "--upsampler", str(models.paths.upsampler),
                 "--class-label", "6", "--seed", "11", "--num-samples", "1", "--out", str(out)])
    np.testing.assert_array_equal(np.asarray(Image.open(out / "sample_0000.png")), np.asarray(result.convert("RGB")))
