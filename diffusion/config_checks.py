"""Every config value checked before anything is built: one line naming the key, the rule and a
short preview of the value, never a traceback deep in a run (or at its first preview, after an hour).

The checks are about values no run can use (out of range, of no use to the model, not text). Whether
a run of that size fits the machine is checked when the device is known (diffusion.training.memory).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator

from .checkpoints.pretrained_checks import check_pretrained_settings
from .config_readers import check_combinations
from .errors import UserError, preview

CHOICES: dict[str, tuple[str, ...]] = {
    "task": ("denoiser", "classifier", "clip"),
    "data.name": ("shapes", "cifar10", "celeba", "imagefolder"),
    "data.celeba_captions": ("all", "class"),
    "model.condition": ("none", "class", "text"),
    "model.pool": ("attention", "mean"),
    "diffusion.formulation": ("ddpm", "edm"),
    "diffusion.beta_schedule": ("linear", "cosine", "scaled_linear", "sigmoid"),
    "diffusion.prediction_type": ("epsilon", "v_prediction", "sample"),
    "diffusion.variance_type": ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),
    "diffusion.timestep_spacing": ("trailing", "leading", "linspace"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "train.compile_backend": ("inductor", "aot_eager", "eager"),
    "sample.sampler": ("ddpm", "ddim", "dpmsolver", "heun", "euler"),
    "upsample.downsample": ("area", "bicubic", "bilinear"),
    "upsample.upsample": ("bilinear", "bicubic", "nearest"),
}
SEED_LIMIT = 2**32  # numpy's seeds (accelerate's set_seed seeds numpy too)
MAX_TIMESTEPS = 100_000  # the noise tables and a DDPM sample grow with it; papers use 1000-4000
MAX_WIDTH = 16_384  # channels of the widest U-Net level (base_channels x largest channel_mult)
MAX_LAYERS = 64  # blocks per U-Net level, or transformer layers: each is built, even on the meta device
MAX_DATASET = 10_000_000  # procedural shapes / subset size: every epoch draws a permutation this long
MAX_LOSS_SPIKE = 1e6


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f">= {low:g}"


def _between(low: float, high: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: low <= v <= high), f"in [{low:g}, {high:g}]"


_FRACTION = (lambda v: 0.0 <= v < 1.0), "in [0, 1)"
_POSITIVE = (lambda v: v > 0), "> 0"
_SEED = (lambda v: 0 <= v < SEED_LIMIT), "in [0, 2^32)"
# Numeric limits: a bad value fails in one line, not deep in a run.
LIMITS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{key: _at_least(1) for key in (
        "train.max_steps", "train.batch_size", "train.grad_accum", "train.log_every", "train.checkpoint_every",
        "data.resolution", "model.base_channels", "model.layers_per_block", "model.attention_head_dim",
        "sample.steps", "sample.num_samples", "model.embed_dim", "model.text.width", "model.text.layers",
        "model.text.heads", "model.vision.width", "model.vision.layers", "model.vision.head_width",
        "model.vision.patch_size", "inpaint.max_boxes", "inpaint.max_strokes", "inpaint.stroke_vertices")},
    **{key: _at_least(0) for key in (
        "data.num_workers", "train.warmup_steps", "train.sample_every", "train.keep_checkpoints",
        "train.weight_decay", "train.grad_clip", "model.num_classes", "sample.guidance_scale", "data.subset_size",
        "inpaint.box", "inpaint.strokes", "inpaint.half", "inpaint.border", "inpaint.all_known", "inpaint.all_unknown")},
    **{key: _FRACTION for key in ("model.cond_drop_prob", "train.caption_word_drop", "train.ema_decay", "model.dropout")},
    **{key: _POSITIVE for key in ("train.lr", "train.ema_power", "diffusion.sigma_min", "diffusion.sigma_data",
                                  "diffusion.p_std", "sample.rho", "sample.churn_noise")},
    **{key: _at_least(0) for key in ("sample.churn", "sample.churn_min")},
    **{key: _SEED for key in ("train.seed", "data.shapes_seed", "data.subset_seed")},
    "diffusion.num_train_timesteps": _between(1, MAX_TIMESTEPS),
    **{key: ((lambda v: 0 < v < 1), "in (0, 1)") for key in ("diffusion.beta_start", "diffusion.beta_end")},
    **{key: _POSITIVE for key in ("diffusion.clip_sample_range", "diffusion.sample_max_value")},
    "diffusion.dynamic_thresholding_ratio": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    "diffusion.steps_offset": _between(0, MAX_TIMESTEPS),
    **{key: _between(1, MAX_LAYERS) for key in ("model.layers_per_block", "model.text.layers", "model.vision.layers")},
    **{key: _between(1, MAX_WIDTH) for key in (
        "model.attention_head_dim", "model.embed_dim", "model.text.width", "model.text.heads", "model.vision.width",
        "model.vision.head_width", "model.vision.patch_size")},
    "data.shapes_size": _between(1, MAX_DATASET),
    "data.subset_size": _between(0, MAX_DATASET),
    "model.text.context_length": _between(3, 4096),  # start and end tokens, and one word
    "train.loss_spike": ((lambda v: v == 0 or 1 < v <= MAX_LOSS_SPIKE), f"0 (off) or in (1, {MAX_LOSS_SPIKE:g}]"),
}


def flat_items(cfg: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every leaf of a config dataclass instance."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from flat_items(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, value


def check_values(cfg: Any) -> None:
    """Choices, finite floats, text that is UTF-8 without NUL bytes, and LIMITS."""
    values = dict(flat_items(cfg))
    for key, options in CHOICES.items():
        if values[key] not in options:
            raise UserError(f"config key '{key}' must be one of {', '.join(options)}; got {preview(values[key])}")
    for key, value in values.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise UserError(f"config key '{key}' must be a finite number; got {item}")
            if isinstance(item, str):
                check_text(key, item)
    for key, (ok, wanted) in LIMITS.items():
        if key in values and not ok(values[key]):
            raise UserError(f"config key '{key}' must be {wanted}; got {preview(values[key])}")
    for key in ("output_dir", "init_from"):
        if values[key] is not None and not values[key].strip():
            raise UserError(f"config key '{key}' is empty: give a folder")


def check_text(key: str, text: str) -> None:
    """Text values become paths, file contents and PNG metadata: refuse what none of them can hold."""
    if "\0" in text:
        raise UserError(f"config key '{key}' holds a NUL character: {preview(text)}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"config key '{key}' is not valid UTF-8 text: {preview(text)}") from None


def check_unet(cfg: Any) -> None:
    """channel_mult and widths that give a buildable U-Net at data.resolution."""
    model, res = cfg.model, cfg.data.resolution
    mult = model.channel_mult
    if not mult or min(mult) < 1:
        raise UserError(f"config key 'model.channel_mult' must list one positive multiplier per resolution level "
                        f"(e.g. [1, 2, 2]); got {preview(mult)}")
    if len(mult) > 12:
        raise UserError(f"config key 'model.channel_mult' has {len(mult)} levels; at most 12 (one halving each)")
    if res % (2 ** (len(mult) - 1)):
        raise UserError(f"config key 'data.resolution' ({res}) must be divisible by 2^{len(mult) - 1} "
                        "(one halving per extra model.channel_mult level)")
    if model.base_channels * max(mult) > MAX_WIDTH:
        raise UserError(f"config key 'model.base_channels' ({model.base_channels}) x the largest model.channel_mult "
                        f"({max(mult)}) is {model.base_channels * max(mult)} channels; at most {MAX_WIDTH}")


def check_towers(cfg: Any) -> None:
    """The text tower (caption models, CLIP) and CLIP's image tower: widths that split into heads."""
    model = cfg.model
    if model.condition == "text" or cfg.task == "clip":
        if model.text.width % model.text.heads:
            raise UserError(f"config key 'model.text.width' ({model.text.width}) must be divisible by "
                            f"model.text.heads ({model.text.heads})")
    if cfg.task == "clip":
        vision = model.vision
        if cfg.data.resolution % vision.patch_size:
            raise UserError(f"config key 'model.vision.patch_size' ({vision.patch_size}) must divide data.resolution "
                            f"({cfg.data.resolution})")
        if vision.width % vision.head_width:
            raise UserError(f"config key 'model.vision.width' ({vision.width}) must be divisible by "
                            f"model.vision.head_width ({vision.head_width})")


