"""Typed run configuration: dataclasses loaded from YAML with dotted command-line overrides.

The resolved config is saved with every run and checkpoint, so a checkpoint alone is enough
to rebuild the model and sample from it.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .config_checks import CHOICES, validate  # noqa: F401 - part of this module's interface
from .errors import UserError, preview
from .structured import (  # noqa: F401 - ConfigLoader, parse_yaml and the limits were defined here first
    MAX_YAML_CHARS, MAX_YAML_VALUES, ConfigDumper, ConfigLoader, expanded_size, load_yaml, parse_yaml,
)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's mapping (an empty file is {}), or a one-line UserError naming the file (binary
    data, syntax errors, duplicate keys, alias bombs, deep nesting, a list instead of a mapping): the
    shared loader of diffusion/structured.py."""
    return load_yaml(path, "config file", dict, "a mapping of config keys", empty={})


@dataclass
class DataConfig:
    name: str = "shapes"  # shapes | cifar10 | celeba | imagefolder
    root: str = "data"
    resolution: int = 32
    split: str = "train"
    hflip: bool = False
    num_workers: int = 0
    pin_memory: bool = False
    download: bool = True
    shapes_size: int = 10000  # number of distinct procedural images
    shapes_seed: int = 0
    celeba_attributes: list[str] = field(default_factory=list)  # class label = bits of these attributes
    celeba_captions: str = "all"  # all: a sentence from the 40 attributes | class: from celeba_attributes alone
    cache: bool = False  # keep decoded, resized images in memory (celeba): for small images on CPUs
    subset_size: int = 0  # >0: train on a seeded subset of this many images; smaller ones nest in larger ones
    subset_seed: int = 0


@dataclass
class TextConfig:
    width: int = 128
    layers: int = 2
    heads: int = 4
    context_length: int = 32


@dataclass
class VisionConfig:
    """The CLIP image tower: an open_clip ViT over x_t (task: clip)."""

    width: int = 128
    layers: int = 4
    head_width: int = 32
    patch_size: int = 4  # must divide data.resolution


@dataclass
class ModelConfig:
    condition: str = "none"  # none | class | text
    num_classes: int = 0  # 0 = take it from the dataset
    cond_drop_prob: float = 0.2
    base_channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    layers_per_block: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [16])
    attention_head_dim: int = 32
    dropout: float = 0.0
    scale_shift_norm: bool = True
    inpaint: bool = False
    upsample: bool = False  # a diffusion upsampler: 3 extra input channels (the upsampled low-res image)
    # A pretrained diffusers UNet2DModel's config.json (JSON text; set from init_from): it, not the keys
    # above, lays out the U-Net, with in_channels widened for in-painting channels.
    unet_config: str = ""
    text: TextConfig = field(default_factory=TextConfig)
    # Classifier and CLIP tasks reuse base_channels/channel_mult/... for their encoders.
    pool: str = "attention"  # attention | mean (classifier head)
    embed_dim: int = 128  # CLIP joint embedding width
    vision: VisionConfig = field(default_factory=VisionConfig)  # CLIP image tower


@dataclass
class DiffusionConfig:
    """The formulation and its noise levels.

    ddpm: timesteps 0..T-1 of a beta schedule; the network predicts eps or v.
    edm: Karras et al. 2022; the network is preconditioned (sigma_data), trained on ln(sigma) ~
    N(p_mean, p_std^2). sigma_min/sigma_max: the range sigma-space samplers (heun, euler) cover
    (a ddpm model's own range clamps it) and edm guides are trained on.
    """

    formulation: str = "ddpm"  # ddpm | edm
    num_train_timesteps: int = 1000  # ddpm
    beta_schedule: str = "linear"  # ddpm: linear | cosine | scaled_linear | sigmoid
    prediction_type: str = "epsilon"  # ddpm: epsilon | v_prediction | sample (x0)
    # ddpm, as in a diffusers scheduler config (docs/pretrained.md); the defaults are this project's runs.
    beta_start: float = 0.0001  # linear, scaled_linear, sigmoid
    beta_end: float = 0.02
    trained_betas: list[float] = field(default_factory=list)  # explicit betas, one per timestep ([] = beta_schedule)
    clip_sample: bool = True  # sampling clips the predicted x0 to +-clip_sample_range
    clip_sample_range: float = 1.0
    thresholding: bool = False  # Imagen's dynamic thresholding of x0 instead (diffusers' formula)
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    variance_type: str = "fixed_small"  # the ddpm sampler: fixed_small (posterior) | fixed_large (beta_t) | *_log
    timestep_spacing: str = "trailing"  # ddpm, ddim, dpmsolver timesteps: trailing | leading | linspace
    steps_offset: int = 0  # added to leading timesteps
    from_pretrained: str | None = None  # a diffusers pipeline folder or hub name: the keys above come from its scheduler
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5  # edm
    p_mean: float = -1.2  # edm
    p_std: float = 1.2  # edm


