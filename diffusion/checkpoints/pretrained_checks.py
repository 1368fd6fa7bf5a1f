"""Config checks for the settings a pretrained diffusers folder brings (docs/pretrained.md): explicit
betas, and `model.unet_config`, the folder's UNet2DModel config. Torch-free: config loading imports it.
"""
from __future__ import annotations

import json
from typing import Any

from ..errors import UserError, preview

UNET_CLASS = "UNet2DModel"
# UNet2DModel config keys that would make it something the Denoiser does not drive (class or
# learned-variance outputs); every other key is diffusers' own business.
CONDITIONING_KEYS = ("num_class_embeds", "class_embed_type")


def parse_unet_config(text: str, what: str = "config key 'model.unet_config'") -> dict[str, Any]:
    """The UNet2DModel config held in `text`, checked: a JSON object of a UNet2DModel with 3 output
    channels, no class embedding and a square sample_size."""
    try:
        config = json.loads(text)
    except ValueError as err:
        raise UserError(f"{what} is not JSON ({err}): it holds a diffusers UNet2DModel config.json, set from "
                        "init_from") from None
    if not isinstance(config, dict):
        raise UserError(f"{what} must be a JSON object (a UNet2DModel config), got {preview(config)}")
    name = config.get("_class_name", UNET_CLASS)
    if name != UNET_CLASS:
        raise UserError(f"{what} describes a {preview(name)}, not a {UNET_CLASS}: only unconditional pixel-space "
                        "U-Nets are read from diffusers folders")
    for key in CONDITIONING_KEYS:
        if config.get(key) not in (None, "null"):
            raise UserError(f"{what} has {key}={preview(config[key])}: class-conditional diffusers U-Nets are not "
                            "supported; use an unconditional one")
    channels = config.get("block_out_channels", (64,))
    if (not isinstance(channels, (list, tuple)) or not channels
            or not all(isinstance(c, int) and not isinstance(c, bool) and 0 < c <= 16_384 for c in channels)):
        raise UserError(f"{what}: block_out_channels must be a list of channel counts, got {preview(channels)}")
    out = config.get("out_channels", 3)
    if out != 3:
        extra = " (a learned variance: variance_type learned/learned_range is not supported)" if out == 6 else ""
        raise UserError(f"{what}: out_channels is {preview(out)}, not 3{extra}; only RGB eps/v/x0 U-Nets are read")
    return config


def sample_size(config: dict[str, Any], what: str) -> int:
    """The UNet2DModel config's sample_size as one side (square images)."""
    size = config.get("sample_size", 32)
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 16_384:
        raise UserError(f"{what}: sample_size {preview(size)} is not one square side in pixels; this codebase "
                        "samples square images")
    return size


def check_pretrained_settings(cfg: Any) -> None:
    """diffusion.trained_betas (one beta in (0, 1) per timestep) and model.unet_config (see `parse_unet_config`:
    unconditional, no upsampler, data.resolution divisible by its halvings)."""
    betas, total = cfg.diffusion.trained_betas, cfg.diffusion.num_train_timesteps
    if betas:
        if len(betas) != total:
            raise UserError(f"config key 'diffusion.trained_betas' lists {len(betas)} betas but "
                            f"diffusion.num_train_timesteps is {total}: give one per timestep, or [] for beta_schedule")
        if not all(0 < b < 1 for b in betas):
            raise UserError("config key 'diffusion.trained_betas' must hold betas in (0, 1)")
    if not cfg.model.unet_config:
        return
    config = parse_unet_config(cfg.model.unet_config)
    if cfg.model.condition != "none" or cfg.model.upsample:
        what = "model.upsample=true" if cfg.model.upsample else f"model.condition={cfg.model.condition}"
        raise UserError(f"{what} needs this project's U-Net, but model.unet_config (from a pretrained diffusers folder) "
                        "is an unconditional U-Net: set model.condition=none and model.upsample=false, or remove "
                        "init_from / model.unet_config")
    levels = len(config.get("block_out_channels", (64,)))
    if cfg.data.resolution % 2 ** (levels - 1):
        raise UserError(f"config key 'data.resolution' ({cfg.data.resolution}) must be divisible by 2^{levels - 1}: "
                        f"the pretrained U-Net (model.unet_config) halves it {levels - 1} times")
