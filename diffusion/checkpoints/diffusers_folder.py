"""Published diffusers pipeline folders (DDPMPipeline, DDIMPipeline, PNDMPipeline) read like our own runs.

A folder is `model_index.json` plus its `unet` (a UNet2DModel) and `scheduler` components, each in its
own sub-folder (`unet/config.json`, `scheduler/scheduler_config.json`) or, as the oldest hub repos
(google/ddpm-cifar10-32) keep them, at the folder's root: diffusers reads both layouts, so do we.
Reading one means synthesising the `Config` our loaders build from (`folder_config`):

- `model.unet_config` holds the U-Net's own config.json, so `build_model` lays the U-Net out exactly as
  the folder's (and widens its input for in-painting channels when fine-tuning);
- `diffusion:` takes the scheduler's settings (`scheduler_settings`): betas (trained_betas, or
  beta_schedule with beta_start/end), prediction type, x0 clipping or thresholding, variance type,
  timestep spacing, each with the scheduler class's own default where its file is silent (a PNDM
  scheduler does not clip, a DDPM one's spacing is "leading");
- `data.resolution` is the U-Net's sample_size.

Latent pipelines (a `vae` or `vqvae` component), conditional U-Nets (UNet2DConditionModel, class
embeddings) and learned variances are refused in one line. A hub name (owner/name) that is not a
local path is downloaded with `huggingface_hub.snapshot_download` into the hub's cache; offline, the
refusal names the model and how to pass a local folder.

Torch-free until weights or a scheduler class's defaults are read (config loading imports it).
"""
from __future__ import annotations

import inspect
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from ..config_readers import show
from ..errors import UserError, first_line, preview
from ..structured import load_json
from .pretrained_checks import parse_unet_config, sample_size

MODEL_INDEX = "model_index.json"
UNET_FILE = "config.json"
SCHEDULER_FILE = "scheduler_config.json"
LATENT_COMPONENTS = ("vae", "vqvae")
PIXEL_PIPELINES = "DDPMPipeline, DDIMPipeline or PNDMPipeline"
HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
HUB_FILES = ["*.json", "*.safetensors", "*.bin"]
# This project's own output folders (git-ignored; every config's output_dir is runs/NAME): `runs/shapes` is a
# local run not trained yet, never a hub model, so a fresh clone's `init_from: runs/shapes` does not go online.
LOCAL_ROOTS = ("runs", "samples", "data")
# diffusers' beta_schedule names -> ours (config_checks.CHOICES)
BETA_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine", "scaled_linear": "scaled_linear",
                  "sigmoid": "sigmoid"}
# Keys that define the noise the U-Net was trained on: a config that sets them otherwise conflicts.
SCHEDULE_KEYS = ("formulation", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas",
                 "prediction_type")


# ---- where a folder is -------------------------------------------------------------------------

def looks_like_hub_name(text: str) -> bool:
    """`owner/name` that is not a local path: one slash, hub characters, no local folder `owner`, and `owner`
    not one of this project's output folders (LOCAL_ROOTS)."""
    owner = text.split("/")[0]
    return (bool(HUB_NAME.match(text)) and owner not in LOCAL_ROOTS and not Path(text).exists()
            and not Path(owner).is_dir())


def hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def download(name: str) -> Path:
    """The local snapshot of hub model `name` (huggingface_hub's cache), or a one-line UserError: offline,
    unreachable, or no such model."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a dependency of diffusers
        raise UserError(f"{name} is not a local folder, and huggingface_hub is not installed to download it: "
                        "pass --checkpoint DIR, a local pipeline folder") from None
    how = (f"download it where there is network (hf download {name} --local-dir DIR) and pass the local folder "
           "DIR instead")
    offline = hub_offline()
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES, local_files_only=offline))
    except Exception as err:  # the hub client's errors vary by version; each becomes one line
        kind = type(err).__name__
        if kind in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError") and not offline:
            raise UserError(f"{name} is not a local folder, and the Hugging Face hub has no model by that name that "
                            f"can be read ({kind}): check the name, or pass a local folder") from None
        state = ("HF_HUB_OFFLINE is set and it is not in the local hub cache" if offline else
                 f"the Hugging Face hub cannot be reached ({first_line(err, 120)})")
        raise UserError(f"{name} is not a local folder and cannot be downloaded: {state}; {how}") from None


def resolve_source(source: str | Path) -> Path:
    """A local path as it is; a hub name (see `looks_like_hub_name`) downloaded; else 'checkpoint not found'."""
    text = str(source)
    if Path(text).exists():
        return Path(text)
    if looks_like_hub_name(text):
        return download(text)
    raise UserError(f"checkpoint not found: {text}")


def is_own_checkpoint(path: Path) -> bool:
    """A folder this project wrote (a checkpoint, `final/`, or a run): read by store, not here."""
    return ((path / "config.yaml").is_file() and (path / "ema.safetensors").is_file()) or (path / "checkpoints").is_dir()


def is_diffusers_folder(path: Path) -> bool:
    """A diffusers pipeline folder (model_index.json) that is not one of our checkpoints (whose `final/`
    has a model_index.json too)."""
    return path.is_dir() and (path / MODEL_INDEX).is_file() and not is_own_checkpoint(path)


# ---- what a folder holds -----------------------------------------------------------------------

def _json(path: Path, what: str) -> dict[str, Any]:
    return load_json(path, what, dict, "a JSON object")


def read_index(folder: Path) -> dict[str, Any]:
    """model_index.json, after refusing what this pixel-space codebase cannot sample: latent pipelines,
    conditional U-Nets, and any component beside `unet` and `scheduler` (text encoders, tokenizers)."""
    index = _json(folder / MODEL_INDEX, "pipeline index")
    pipeline = preview(index.get("_class_name", "a pipeline"))
    parts = {k: v for k, v in index.items() if not k.startswith("_") and v not in (None, [None, None])}
    for key in LATENT_COMPONENTS:
        if key in parts:
            raise UserError(f"{folder} is a latent diffusion pipeline ({pipeline}: its {MODEL_INDEX} lists a {key}): "
                            f"this codebase samples in pixel space; use a pixel-space folder ({PIXEL_PIPELINES})")
    unet = _class_of(parts.get("unet"))
    if unet == "UNet2DConditionModel":
        raise UserError(f"{folder} holds a conditional U-Net ({pipeline}, UNet2DConditionModel): not supported yet; "
                        f"use an unconditional UNet2DModel pipeline ({PIXEL_PIPELINES})")
    if unet != "UNet2DModel" or "scheduler" not in parts:
        has = ", ".join(f"{k}: {_class_of(v)}" for k, v in parts.items()) or "no components"
        raise UserError(f"{folder}/{MODEL_INDEX} ({pipeline}) must name a UNet2DModel 'unet' and a 'scheduler' "
                        f"({PIXEL_PIPELINES}); it has {preview(has, 120)}")
    extra = sorted(set(parts) - {"unet", "scheduler"})
    if extra:
        raise UserError(f"{folder} ({pipeline}) has components this codebase does not drive ({', '.join(extra)}): "
                        f"only unconditional pipelines are read ({PIXEL_PIPELINES})")
    return index


def _class_of(entry: Any) -> str:
    return str(entry[1]) if isinstance(entry, (list, tuple)) and len(entry) == 2 else preview(entry)


def component_dir(folder: Path, name: str, config_file: str) -> Path:
    """The folder holding component `name`: `folder/name`, or the folder itself (flat hub layout)."""
    for place in (folder / name, folder):
        if (place / config_file).is_file():
            return place
    raise UserError(f"{folder} has no {name}/{config_file} (nor {config_file} at its root): the pipeline folder is "
                    "incomplete; download it again")


def scheduler_settings(folder: Path) -> dict[str, Any]:
    """The `diffusion:` keys of the folder's scheduler: its config file over its class's defaults."""
    index = read_index(folder)
    where = component_dir(folder, "scheduler", SCHEDULER_FILE) / SCHEDULER_FILE
    given = _json(where, "scheduler config")
    return settings_of_scheduler(given, given.get("_class_name") or _class_of(index["scheduler"]), str(where))


def settings_of_scheduler(given: dict[str, Any], name: Any, where: str) -> dict[str, Any]:
    """The `diffusion:` keys of a scheduler config `given` of class `name` (its defaults fill what it
    leaves out), or a one-line refusal naming `where`."""
    merged = {**_class_defaults(name, where), **{k: v for k, v in given.items() if not k.startswith("_")}}
    # A DDPM-style scheduler has betas (beta_schedule or trained_betas) over num_train_timesteps; EDM's (sigma_data)
    # and variance-exploding ones (ScoreSdeVeScheduler: sigma_min/max, no betas) describe other noise.
    betas_given = "beta_schedule" in merged or "trained_betas" in merged
    if "sigma_data" in merged or "num_train_timesteps" not in merged or not betas_given:
        raise UserError(f"{where}: {preview(name)} is not a DDPM-style scheduler (betas over timesteps); "
                        "only those are read")
    if merged.get("rescale_betas_zero_snr"):
        raise UserError(f"{where}: rescale_betas_zero_snr (a zero terminal SNR) is not supported: its last noise "
                        "level is infinite")
    variance = merged.get("variance_type") or "fixed_small"  # DDIM and PNDM schedulers have none
    if variance in ("learned", "learned_range"):
        raise UserError(f"{where}: variance_type {variance} (a U-Net that predicts its variance) is not supported; "
                        "fixed_small, fixed_large and their _log forms are")
    schedule = merged.get("beta_schedule", "linear")
    betas = merged.get("trained_betas")
    if betas is None and schedule not in BETA_SCHEDULES:
        raise UserError(f"{where}: beta_schedule {preview(schedule)} is not supported; use one of "
                        f"{', '.join(BETA_SCHEDULES)}")
    settings = {
        "formulation": "ddpm", "num_train_timesteps": merged["num_train_timesteps"],
        "beta_schedule": BETA_SCHEDULES.get(schedule, "linear"), "beta_start": merged.get("beta_start", 0.0001),
        "beta_end": merged.get("beta_end", 0.02), "trained_betas": [] if betas is None else betas,
        "prediction_type": merged.get("prediction_type", "epsilon"),
        "clip_sample": merged.get("clip_sample", False), "clip_sample_range": merged.get("clip_sample_range", 1.0),
        "thresholding": merged.get("thresholding", False),
        "dynamic_thresholding_ratio": merged.get("dynamic_thresholding_ratio", 0.995),
        "sample_max_value": merged.get("sample_max_value", 1.0), "variance_type": variance,
        "timestep_spacing": merged.get("timestep_spacing", "leading"), "steps_offset": merged.get("steps_offset", 0),
    }
    _check_settings(settings, where)
    return settings


def _class_defaults(name: Any, where: str) -> dict[str, Any]:
    """The keyword defaults of diffusers scheduler class `name` (what its config means when silent)."""
    import diffusers

    cls = getattr(diffusers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise UserError(f"{where}: {preview(name)} is not a diffusers scheduler class")
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _check_settings(settings: dict[str, Any], where: str) -> None:
    """The settings as config values (types and ranges), each fault named with the scheduler file."""
    from ..config import Config, DiffusionConfig, from_dict
    from ..config_checks import check_values

    from .pretrained_checks import check_pretrained_settings

    try:
        cfg = Config(diffusion=from_dict(DiffusionConfig, settings, "diffusion."))
        check_values(cfg)
        check_pretrained_settings(cfg)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None


def unet_config(folder: Path) -> tuple[Path, dict[str, Any]]:
    """(the U-Net's folder, its checked config.json): an unconditional RGB UNet2DModel."""
    unet_dir = component_dir(folder, "unet", UNET_FILE)
    where = unet_dir / UNET_FILE
    config = _json(where, "U-Net config")
    parse_unet_config(json.dumps(config), str(where))
    if config.get("in_channels", 3) != 3:
        raise UserError(f"{where}: in_channels is {preview(config.get('in_channels'))}, not 3 (RGB): U-Nets that read "
                        "extra channels are not read from diffusers folders")
    return unet_dir, config


def config_text(config: dict[str, Any]) -> str:
    """A U-Net config as `model.unet_config` holds it: without diffusers' bookkeeping keys, sorted."""
    return json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True)


