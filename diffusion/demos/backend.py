"""The demo app's only door into the library: load the runs once, generate, in-paint, upscale.

Every request becomes the argument list of a `sample.py` command and runs through sample.py's own
code path (its parser, checks, features, plan and `run_plan`), so the command shown in the page
reproduces the images exactly. Only this module imports the sampling library; the app sees
the small typed interface below. Errors the user can fix are raised as `UserError`.
"""
from __future__ import annotations

import math
import shlex
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..checkpoints import store as ckpt
from ..checkpoints.load import LoadedModel
from ..cli import sample as sample_cli
from ..cli import upsample as upsample_cli
from ..conditioning import upsample as up
from ..conditioning.inpaint import files as inpaint_files
from ..conditioning.inpaint.methods import METHODS
from ..data import build_dataset
from ..device import pick_device
from ..data.common import IMAGE_ERRORS, read_image
from ..errors import UserError, first_line
from ..sampling.images import save_png, to_pil
from ..sampling.plan import run_plan
from ..sampling.samplers import SAMPLERS
from . import limits as L

Progress = Callable[[int, int], None]  # (steps done, steps in all)
INPAINT_METHODS = METHODS
MAX_SAMPLES = 16  # images per condition
MAX_IMAGES = 64  # images per request
MAX_SIDE = L.MAX_SIDE  # uploads larger than this (in pixels) are refused; every bound: diffusion/demos/limits.py


@dataclass
class DemoPaths:
    checkpoint: str
    inpaint_checkpoint: str | None = None
    upsampler: str | None = None
    classifier: str | None = None
    clip: str | None = None
    device: str | None = None
    autoguides: list[str] = field(default_factory=list)  # guides given on the command line: the page's only choices


@dataclass
class ModelInfo:
    """What the page needs to know about a loaded denoiser."""

    condition: str  # none | class | text
    class_names: list[str]
    resolution: int
    sampler: str
    steps: int
    guidance_scale: float
    num_train_timesteps: int  # also the most steps the page offers (edm runs: diffusion.num_train_timesteps, 1000)
    inpaint_model: bool
    aug_level: float | None = None  # upsamplers: the config's default aug level (a fraction of T)
    low_resolution: int | None = None  # upsamplers: the input side
    consistency: bool | None = None  # upsamplers: the config's default low-res consistency projection
    formulation: str = "ddpm"  # ddpm: noise levels are timesteps (aug level: a fraction of them); edm: sigma


@dataclass
class Models:
    paths: DemoPaths
    base: LoadedModel
    inpainter: LoadedModel  # the --inpaint-checkpoint run, else the base run (replace / repaint)
    workdir: Path  # where requests write their PNGs
    upsampler: LoadedModel | None = None  # the --upsampler run (the Upscale tab)
    requests: int = 0
    features: list = field(default_factory=sample_cli.features)  # sample.py's, kept: they cache guide models

    def info(self, which: str = "base") -> ModelInfo:
        loaded = {"base": self.base, "inpaint": self.inpainter, "upsampler": self.upsampler}[which]
        cfg, model = loaded.cfg, loaded.model
        condition = getattr(model, "condition", "none")
        names = list(loaded.info.class_names)
        if self.paths.classifier and condition != "class" and which != "upsampler":  # the classifier's classes steer an unconditional run
            names = list(ckpt.read_info(ckpt.resolve_checkpoint(self.paths.classifier)).class_names) or names
        upsampler = upsample_cli.is_upsampler(loaded)
        return ModelInfo(condition, names, cfg.data.resolution, cfg.sample.sampler, cfg.sample.steps,
                         cfg.sample.guidance_scale, cfg.diffusion.num_train_timesteps, bool(cfg.model.inpaint),
                         cfg.upsample.aug_level if upsampler else None, up.low_resolution(cfg) if upsampler else None,
                         cfg.upsample.consistency if upsampler else None, cfg.diffusion.formulation)


@dataclass
class GenerateRequest:
    """sample.py's options; None means the run's default."""

    class_label: int | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    sampler: str | None = None
    steps: int | None = None
    seed: int = 0
    num_samples: int = 1
    classifier_scale: float | None = None
    clip_scale: float | None = None
    guidance_rescale: float | None = None
    dynamic_threshold: float | None = None
    guidance_interval: tuple[float, float] | None = None
    inpaint_method: str | None = None  # in-painting only
    jump_length: int = 5
    jump_n_sample: int = 5
    aug_level: float | None = None  # upscaling only: a fraction of the training timesteps in [0, 1] (edm: sigma)
    consistency: bool | None = None  # upscaling only: the low-res consistency projection (None: the config's)
    autoguide: str | None = None  # one of DemoPaths.autoguides (the Generate tab's guide picker), None = off


