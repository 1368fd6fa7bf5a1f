"""Start a run from a trained checkpoint's EMA weights (`init_from: PATH` in the config), or from a
published diffusers pipeline folder's U-Net (a local folder or a hub name such as google/ddpm-cifar10-32:
config loading fills the run's U-Net layout and diffusion settings from it, see diffusers_folder.py).

Used to fine-tune an in-painting model or an upsampler from a base model, as GLIDE does: the
U-Net's input convolution is widened for the extra channels (masked image + keep-mask, or the
upsampled low-res image), and the new input channels start at zero; an upsampler's level embedding,
which the base lacks, keeps its zero-output initialisation. So at step 0 the new model predicts
exactly what the base does. Every other parameter must have the same shape as in the base checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..errors import UserError
from . import diffusers_folder
from . import store as ckpt
from .settings import differences

INPUT_CONV = "unet.conv_in.weight"
NEW_MODULES = ("level_embedding.",)  # parameters a base may lack; they keep their (zero-output) init
# Settings the base and the new run must share for "step 0 = the base model" to hold; the weights'
# shapes cannot show them (a U-Net runs at any resolution, under any schedule).
MUST_MATCH = ("data.resolution", "diffusion.formulation", "diffusion.num_train_timesteps", "diffusion.beta_schedule",
              "diffusion.beta_start", "diffusion.beta_end", "diffusion.trained_betas", "diffusion.prediction_type",
              "model.condition", "model.unet_config")


def check_settings(base: Config, cfg: Config, path: str | Path) -> None:
    """Refuse a base trained with another resolution, noise schedule, parameterisation or condition."""
    differ = differences(base, cfg, MUST_MATCH)
    if differ:
        raise UserError(f"init_from {path}: the base run was trained with other settings: {'; '.join(differ)}. "
                        "Set them to the base run's values")


def widen_input(base: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Base input-conv weight (O, C, k, k) padded with zero input channels to target's (O, C + e, k, k)."""
    out = torch.zeros_like(target)
    out[:, : base.shape[1]] = base.to(target.dtype)
    return out


def _fits_widened(name: str, base: torch.Tensor, target: torch.Tensor) -> bool:
    return (name == INPUT_CONV and base.dim() == target.dim() == 4 and base.shape[0] == target.shape[0]
            and base.shape[2:] == target.shape[2:] and base.shape[1] < target.shape[1])


def initialise_from(model: torch.nn.Module, path: str | Path, cfg: Config | None = None) -> dict[str, list[str]]:
    """Load the EMA weights of the checkpoint (or run directory) at `path` into `model`.

    Returns {"widened": [...], "copied": [...]} parameter names. Raises UserError naming the
    first parameters that do not fit, or (given the new run's `cfg`) the settings that differ from
    the base run's, since a silently partial or mismatched start would waste a training run.
    """
    source = diffusers_folder.resolve_source(path)
    if diffusers_folder.is_diffusers_folder(source):  # a published pipeline folder (docs/pretrained.md)
        from .load import pretrained_weights

        directory = source
        if cfg is not None:
            check_settings(diffusers_folder.folder_config(source), cfg, path)
        base = pretrained_weights(source)
        settings_file = source / diffusers_folder.MODEL_INDEX
    else:
        directory = ckpt.resolve_checkpoint(source)
        if cfg is not None:
            check_settings(ckpt.read_config(directory), cfg, path)
        base = ckpt.read_weights(directory)
        settings_file = directory / ckpt.CONFIG_FILE
    state = model.state_dict()
    added = [k for k in state if k.startswith(NEW_MODULES) and k not in base]
    base = {**base, **{k: state[k] for k in added}}
    problem = ckpt.describe_mismatch(state, base, fits=_fits_widened)
    if problem:
        raise UserError(
            f"init_from {path}: the checkpoint does not fit this model: {problem}. "
            f"Use the base run's model, data.resolution and condition settings ({settings_file}); "
            "only model.inpaint and model.upsample may differ"
        )
    widened = [k for k in state if base[k].shape != state[k].shape]
    loaded = {k: widen_input(base[k], state[k]) if k in widened else base[k].to(state[k].dtype) for k in state}
    model.load_state_dict(loaded)
    print(f"initialised from {directory}" + (f" (widened {', '.join(widened)} with zero channels)" if widened else ""))
    return {"widened": widened, "copied": [k for k in state if k not in widened]}