@dataclass
class TrainConfig:
    max_steps: int = 10000
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 500
    grad_clip: float = 1.0
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    ema_power: float = 0.75
    seed: int = 0
    log_every: int = 10
    sample_every: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend; aot_eager traces without generating kernels (debugging)
    channels_last: bool = True
    allow_tf32: bool = True
    caption_word_drop: float = 0.0  # CLIP task: drop each caption word (not the first) with this probability
    loss_spike: float = 3.0  # stop when a logged loss exceeds this many times the lowest so far (0 = off)
    keep_checkpoint_steps: list[int] = field(default_factory=list)  # never deleted by keep_checkpoints rotation
    # Post-hoc EMA (EDM2): power-function EMAs of these relative widths, t in optimizer steps, with a snapshot
    # every posthoc_ema_every steps in RUN/posthoc/snapshots (python -m diffusion.ema reconstruct; docs/training.md)
    posthoc_ema: bool = False
    posthoc_ema_sigma_rels: list[float] = field(default_factory=lambda: [0.05, 0.10])
    posthoc_ema_every: int = 500
    posthoc_ema_fp16: bool = False  # store snapshots in float16 (half the disk; tracking stays float32)


@dataclass
class SampleConfig:
    """Defaults for the sample grids written during training (and for sample.py)."""

    sampler: str = "ddim"  # ddpm | ddim | dpmsolver | heun | euler
    steps: int = 50  # heun: 2 * steps - 1 network evaluations
    guidance_scale: float = 3.0
    rho: float = 7.0  # heun, euler: Karras' sigma spacing
    churn: float = 0.0  # heun, euler: EDM's S_churn (0 = deterministic)
    churn_min: float = 0.0  # S_tmin: churn only at sigma >= this
    churn_max: float = 1000.0  # S_tmax: ... and <= this
    churn_noise: float = 1.0  # S_noise
    num_samples: int = 16  # training preview: this many in all; sample.py: its --num-samples default (per condition)
    prompts: list[str] = field(default_factory=list)  # caption models: preview prompts (default: first batch's captions)


@dataclass
class InpaintConfig:
    """Training masks for in-painting models (model.inpaint: true).

    Each training image gets one mask type, drawn with the relative weights below, except for a
    fraction of all-known and all-unknown masks. Sizes are fractions of the image side.
    """

    box: float = 1.0  # weight of random rectangles
    strokes: float = 1.0  # weight of free-form brush strokes
    half: float = 1.0  # weight of half-image masks (left, right, top or bottom half unknown)
    border: float = 1.0  # weight of outpainting borders (unknown frame around a known centre)
    all_known: float = 0.05  # fraction of masks with every pixel known
    all_unknown: float = 0.1  # fraction with no pixel known (plain generation)
    max_boxes: int = 2
    box_size: list[float] = field(default_factory=lambda: [0.25, 0.6])  # side range of each box
    max_strokes: int = 4
    stroke_width: list[float] = field(default_factory=lambda: [0.06, 0.15])
    stroke_vertices: int = 5  # segments per stroke
    border_size: list[float] = field(default_factory=lambda: [0.1, 0.3])  # width range of each border side