@dataclass
class Result:
    image: Image.Image
    metadata: dict[str, str]  # the PNG text chunks sample.py writes
    path: Path  # that PNG
    command: str  # `python sample.py ...` regenerating this image alone


@dataclass
class InpaintResult:
    strip: Image.Image  # input | mask overlay | result, like sample.py's strip_NNNN.png
    results: list[Result]
    files: list[Path] = field(default_factory=list)  # image.png, mask.png the command reads


@dataclass
class UpscaleResult:
    low_res: Image.Image  # the model's low-res input (resized and centre-cropped, 8-bit)
    bicubic: Image.Image  # the bicubic upsample of that input, sample.py's bicubic_0000.png
    result: Result  # the diffusion upsample, sample.py's sample_0000.png
    files: list[Path] = field(default_factory=list)  # the PNGs: result, bicubic, low-res, and input.png the command reads


def load_models(paths: DemoPaths) -> Models:
    """Load the denoiser(s) once; classifier and CLIP runs are loaded and checked here too."""
    device = pick_device(paths.device)
    base = sample_cli.load_denoiser(paths.checkpoint, device)
    inpainter = sample_cli.load_denoiser(paths.inpaint_checkpoint, device) if paths.inpaint_checkpoint else base
    upsampler = sample_cli.load_denoiser(paths.upsampler, device) if paths.upsampler else None
    if upsampler is not None and not upsample_cli.is_upsampler(upsampler):
        raise UserError(f"--upsampler {paths.upsampler} is not an upsampler (its config has model.upsample: false)")
    models = Models(paths, base, inpainter, Path(tempfile.mkdtemp(prefix="diffusion-demo-")), upsampler=upsampler)
    L.remove_at_exit(models.workdir)  # request folders go after each response (release); the rest at exit
    if paths.classifier or paths.clip:  # the features load and check them (and keep them) on first use
        prompt = "a" if paths.clip else ("" if getattr(base.model, "condition", "none") == "text" else None)
        _plan(models, base, _argv(models, base, GenerateRequest(prompt=prompt, steps=1)), Path(models.workdir))
    for guide in paths.autoguides:  # loaded and checked against the base now, so a bad guide stops the start
        prompt = "" if getattr(base.model, "condition", "none") == "text" else None
        _plan(models, base, _argv(models, base, GenerateRequest(prompt=prompt, steps=1, autoguide=guide)),
              Path(models.workdir))
    return models


def _argv(models: Models, loaded: LoadedModel, request: GenerateRequest, out: str | None = None,
          image: str | None = None, mask: str | None = None, low_res: str | None = None) -> list[str]:
    """The sample.py arguments for a request (`low_res`: the upsampler on that image)."""
    r, p = request, models.paths
    checkpoint = p.inpaint_checkpoint if (image and loaded is models.inpainter and p.inpaint_checkpoint) else p.checkpoint
    argv = ["--checkpoint", str(p.upsampler if low_res else checkpoint)]
    options = [("--class-label", r.class_label), ("--guidance-scale", r.guidance_scale), ("--sampler", r.sampler),
               ("--steps", r.steps), ("--num-samples", r.num_samples), ("--seed", r.seed),
               ("--negative-prompt", r.negative_prompt), ("--guidance-rescale", r.guidance_rescale),
               ("--dynamic-threshold", r.dynamic_threshold)]
    if r.prompt is not None:
        options.append(("--prompt", r.prompt))
    if low_res:  # the guide runs work at the base's resolution, not the upsampler's
        options += [("--low-res", low_res), ("--aug-level", r.aug_level)]
    elif p.classifier:
        options += [("--classifier", p.classifier), ("--classifier-scale", r.classifier_scale)]
    if p.clip and r.prompt and not low_res:
        options += [("--clip", p.clip), ("--clip-scale", r.clip_scale)]
    if image:
        options += [("--image", image), ("--mask", mask), ("--inpaint-method", r.inpaint_method)]
        if r.inpaint_method == "repaint":
            options += [("--jump-length", r.jump_length), ("--jump-n-sample", r.jump_n_sample)]
    for flag, value in options:
        if value is not None:
            argv += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    if low_res and r.consistency is not None:
        argv.append("--consistency" if r.consistency else "--no-consistency")
    if r.guidance_interval is not None:
        argv += ["--guidance-interval", *(f"{v:g}" for v in r.guidance_interval)]
    if r.autoguide is not None and not low_res and not image:
        if r.autoguide not in p.autoguides:  # never a path a web user typed: only the command line's guides
            raise UserError(f"the guide {r.autoguide!r} is not one of the guides this demo was started with (--autoguide)")
        argv += ["--autoguide", r.autoguide]
    return [*argv, "--out", out] if out else argv  # the shown command: sample.py picks a fresh samples/RUN[-N]


