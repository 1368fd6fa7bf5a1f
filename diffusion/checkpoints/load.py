"""Load any task's model from a checkpoint or run directory, with its EMA weights, to sample or evaluate."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config
from ..errors import UserError
from ..models import build_model
from ..sampling.schedule import Schedule, build_schedule
from . import store


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
    against the config they were saved with."""
    directory = store.resolve_checkpoint(path)
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
