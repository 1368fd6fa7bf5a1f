"""A browser demo: generate, in-paint with a brush, and upscale, from trained runs (Gradio).

  pip install -e ".[demo]"
  python -m diffusion.demos.app --checkpoint runs/shapes [--inpaint-checkpoint runs/inpaint_shapes]
      [--upsampler runs/upsample_shapes] [--classifier RUN] [--clip RUN] [--autoguide GUIDE ...] [--port 7860]
      [--host 127.0.0.1]

The runs are loaded once; requests are queued and run one at a time. Every result is a PNG with
the metadata sample.py writes, next to the `python sample.py ...` command that reproduces it.
All calls into the library go through `diffusion.demos.backend`; every bound on a request (image
sizes, layers, uploads, the queue, how long files are kept, the values' checks) is in
`diffusion.demos.limits`.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback

from ..threads import prefer_passive_waits, set_cpu_threads

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
prefer_passive_waits()  # before torch is imported (see diffusion/threads.py)

from ..cli.args import Parser, add_trust_argument, apply_trust  # noqa: E402
from . import backend as B  # noqa: E402
from . import limits as L  # noqa: E402

MAX_FILE_SIZE = L.MAX_FILE_SIZE
EXAMPLE_SIDE = 256  # example images are enlarged (nearest) so the brush can be placed pixel by pixel
ANY_CLASS = L.ANY_CLASS
UP_SIDE = 200  # the Upscale tab's three pictures are shown this tall, enlarged (nearest)
SAMPLING = dict(concurrency_id="models", concurrency_limit=L.CONCURRENCY)  # the three tabs share the models: one at a time
CSS = ("#gen-gallery img, #ip-strip img { image-rendering: pixelated; }"  # small images: sharp pixels, no blur
       "#up-lowres img, #up-bicubic img, #up-result img "  # and enlarged to the box, side by side
       "{ image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }")


def import_gradio():
    try:
        import gradio as gr
    except ModuleNotFoundError:
        raise B.UserError('the demo needs Gradio: pip install -e ".[demo]"') from None
    return gr


def shown_errors(fn):
    """Bad input becomes a message in the page (gr.Error), never a traceback."""
    gr = import_gradio()

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except B.UserError as err:
            raise L.shown(err, gr) from None
        except Exception as err:  # noqa: BLE001 - the page gets one line, the server log the traceback
            traceback.print_exc()
            raise L.shown(B.UserError(f"unexpected error ({type(err).__name__}): {B.first_line(err)}"), gr) from None

    return wrapper


def whole(value, what: str, low: int = 0, high: int = 2**62) -> int:
    """A number field that must hold a whole number in [low, high] (a page can send NaN, 1e30 or 2.5)."""
    return L.whole(value, what, low, high)


def request_from(info: B.ModelInfo, label, prompt, negative, scale, sampler, steps, seed, count, classifier_scale,
                 clip_scale, rescale, threshold, lo, hi, method=None, jump_length=5, jump_n_sample=5,
                 allow_any: bool = True, autoguide=None, guides=()) -> B.GenerateRequest:
    """A request from the page's (or the HTTP API's) raw values, each checked in limits.py: a value of the
    wrong type or range is refused with a message naming the field. `autoguide` must be "none" or one of
    `guides`, the --autoguide runs the app was started with."""
    guide = None if autoguide in (None, "", "none") else L.choice(autoguide, "the guide", ["none", *guides])
    steps = L.whole(steps, "steps", 1, info.num_train_timesteps)
    seed = L.whole(seed, "the seed")
    count = L.whole(count, "the number of images", 1, B.MAX_SAMPLES, blank=1)
    jump_length = L.whole(jump_length, "jump length", 1, 1000, blank=5)
    jump_n_sample = L.whole(jump_n_sample, "jumps", 1, 1000, blank=5)
    lo, hi = L.number(lo, "the guidance interval LO", blank=None), L.number(hi, "the guidance interval HI", blank=None)
    if (lo is None) != (hi is None):
        raise B.UserError("the guidance interval needs both LO and HI (or neither)")
    prompt = L.text(prompt, "the prompt")
    return B.GenerateRequest(
        class_label=L.class_label(label, info.class_names, allow_any),
        prompt=(prompt or "") if prompt or info.condition == "text" else None,
        negative_prompt=L.text(negative, "the negative prompt"),
        guidance_scale=L.number(scale, "the guidance scale", 0, blank=None),
        sampler=None if sampler is None else L.choice(sampler, "the sampler", list(B.SAMPLERS)),
        steps=steps, seed=seed, num_samples=count,
        classifier_scale=L.number(classifier_scale, "the classifier scale", blank=None),
        clip_scale=L.number(clip_scale, "the CLIP scale", blank=None),
        guidance_rescale=L.number(rescale, "the CFG rescale", 0, 1, blank=None) or None,
        dynamic_threshold=L.number(threshold, "the dynamic threshold", blank=None) or None,
        guidance_interval=None if lo is None else (lo, hi),
        inpaint_method=None if method is None else L.choice(method, "the in-painting method", list(B.INPAINT_METHODS)),
        jump_length=jump_length, jump_n_sample=jump_n_sample, autoguide=guide,
    )


def guard_uploads(component, gr):
    """Make a component's decoding of an upload (gradio opens it with PIL before our handler runs) end in
    a message in the page, and check an ImageEditor's files (sizes, layer count) from their headers before
    gradio decodes them (limits.guard_editor)."""
    if isinstance(component, gr.ImageEditor):
        return L.guard_editor(component, gr)
    return L.guard_files(component, gr)


def build_app(models: B.Models, title: str = "diffusion demo"):
    gr = import_gradio()
    info, inpaint_info = models.info("base"), models.info("inpaint")
    up_info = models.info("upsampler") if models.upsampler is not None else None
    paths = models.paths

    def condition_controls(info: B.ModelInfo, prefix: str):
        """Class, prompt and guidance controls the run supports; absent ones are hidden Nones."""
        classes = info.class_names if (info.condition == "class" or paths.classifier) else []
        label = gr.Dropdown([("any (cycle through the classes)", ANY_CLASS)] + [(f"{i}: {n}", i) for i, n in enumerate(classes)],
                            value=ANY_CLASS if not classes else 0, label="class", visible=bool(classes),
                            elem_id=f"{prefix}-class")
        wants_prompt = info.condition == "text" or bool(paths.clip)
        prompt = gr.Textbox(label="prompt", visible=wants_prompt, elem_id=f"{prefix}-prompt",
                            value="" if not wants_prompt else None)
        negative = gr.Textbox(label="negative prompt", visible=info.condition == "text", elem_id=f"{prefix}-negative")
        scale = gr.Slider(0, 10, value=info.guidance_scale, step=0.5, label="guidance scale (0 unconditional, 1 conditional)",
                          visible=info.condition != "none" or bool(paths.autoguides), elem_id=f"{prefix}-scale")
        with gr.Row():
            sampler = gr.Dropdown(list(B.SAMPLERS), value=info.sampler, label="sampler", elem_id=f"{prefix}-sampler")
            steps = gr.Number(info.steps, precision=0, label=f"steps (1..{info.num_train_timesteps})", elem_id=f"{prefix}-steps")
            seed = gr.Number(0, precision=0, label="seed (image i uses seed + i)", elem_id=f"{prefix}-seed")
        with gr.Accordion("more guidance", open=False, visible=info.condition != "none" or bool(paths.classifier or paths.clip)):
            classifier_scale = gr.Number(None, label="classifier scale (blank: 10)", visible=bool(paths.classifier))
            clip_scale = gr.Number(None, label="CLIP scale (blank: 10)", visible=bool(paths.clip))
            rescale = gr.Slider(0, 1, value=0, step=0.05, label="CFG rescale phi (0 = off)")
            threshold = gr.Number(None, label="dynamic threshold percentile, 50..100 (blank = off)")
            with gr.Row():
                unit = "sigma" if info.formulation == "edm" else "timestep"
                lo = gr.Number(None, label=f"guidance interval LO {unit} (blank = off)")
                hi = gr.Number(None, label=f"guidance interval HI {unit}")
        return [label, prompt, negative, scale, sampler, steps, seed], [classifier_scale, clip_scale, rescale, threshold, lo, hi]

    @shown_errors
    def on_generate(label, prompt, negative, scale, sampler, steps, seed, count, classifier_scale, clip_scale, rescale,
                    threshold, lo, hi, guide="none", progress=gr.Progress()):
        request = request_from(info, label, prompt, negative, scale, sampler, steps, seed, count, classifier_scale,
                               clip_scale, rescale, threshold, lo, hi, autoguide=guide, guides=paths.autoguides)
        results = B.generate(models, request, lambda done, total: progress((done, total), desc="sampling", unit="steps"))
        try:  # the page gets copies in gradio's cache (deleted on delete_cache's schedule); the request folder goes now
            served = L.serve_copies(files, [r.path for r in results])
        finally:
            B.release(results[0].path.parent)
        gallery = [(path, f"seed {r.metadata.get('seed')} {r.metadata.get('class_name', r.metadata.get('prompt', ''))}")
                   for path, r in zip(served, results)]
        commands = B.batch_command(models, request) + "\n\n# each image alone:\n" + "\n".join(r.command for r in results)
        return gallery, served, commands

    @shown_errors
    def on_inpaint(editor, label, prompt, negative, scale, sampler, steps, seed, classifier_scale, clip_scale, rescale,
                   threshold, lo, hi, method, jump_length, jump_n_sample, progress=gr.Progress()):
        if not editor or editor.get("background") is None:
            raise B.UserError("upload an image (or pick an example) first")
        image = B.check_upload(editor["background"])
        mask = B.paint_mask_from_layers(image.size, editor.get("layers") or [])
        request = request_from(inpaint_info, label, prompt, negative, scale, sampler, steps, seed, 1, classifier_scale,
                               clip_scale, rescale, threshold, lo, hi, method, jump_length, jump_n_sample)
        if mask.getbbox() is not None:
            warning = B.coverage_warning(models, mask)
            if warning:
                gr.Warning(warning)
        out = B.inpaint(models, image, mask, request, lambda done, total: progress((done, total), desc="in-painting", unit="steps"))
        result = out.results[0]
        try:
            served = L.serve_copies(ip_files, [result.path, *out.files])
        finally:
            B.release(result.path.parent)
        command = B.batch_command(models, request, inpaint=True) + "\n# image.png and mask.png are in the downloads"
        return out.strip, served, command

    @shown_errors
    def on_upscale(upload, label, prompt, negative, scale, sampler, steps, seed, aug, consistency, progress=gr.Progress()):
        image = B.read_upload(upload)
        request = request_from(up_info, label, prompt, negative, scale, sampler, steps, seed, 1, None, None, 0, None,
                               None, None)
        request.aug_level = L.number(aug, "the aug level", 0, blank=None)
        request.consistency = L.flag(consistency, "match the input exactly")
        out = B.upscale(models, image, request, lambda done, total: progress((done, total), desc="upscaling", unit="steps"))
        try:
            served = L.serve_copies(up_files, out.files)
        finally:
            B.release(out.result.path.parent)
        return (out.low_res, out.bicubic, out.result.image, served,
                B.upscale_command(models, request) + "\n# input.png is in the downloads")

    @shown_errors
    def on_cascade(generated):
        path, meta = B.cascade_source(models, generated)
        label = int(meta["label"]) if "label" in meta and up_info.condition == "class" else gr.update()
        prompt = meta["prompt"] if "prompt" in meta and up_info.condition == "text" else gr.update()
        return path, int(meta.get("seed", 0)), label, prompt

    def upscale_controls(info: B.ModelInfo):
        """The upsampler's class or prompt (a class is needed: one image per request), guidance, sampler, seed."""
        classes = info.class_names if info.condition == "class" else []
        label = gr.Dropdown([(f"{i}: {n}", i) for i, n in enumerate(classes)], value=0 if classes else ANY_CLASS,
                            label="class", visible=bool(classes), elem_id="up-class")
        prompt = gr.Textbox(label="prompt", visible=info.condition == "text", elem_id="up-prompt")
        negative = gr.Textbox(label="negative prompt", visible=info.condition == "text", elem_id="up-negative")
        scale = gr.Slider(0, 10, value=info.guidance_scale, step=0.5, label="guidance scale (0 unconditional, 1 conditional)",
                          visible=info.condition != "none", elem_id="up-scale")
        with gr.Row():
            sampler = gr.Dropdown(list(B.SAMPLERS), value=info.sampler, label="sampler", elem_id="up-sampler")
            steps = gr.Number(info.steps, precision=0, label=f"steps (1..{info.num_train_timesteps})", elem_id="up-steps")
            seed = gr.Number(0, precision=0, label="seed (also the aug noise's)", elem_id="up-seed")
        return label, prompt, negative, scale, sampler, steps, seed

    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=L.DELETE_CACHE) as demo:
        gr.Markdown(f"## {title}\n`{models.base.path}`: {info.condition}-conditional, {info.resolution}x{info.resolution}"
                    + (f"; in-painting run `{models.inpainter.path}`" if paths.inpaint_checkpoint else "")
                    + (f"; upsampler `{models.upsampler.path}`" if up_info else ""))
        with gr.Tab("Generate", elem_id="tab-generate"):
            with gr.Row():
                with gr.Column():
                    common, extra = condition_controls(info, "gen")
                    count = gr.Slider(1, B.MAX_SAMPLES, value=4, step=1, label="number of images (per class when cycling)",
                                      elem_id="gen-count")
                    guide = gr.Dropdown(["none", *paths.autoguides], value="none", elem_id="gen-autoguide",
                                        visible=bool(paths.autoguides),
                                        label="autoguidance guide (the guidance scale is its strength; CFG off)")
                    go = gr.Button("Generate", variant="primary", elem_id="gen-button")
                with gr.Column():
                    gallery = gr.Gallery(label="results", columns=4, format="png", elem_id="gen-gallery")
                    files = gr.File(label="PNG downloads (with sample.py's metadata)", file_count="multiple",
                                    elem_id="gen-files")
                    command = gr.Textbox(label="reproduce with", lines=3, buttons=["copy"], elem_id="gen-command")
            # the guide joins the API's inputs only when guides were given, so the API without them is unchanged
            go.click(on_generate, [*common, count, *extra, *([guide] if paths.autoguides else [])],
                     [gallery, files, command], **SAMPLING)

        with gr.Tab("In-paint", elem_id="tab-inpaint"):
            with gr.Row():
                with gr.Column():
                    editor = guard_uploads(gr.ImageEditor(
                        type="pil", image_mode="RGBA", sources=["upload", "clipboard"], transforms=[], layers=False,
                        brush=gr.Brush(colors=["#ff3030"], color_mode="fixed", default_size=24),
                        label="image: paint the region to regenerate", height=420, elem_id="inpaint-editor"), gr)
                    examples = B.example_images(models, EXAMPLE_SIDE)
                    if examples:
                        gr.Examples([[str(p)] for p in examples], inputs=[editor], label="examples (the run's dataset)")
                with gr.Column():
                    ip_common, ip_extra = condition_controls(inpaint_info, "ip")
                    methods = list(B.INPAINT_METHODS) if inpaint_info.inpaint_model else ["replace", "repaint"]
                    method = gr.Radio(methods, value=methods[0], label="method", elem_id="ip-method")
                    with gr.Row():
                        jump_length = gr.Number(5, precision=0, label="repaint --jump-length")
                        jump_n_sample = gr.Number(5, precision=0, label="repaint --jump-n-sample")
                    ip_go = gr.Button("In-paint", variant="primary", elem_id="ip-button")
            strip = gr.Image(label="input | mask | result", type="pil", format="png", interactive=False, elem_id="ip-strip")
            ip_files = gr.File(label="result PNG (with metadata), image.png and mask.png", file_count="multiple",
                               elem_id="ip-files")
            ip_command = gr.Textbox(label="reproduce with", lines=2, buttons=["copy"], elem_id="ip-command")
            ip_go.click(on_inpaint, [editor, *ip_common, *ip_extra, method, jump_length, jump_n_sample],
                        [strip, ip_files, ip_command], **SAMPLING)

        if up_info is not None:
            with gr.Tab("Upscale", elem_id="tab-upscale"):
                low, high = up_info.low_resolution, up_info.resolution
                with gr.Row():
                    with gr.Column():
                        up_file = gr.File(label=f"low-res image (resized and centre-cropped to {low}x{low})",
                                          file_types=["image"], elem_id="up-upload")
                        cascade = gr.Button("use the first image of the last Generate (cascade)", elem_id="up-cascade")
                        up_label, up_prompt, up_negative, up_scale, up_sampler, up_steps, up_seed = upscale_controls(up_info)
                        unit = "a sigma >= 0" if up_info.formulation == "edm" else "a fraction of the training timesteps in [0, 1]"
                        aug = gr.Number(up_info.aug_level, step=0.05, label=f"aug level: noise on the low-res input, "
                                        f"{unit} (0 = clean)", elem_id="up-aug")
                        consistency = gr.Checkbox(bool(up_info.consistency), elem_id="up-consistency",
                                                  label="match the input exactly (the result downsamples to it)")
                        up_go = gr.Button("Upscale", variant="primary", elem_id="up-button")
                    with gr.Column():
                        with gr.Row():
                            gr_low = gr.Image(label=f"input {low}px", type="pil", format="png",
                                              interactive=False, height=UP_SIDE, min_width=80, buttons=["fullscreen"], elem_id="up-lowres")
                            gr_bicubic = gr.Image(label=f"bicubic {high}px", type="pil", format="png",
                                                  interactive=False, height=UP_SIDE, min_width=80, buttons=["fullscreen"], elem_id="up-bicubic")
                            gr_result = gr.Image(label=f"diffusion {high}px", type="pil", format="png",
                                                 interactive=False, height=UP_SIDE, min_width=80, buttons=["fullscreen"], elem_id="up-result")
                        up_files = gr.File(label="result PNG (with metadata), bicubic, low-res and input.png",
                                           file_count="multiple", elem_id="up-files")
                        up_command = gr.Textbox(label="reproduce with", lines=2, buttons=["copy"], elem_id="up-command")
                up_go.click(on_upscale, [up_file, up_label, up_prompt, up_negative, up_scale, up_sampler, up_steps,
                                         up_seed, aug, consistency], [gr_low, gr_bicubic, gr_result, up_files, up_command],
                            **SAMPLING)
                cascade.click(on_cascade, [files], [up_file, up_seed, up_label, up_prompt])
    L.guard_inputs(demo, gr)
    demo.queue(max_size=L.QUEUE_SIZE, default_concurrency_limit=L.CONCURRENCY)
    return demo