def _plan(models: Models, loaded: LoadedModel, argv: list[str], out: Path):
    """sample.py's parse, checks and plan (its main() minus loading and saving)."""
    features = models.features
    try:
        args = sample_cli.build_parser(features).parse_args(argv)
    except SystemExit:
        raise UserError(f"invalid options: {shlex.join(argv)}") from None
    sample_cli.check_args(args)
    if not 1 <= args.num_samples <= MAX_SAMPLES:
        raise UserError(f"number of images must be 1..{MAX_SAMPLES}, got {args.num_samples}")
    settings = sample_cli.sampler_settings(args, loaded)
    args.out = str(out)
    plan = sample_cli.make_plan(args, loaded, features, settings)
    if len(plan.items) > MAX_IMAGES:
        raise UserError(f"that asks for {len(plan.items)} images (every class x the number of images): at most "
                        f"{MAX_IMAGES} a request; pick a class or fewer images")
    return args, plan, settings


def _run(models: Models, loaded: LoadedModel, request: GenerateRequest, progress: Progress | None,
         inputs: dict[str, Image.Image] | None = None) -> tuple[list[Result], Path]:
    """Run sample.py's plan for a request; `inputs` (image, mask, low_res) are written as NAME.png
    (low_res as input.png) and passed as the files of the matching options."""
    check_request(request)
    models.requests += 1
    out = models.workdir / f"request-{models.requests:04d}"
    out.mkdir(parents=True)
    try:
        shown, real = dict(out=None), dict(out=str(out))
        for name, picture in (inputs or {}).items():
            file = "input.png" if name == "low_res" else f"{name}.png"
            picture.save(out / file)
            shown[name], real[name] = file, str(out / file)
        args, plan, settings = _plan(models, loaded, _argv(models, loaded, request, **real), out)
        if progress is not None:
            progress(0, 1)
        images = run_plan(loaded, plan, settings, progress=progress, bar=False)
        results = []
        for index, (tensor, item) in enumerate(zip(images, plan.items)):
            path = out / f"sample_{index:04d}.png"
            save_png(tensor, path, item.meta)  # exactly what sample.py writes
            alone = GenerateRequest(**{**request.__dict__, "seed": item.seed, "num_samples": 1})
            if item.label is not None and request.class_label is None:
                alone.class_label = item.label
            command = "python sample.py " + shlex.join(_argv(models, loaded, alone, **shown))
            with Image.open(path) as png:
                results.append(Result(png.convert("RGB"), dict(png.text), path, command))
    except BaseException:
        release(out)  # a refused or failed request leaves nothing behind
        raise
    return results, out


def release(folder: Path | None) -> None:
    """Delete a request's folder once its response is built (the page serves copies: see app.py)."""
    L.remove_tree(folder)


REQUEST_NUMBERS = {"guidance_scale": "the guidance scale", "classifier_scale": "the classifier scale",
                   "clip_scale": "the CLIP scale", "guidance_rescale": "the CFG rescale",
                   "dynamic_threshold": "the dynamic threshold", "aug_level": "the aug level"}


def check_request(request: GenerateRequest) -> None:
    """Numbers from the page, refused in the page's words before they become sample.py options: a NaN
    guidance scale would give black images without an error."""
    values = {name: getattr(request, name) for name in REQUEST_NUMBERS}
    for name, value in values.items():
        if value is not None and not math.isfinite(float(value)):
            raise UserError(f"{REQUEST_NUMBERS[name]} must be a finite number, got {value}")
    if request.guidance_interval is not None and not all(math.isfinite(float(v)) for v in request.guidance_interval):
        raise UserError(f"the guidance interval must be finite numbers, got {request.guidance_interval}")
    if request.guidance_scale is not None and request.guidance_scale < 0:
        raise UserError(f"the guidance scale must be >= 0 (0 unconditional, 1 conditional), got {request.guidance_scale}")