def folder_config(folder: Path):
    """The `Config` a diffusers folder samples, evaluates and fine-tunes as (see the module docstring)."""
    from ..config import Config, DataConfig, DiffusionConfig, ModelConfig, from_dict, validate

    settings = scheduler_settings(folder)
    unet_dir, unet = unet_config(folder)
    size = sample_size(unet, str(unet_dir / UNET_FILE))
    levels = len(unet.get("block_out_channels", (64,)))
    cfg = Config(output_dir=str(folder),
                 data=DataConfig(name="imagefolder", root=str(folder), resolution=size),
                 model=ModelConfig(condition="none", unet_config=config_text(unet), channel_mult=[1] * levels),
                 diffusion=from_dict(DiffusionConfig, settings, "diffusion."))
    try:
        return validate(cfg)
    except UserError as err:
        raise UserError(f"{folder}: {err}") from None


# ---- config files that start from a folder (init_from, diffusion.from_pretrained) -------------

def pretrained_folder(source: Any) -> Path | None:
    """The diffusers folder `source` names (a path, or a hub name: downloaded), or None when it is not one."""
    if not isinstance(source, str) or not source.strip():
        return None
    path = Path(source)
    if path.exists():
        return path if is_diffusers_folder(path) else None
    return download(source) if looks_like_hub_name(source) else None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def fill_from_pretrained(data: dict[str, Any]) -> dict[str, Any]:
    """A raw config mapping completed from a diffusers folder: `diffusion.from_pretrained` (or else a
    diffusers `init_from`) supplies every `diffusion:` key the config leaves out; `init_from` also the
    U-Net's layout (`model.unet_config`), `data.resolution` and `model.condition: none`. A config value
    that changes the noise the U-Net was trained on (SCHEDULE_KEYS) is a conflict, refused in one line;
    a sampling setting the config gives (clipping, variance, spacing) wins, and one line says so."""
    diffusion = data.get("diffusion")
    if diffusion is None:
        diffusion = {}
    if not isinstance(diffusion, dict):
        return data  # from_dict names the bad section
    init_folder = pretrained_folder(data.get("init_from"))
    source = diffusion.get("from_pretrained")
    if source is not None and not isinstance(source, str):
        return data
    folder = pretrained_folder(source) if source else init_folder
    if source and folder is None:
        raise UserError(f"diffusion.from_pretrained {preview(source)} is not a diffusers pipeline folder (no "
                        f"{MODEL_INDEX}); give one, or a hub name such as google/ddpm-cifar10-32")
    if folder is None:
        return data
    name = source or data.get("init_from")
    conflicts, kept = [], []
    for key, value in scheduler_settings(folder).items():
        if key not in diffusion or diffusion[key] is None and key not in SCHEDULE_KEYS:
            diffusion[key] = value
        elif not _same(diffusion[key], value):
            (conflicts if key in SCHEDULE_KEYS else kept).append((f"diffusion.{key}", diffusion[key], value))
    if conflicts:
        said = "; ".join(f"{key}={show(given)} but the folder's is {show(value)}" for key, given, value in conflicts)
        fix = " ".join(f"{key}={show(value)}" for key, _, value in conflicts)
        raise UserError(f"the config conflicts with the scheduler of {name}: {said}; remove those keys from the config "
                        f"(the folder's values are then used) or pass {preview(fix, 200)}")
    if kept:
        print(f"note: sampling settings from the config, not {name}'s scheduler: "
              + "; ".join(f"{key}={show(given)} (the folder's: {show(value)})" for key, given, value in kept))
    data["diffusion"] = diffusion
    if init_folder is not None:
        _fill_model(data, init_folder, data["init_from"])
    return data


def _fill_model(data: dict[str, Any], folder: Path, name: str) -> None:
    """init_from a diffusers folder: its U-Net layout, resolution and (unconditional) condition, unless set."""
    model = data.get("model")
    model = {} if model is None else model
    if not isinstance(model, dict):
        return
    unet_dir, unet = unet_config(folder)
    text = config_text(unet)
    given = model.get("unet_config")
    if given and given != text:
        try:
            same = json.loads(given) == json.loads(text)
        except ValueError:
            same = False
        if not same:
            raise UserError(f"model.unet_config differs from the U-Net of init_from {name}: remove model.unet_config "
                            "(init_from sets it)")
    model["unet_config"] = text
    model.setdefault("condition", "none")
    levels = len(unet.get("block_out_channels", (64,)))
    model.setdefault("channel_mult", [1] * levels)  # unread beside unet_config; keeps the config's checks true
    data["model"] = model
    data_section = data.get("data")
    data_section = {} if data_section is None else data_section
    if isinstance(data_section, dict):
        data_section.setdefault("resolution", sample_size(unet, str(unet_dir / UNET_FILE)))
        data["data"] = data_section