def check_sampling(cfg: Any) -> None:
    """sample.* as the training previews (and sample.py's defaults) will use them."""
    total = cfg.diffusion.num_train_timesteps
    trailing = cfg.diffusion.formulation == "ddpm" and cfg.sample.sampler not in ("heun", "euler")
    if cfg.diffusion.sigma_max <= cfg.diffusion.sigma_min:
        raise UserError(f"config key 'diffusion.sigma_max' ({cfg.diffusion.sigma_max:g}) must be above "
                        f"diffusion.sigma_min ({cfg.diffusion.sigma_min:g})")
    if trailing and cfg.sample.steps > total:
        raise UserError(f"config key 'sample.steps' ({cfg.sample.steps}) must be at most diffusion.num_train_timesteps "
                        f"({total}): a sampler cannot take more steps than the model has timesteps")
    for prompt in cfg.sample.prompts:
        if len(prompt) > 10_000:
            raise UserError(f"config key 'sample.prompts' holds a prompt of {len(prompt)} characters; at most 10000")


MASK_TYPES = ("box", "strokes", "half", "border")


def check_inpaint(inpaint: Any) -> None:
    """In-painting training masks (model.inpaint): weights, fractions and size ranges that give sensible masks."""
    weights = [getattr(inpaint, kind) for kind in MASK_TYPES]
    if min(weights) < 0 or sum(weights) <= 0:
        raise UserError(f"inpaint.{'/'.join(MASK_TYPES)} are mask-type weights: non-negative, at least one positive")
    if inpaint.all_known < 0 or inpaint.all_unknown < 0 or inpaint.all_known + inpaint.all_unknown > 1:
        raise UserError("inpaint.all_known and inpaint.all_unknown are fractions that add up to at most 1")
    for key, limit in (("box_size", 1.0), ("stroke_width", 1.0), ("border_size", 0.5)):
        value = getattr(inpaint, key)
        if len(value) != 2 or not 0 < value[0] <= value[1] <= limit:
            raise UserError(f"inpaint.{key} must be [low, high] with 0 < low <= high <= {limit}; got {preview(value)}")
    if inpaint.max_boxes < 1 or inpaint.max_strokes < 1 or inpaint.stroke_vertices < 1:
        raise UserError("inpaint.max_boxes, inpaint.max_strokes and inpaint.stroke_vertices must be at least 1")
    if max(inpaint.max_boxes, inpaint.max_strokes, inpaint.stroke_vertices) > 1000:
        raise UserError("inpaint.max_boxes, inpaint.max_strokes and inpaint.stroke_vertices must be at most 1000")