def generate(models: Models, request: GenerateRequest, progress: Progress | None = None) -> list[Result]:
    """Images for a class, a prompt or neither, as sample.py would write them."""
    return _run(models, models.base, request, progress)[0]


def batch_command(models: Models, request: GenerateRequest, inpaint: bool = False) -> str:
    """The sample.py command reproducing a whole request (in-painting reads image.png and mask.png)."""
    loaded = models.inpainter if inpaint else models.base
    files = dict(image="image.png", mask="mask.png") if inpaint else {}
    return "python sample.py " + shlex.join(_argv(models, loaded, request, **files))


def paint_mask_from_layers(size: tuple[int, int], layers: list[np.ndarray | Image.Image]) -> Image.Image:
    """A mask file (L, white = generate) from brush layers: painted wherever a layer is not transparent."""
    if len(layers) > L.MAX_LAYERS:
        raise UserError(f"the request has {len(layers)} brush layers: at most {L.MAX_LAYERS}")
    budget = L.PixelBudget()
    budget.take(size)
    for index, layer in enumerate(layers):
        if isinstance(layer, Image.Image):
            budget.take(layer.size, f"brush layer {index + 1}")
        elif layer is not None:
            shape = np.shape(layer)
            budget.take((shape[1], shape[0]) if len(shape) >= 2 else (0, 0), f"brush layer {index + 1}")
    painted = np.zeros((size[1], size[0]), dtype=bool)
    for layer in layers:
        if layer is None:
            continue
        layer = layer if isinstance(layer, Image.Image) else Image.fromarray(np.asarray(layer))
        alpha = layer.convert("RGBA").getchannel("A")
        if alpha.size != size:  # resized, the painted region would move against the image
            raise UserError(f"the mask layer is {alpha.size[0]}x{alpha.size[1]} but the image is {size[0]}x{size[1]}: "
                            "paint the mask on the image itself")
        painted |= np.asarray(alpha) > 0
    return Image.fromarray(painted.astype(np.uint8) * 255, mode="L")


def check_upload(image: Image.Image | None, what: str = "image") -> Image.Image:
    if image is None:
        raise UserError(f"upload an {what} first")
    L.PixelBudget().take(image.size, what)  # before convert(): a lazily opened file is not decoded yet
    return image.convert("RGB")


def inpaint(models: Models, image: Image.Image, paint_mask: Image.Image | np.ndarray, request: GenerateRequest,
            progress: Progress | None = None) -> InpaintResult:
    """Regenerate the white region of `paint_mask` (same size as `image`) with sample.py --image --mask.

    The in-painting run is used when given (method channels by default), else the base run (replace).
    """
    image = check_upload(image)
    mask = paint_mask if isinstance(paint_mask, Image.Image) else Image.fromarray(np.asarray(paint_mask))
    mask = mask.convert("L")
    if mask.size != image.size:
        raise UserError(f"the mask is {mask.size[0]}x{mask.size[1]} but the image is {image.size[0]}x{image.size[1]}")
    if not np.asarray(mask).any():
        raise UserError("no mask painted: paint the region to regenerate with the brush")
    results, out = _run(models, models.inpainter, request, progress, {"image": image, "mask": mask})
    with Image.open(out / "strip_0000.png") as strip:
        picture = strip.convert("RGB")
    return InpaintResult(picture, results, [out / "image.png", out / "mask.png"])


def coverage_warning(models: Models, paint_mask: Image.Image) -> str | None:
    """sample.py's warning for a mask that leaves (almost) nothing to generate or to keep."""
    res = models.inpainter.cfg.data.resolution
    with tempfile.TemporaryDirectory(dir=models.workdir) as folder:
        path = Path(folder) / "coverage-mask.png"
        paint_mask.save(path)
        return inpaint_files.coverage_warning(inpaint_files.load_mask(path, res))


def model_input(models: Models, image: Image.Image) -> Image.Image:
    """The image as the in-painting model sees it: resized and centre-cropped to its resolution."""
    with tempfile.TemporaryDirectory(dir=models.workdir) as folder:
        path = Path(folder) / "model-input.png"
        image.convert("RGB").save(path)
        return to_pil(inpaint_files.load_image(path, models.inpainter.cfg.data.resolution)[0])


