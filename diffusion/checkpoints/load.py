"""Load any task's model from a checkpoint or run directory, with its EMA weights, to sample or evaluate."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config
from ..errors import UserError, first_line
from ..models import build_model
from ..sampling.schedule import Schedule, build_schedule
from . import diffusers_folder, store


@dataclass
class LoadedModel:
    cfg: Config
    model: torch.nn.Module
    schedule: Schedule
    info: store.TrainState
    path: Path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """The model of a checkpoint (or a run's newest one) in eval mode on `device`, weights checked
    against the config they were saved with; or of a diffusers pipeline folder or hub name
    (`diffusers_folder`), as an unconditional denoiser with the folder's schedule."""
    source = diffusers_folder.resolve_source(path)
    if diffusers_folder.is_diffusers_folder(source):
        return load_pretrained(source, device)
    directory = store.resolve_checkpoint(source)
    cfg = store.read_config(directory)
    model = build_model(cfg)
    weights = store.read_weights(directory)
    problem = store.describe_mismatch(model.state_dict(), weights)
    if problem:
        raise UserError(f"{directory / store.EMA_FILE} does not fit the model its {store.CONFIG_FILE} describes: {problem}")
    broken = [name for name, value in weights.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:
        raise UserError(f"{directory / store.EMA_FILE} holds non-finite weights ({broken[0]} and {len(broken) - 1} more): "
                        "its run diverged; use an earlier checkpoint (RUN/checkpoints/step-N)")
    model.load_state_dict(weights)
    model.eval().requires_grad_(False).to(device)
    return LoadedModel(cfg, model, build_schedule(cfg.diffusion).to(device), store.read_info(directory), directory)


def pretrained_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The U-Net weights of a diffusers folder, as our Denoiser names them (`unet.`...), read by diffusers
    itself (safetensors or .bin, old attention names converted)."""
    from diffusers import UNet2DModel

    unet_dir, _ = diffusers_folder.unet_config(folder)
    try:
        unet = UNet2DModel.from_pretrained(unet_dir)
    except Exception as err:  # missing or damaged weight files, a config diffusers cannot build
        raise UserError(f"cannot read the U-Net weights in {unet_dir}: {first_line(err)}") from None
    return {f"unet.{k}": v.detach().float() for k, v in unet.state_dict().items()}


def load_pretrained(folder: Path, device: torch.device | str = "cpu") -> LoadedModel:
    """A diffusers pipeline folder as a LoadedModel: the synthesised config (`folder_config`), the Denoiser
    it builds (the folder's own U-Net layout) holding the folder's weights, and the folder's schedule."""
    cfg = diffusers_folder.folder_config(folder)
    model = build_model(cfg)
    weights = pretrained_weights(folder)
    problem = store.describe_mismatch(model.state_dict(), weights)
    if problem:
        raise UserError(f"the U-Net weights in {folder} do not fit its config.json: {problem}")
    broken = [name for name, value in weights.items() if not torch.isfinite(value).all()]
    if broken:
        raise UserError(f"the U-Net weights in {folder} hold non-finite values ({broken[0]}): download it again")
    model.load_state_dict(weights)
    model.eval().requires_grad_(False).to(device)
    return LoadedModel(cfg, model, build_schedule(cfg.diffusion).to(device), store.TrainState(), folder)