def build_parser() -> argparse.ArgumentParser:
    from ..cli.help_format import DefaultsHelpFormatter  # --help shows every default

    parser = Parser(prog="python -m diffusion.demos.app", description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="denoiser run directory or checkpoint")
    parser.add_argument("--inpaint-checkpoint", default=None, help="in-painting run (model.inpaint: true) for the In-paint tab")
    parser.add_argument("--upsampler", default=None, help="upsampler run (model.upsample: true) for the Upscale tab: "
                        "your image, or the cascade from a generated one")
    parser.add_argument("--classifier", default=None, help="noise-aware classifier run for classifier guidance")
    parser.add_argument("--clip", default=None, help="noise-aware CLIP run (or open_clip:ARCH) for CLIP guidance")
    parser.add_argument("--autoguide", action="append", default=None, metavar="GUIDE",
                        help="a guide run for autoguidance (repeatable): the Generate tab offers these and none other")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    add_trust_argument(parser)
    return parser


def launch(demo, host: str, port: int, block: bool = True):
    L.delete_served_files(demo)  # uploads and served results, also when the process ends without a clean close
    try:
        return demo.launch(server_name=host, server_port=port, max_file_size=MAX_FILE_SIZE, show_error=False,
                           app_kwargs={"middleware": L.upload_middleware()}, ssr_mode=False,
                           prevent_thread_lock=not block, quiet=not block, css=CSS)
    except (OSError, OverflowError) as err:  # checked in main() already; a port taken meanwhile lands here
        raise B.UserError(f"cannot serve on {host} port {port}: {B.first_line(err)}: pass another --port") from None


def main(argv: list[str] | None = None) -> None:
    try:
        args = build_parser().parse_args(argv)
        L.check_listen(args.host, args.port)  # before the models load: a bad --port fails in a moment
        apply_trust(args)
        set_cpu_threads()
        import_gradio()
        models = B.load_models(B.DemoPaths(args.checkpoint, args.inpaint_checkpoint, args.upsampler, args.classifier,
                                           args.clip, args.device, args.autoguide or []))
        launch(build_app(models), args.host, args.port)
    except B.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