def example_images(models: Models, side: int, count: int = 4) -> list[Path]:
    """A few images of the in-painting run's built-in dataset (shapes only: nothing to download),
    enlarged to `side` pixels (nearest), as PNG files for the page's examples."""
    cfg = models.inpainter.cfg
    if cfg.data.name != "shapes":
        return []
    dataset = build_dataset(cfg.data, "test")
    files = []
    for index in range(min(count, len(dataset))):
        path = models.workdir / "examples" / f"shape_{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        to_pil(dataset[index]["image"]).resize((side, side), Image.NEAREST).save(path)
        files.append(path)
    return files


def read_upload(path: str | Path | None, what: str = "image") -> Image.Image:
    """An uploaded file as an RGB image, refused in one line when PIL cannot read it or it is too large."""
    if path is None:
        raise UserError(f"upload an {what} first")
    if not isinstance(path, (str, Path)):
        raise UserError(f"the {what} must be an uploaded file, got {type(path).__name__}")
    L.PixelBudget().file(path, what)  # from the header, before anything is decoded
    # the one reader of every image file: EXIF orientation, 16-bit, palette and alpha as on the command line
    return read_image(path, what=f"the uploaded {what}")


def upscale(models: Models, image: Image.Image, request: GenerateRequest,
            progress: Progress | None = None) -> UpscaleResult:
    """Super-resolve one image with the upsampler: sample.py --checkpoint UP_RUN --low-res input.png.

    The image is resized and centre-cropped to the upsampler's low resolution; the bicubic upsample
    of that input is written beside the result, as sample.py does.
    """
    if models.upsampler is None:
        raise UserError("no upsampler loaded: start the app with --upsampler UP_RUN")
    request = replace(request, num_samples=1)
    if getattr(models.upsampler.model, "condition", "none") == "class" and request.class_label is None:
        raise UserError("the upsampler is class-conditional: pick a class")
    results, out = _run(models, models.upsampler, request, progress, {"low_res": check_upload(image)})
    pictures = {}
    for name in ("lowres", "bicubic"):
        with Image.open(out / f"{name}_0000.png") as png:
            pictures[name] = png.convert("RGB")
    files = [results[0].path, out / "bicubic_0000.png", out / "lowres_0000.png", out / "input.png"]
    return UpscaleResult(pictures["lowres"], pictures["bicubic"], results[0], files)


def upscale_command(models: Models, request: GenerateRequest) -> str:
    """The sample.py command reproducing an upscale (it reads input.png, one of the downloads)."""
    request = replace(request, num_samples=1)
    return "python sample.py " + shlex.join(_argv(models, models.upsampler, request, low_res="input.png"))


def cascade_check(models: Models) -> None:
    """Refuse to cascade when the base's samples are not the upsampler's input size (sample.py's check)."""
    if models.upsampler is None:
        raise UserError("no upsampler loaded: start the app with --upsampler UP_RUN")
    upsample_cli.check_chain(models.base, models.upsampler, str(models.paths.upsampler))


def cascade_source(models: Models, generated: list[str] | None) -> tuple[str, dict[str, str]]:
    """The first image of the last Generate request, and its metadata, as the upscale input."""
    cascade_check(models)
    if not generated:
        raise UserError("generate an image in the Generate tab first")
    path = str(generated[0])
    L.PixelBudget().file(path, "generated image")  # reading PNG text can decode the image: size first
    try:
        with Image.open(path) as png:
            return path, {str(k): str(v) for k, v in dict(getattr(png, "text", {}) or {}).items()}
    except IMAGE_ERRORS as err:
        raise UserError(f"the generated image cannot be read: {first_line(err)}: generate again") from None


__all__ = ["DemoPaths", "Models", "ModelInfo", "GenerateRequest", "Result", "InpaintResult", "SAMPLERS",
           "INPAINT_METHODS", "load_models", "generate", "inpaint", "batch_command", "paint_mask_from_layers",
           "check_upload", "coverage_warning", "example_images", "model_input", "upscale", "UserError",
           "UpscaleResult", "read_upload", "upscale_command", "cascade_check", "cascade_source", "check_request",
           "IMAGE_ERRORS", "first_line", "release"]