def check_upsample(cfg: Any) -> None:
    """Upsampler settings (model.upsample) that can work."""
    up = cfg.upsample
    if cfg.model.inpaint:
        raise UserError("model.inpaint and model.upsample cannot both be on: train an in-painting model or an upsampler")
    if up.factor < 2 or cfg.data.resolution % up.factor:
        raise UserError(f"upsample.factor must be >= 2 and divide data.resolution={cfg.data.resolution}; got {up.factor}")


def check_upsample_noise(cfg: Any) -> None:
    """The upsampler's noise-conditioning augmentation: a fraction of the timesteps, or sigma on edm."""
    up = cfg.upsample
    top, unit = (math.inf, "sigma") if cfg.diffusion.formulation == "edm" else (1.0, "a fraction of the timesteps")
    if len(up.aug_noise) != 2 or not 0.0 <= up.aug_noise[0] <= up.aug_noise[1] <= top:
        raise UserError(f"upsample.aug_noise must be [low, high] with 0 <= low <= high <= {top:g} ({unit}); "
                        f"got {preview(up.aug_noise)}")
    if not 0.0 <= up.aug_level <= top:
        raise UserError(f"upsample.aug_level must be in [0, {top:g}] ({unit}); got {preview(up.aug_level)}")


def validate(cfg: Any) -> Any:
    """Refuse values no run can use, in one line naming the key, then values that are meaningless together
    (diffusion.config_readers: keys this config's run never reads, class counts, ...); returns `cfg`."""
    check_values(cfg)
    check_unet(cfg)
    check_towers(cfg)
    check_sampling(cfg)
    check_pretrained_settings(cfg)
    check_upsample_noise(cfg)
    if cfg.model.inpaint:
        check_inpaint(cfg.inpaint)
    if cfg.model.upsample:
        check_upsample(cfg)
    check_combinations(dict(flat_items(cfg)), dict(flat_items(type(cfg)())))
    return cfg