@dataclass
class UpsampleConfig:
    """Diffusion upsamplers (model.upsample: true): data.resolution is the high resolution.

    Low-res inputs are made from the real image on the fly: downsampled by `factor` (`downsample`),
    quantised to 8 bits, then interpolated back up (`upsample`) and concatenated to x_t. Noise
    augmentation: during training the upsampled low-res is noised to a level drawn uniformly from
    `aug_noise` (fractions of diffusion.num_train_timesteps; 0 = clean), with the model's own
    alpha_bar table, and the model is told the level; edm models give both in sigma (low + sigma n).
    `aug_level` is the sampling default, and so is
    `consistency`: project every step's predicted x0 so that it downsamples to the low-res input.
    """

    factor: int = 4
    downsample: str = "area"  # area | bicubic | bilinear
    upsample: str = "bilinear"  # bilinear | bicubic | nearest
    aug_noise: list[float] = field(default_factory=lambda: [0.0, 0.5])
    aug_level: float = 0.1
    quantise: bool = True
    consistency: bool = True


@dataclass
class Config:
    task: str = "denoiser"  # denoiser | classifier | clip
    output_dir: str = "runs/default"
    init_from: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    inpaint: InpaintConfig = field(default_factory=InpaintConfig)
    upsample: UpsampleConfig = field(default_factory=UpsampleConfig)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of a config dataclass, for error messages."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key(key: Any, cls: type, prefix: str) -> UserError:
    valid = all_keys(cls, prefix)
    near = difflib.get_close_matches(prefix + str(key)[:100], valid, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(near)}?" if near else f"valid keys: {', '.join(valid)}"
    return UserError(f"unknown config key {preview(prefix + str(key))}: {hint}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a type hint, allowing int -> float and list/tuple interchange."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UserError as err:
                errors.append(err)
        raise errors[0]
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' expects a list, got {preview(value)}")
        return [_coerce(v, item, key) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            also = " (write true or false)" if hint is bool else ""
            raise UserError(f"config key '{key}' expects {hint.__name__}{also}, got {preview(value)}")
        return value
    raise UserError(f"config key '{key}' has unsupported type {hint}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build a config dataclass from nested dicts, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(key, cls, prefix)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, {} if value is None else value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, prefix + key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _hint(key: str) -> Any:
    """The type hint of a dotted config key, or None if there is no such key."""
    cls: Any = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls) or part not in {f.name for f in dataclasses.fields(cls)}:
            return None
        cls = typing.get_type_hints(cls)[part]
    return cls


def _is_text(hint: Any) -> bool:
    return hint is str or set(typing.get_args(hint)) == {str, type(None)}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` strings (values parsed as YAML) to a nested dict. A text key takes
    a value YAML reads as a number or boolean as written (`data.root=1e3` is "1e3")."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {preview(item)} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        hint = _hint(key)
        try:
            value = parse_yaml(raw, f"the value of override {preview(key)}") if raw != "" else ""
        except yaml.YAMLError as err:
            if not _is_text(hint):
                problem = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise UserError(f"override {preview(item)}: the value is not valid YAML ({problem})") from None
            value = raw
        if _is_text(hint) and not isinstance(value, (str, list, dict)) and not (value is None and hint is not str):
            value = raw  # a number, date or boolean in YAML, text here
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:  # absent, or an empty section in the file
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise UserError(f"override {preview(key)}: {preview(part)} is not a config section")
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Config:
    """Load a YAML config file (or the defaults), apply overrides, and validate. `prepare` completes the
    raw mapping first (train.py passes `checkpoints.diffusers_folder.fill_from_pretrained`, which fills
    `diffusion:` and the U-Net from a pretrained diffusers folder; config stays below checkpoints)."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
    data = apply_overrides(data, overrides or [])
    if prepare is not None:
        data = prepare(data)
    return validate(from_dict(Config, data))


def save_config(cfg: Config, path: str | Path) -> None:
    from .io import atomic_write_text

    atomic_write_text(Path(path), yaml.dump(to_dict(cfg), Dumper=ConfigDumper, sort_keys=False))
