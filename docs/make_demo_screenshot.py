"""The pictures (docs/demo.md, the README) of the demo's In-paint and Upscale tabs, taken by headless Chromium.

  python docs/make_demo_screenshot.py --checkpoint runs/shapes [--class-name "red square"] [--out docs/demo_inpaint.png]
  python docs/make_demo_screenshot.py --checkpoint runs/shapes --upsampler runs/upsample_shapes --out docs/demo_upscale.png

Starts the app on a free port. In-paint: picks an example image, paints a band over its middle with
the mouse, asks for the class and in-paints. Upscale (with --upsampler): generates one image of the
class, cascades it into the Upscale tab and upscales. Then screenshots the page.
"""
from __future__ import annotations

import argparse
import re
import socket
import time

from playwright.sync_api import sync_playwright

from diffusion.demos import app as demo_app
from diffusion.demos import backend


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--inpaint-checkpoint", default=None)
    parser.add_argument("--upsampler", default=None, help="screenshot the Upscale tab (a cascade) instead")
    parser.add_argument("--seed", type=int, default=0, help="the generated image's seed (Upscale)")
    parser.add_argument("--class-name", default="red square")
    parser.add_argument("--example", type=int, default=1, help="which example image (0-based)")
    parser.add_argument("--out", default="docs/demo_inpaint.png")
    args = parser.parse_args()

    models = backend.load_models(backend.DemoPaths(args.checkpoint, args.inpaint_checkpoint, args.upsampler, device="cpu"))
    demo = demo_app.build_app(models)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo_app.launch(demo, "127.0.0.1", port, block=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(f"http://127.0.0.1:{port}")
            page.wait_for_load_state("networkidle")
            (upscale if args.upsampler else inpaint)(page, args)
            time.sleep(1)
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        demo.close()
    print(f"wrote {args.out}")


def upscale(page, args: argparse.Namespace) -> None:
    """Generate one image of the class, cascade it into the Upscale tab, upscale."""
    page.locator("#gen-class input").click()
    page.get_by_role("option", name=re.compile(f": {args.class_name}$")).click()
    for selector, value in [("#gen-seed input", str(args.seed)), ("#gen-count input[type=number]", "1")]:
        page.locator(selector).fill(value)
        page.locator(selector).press("Tab")
    page.locator("#gen-button").click()
    page.locator('#gen-files a[download="sample_0000.png"]').wait_for(timeout=300_000)
    page.get_by_role("tab", name="Upscale").click()
    page.locator("#up-cascade").click()
    page.locator('#up-upload td[aria-label="sample_0000.png"]').wait_for(timeout=20_000)
    page.locator("#up-button").click()
    page.locator('#up-files a[download="sample_0000.png"]').wait_for(timeout=300_000)


def inpaint(page, args: argparse.Namespace) -> None:
    """Click an example, paint a band over the shape in the middle, pick the class, in-paint."""
    page.get_by_role("tab", name="In-paint").click()
    editor = page.locator("#inpaint-editor")
    page.locator(".gallery-item, button.gallery").nth(args.example).click()  # an example image
    editor.get_by_text("Upload an image").wait_for(state="hidden", timeout=20_000)
    page.locator("#ip-class input").click()
    page.get_by_role("option", name=re.compile(f": {args.class_name}$")).click()
    editor.scroll_into_view_if_needed()
    box = editor.locator("canvas").first.bounding_box()
    zoom = float(editor.get_by_text(re.compile(r"^\d+%$")).inner_text().rstrip("%")) / 100
    cx, cy, side = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, 256 * zoom
    for dy in (-0.22, -0.11, 0, 0.11, 0.22):  # cover the shape in the middle
        page.mouse.move(cx - 0.3 * side, cy + dy * side)
        page.mouse.down()
        page.mouse.move(cx + 0.3 * side, cy + dy * side, steps=3)
        page.mouse.up()
    page.locator("#ip-button").click()
    page.locator('#ip-files a[download="sample_0000.png"]').wait_for(timeout=300_000)


if __name__ == "__main__":
    main()
