"""Networks: the denoiser (a diffusers U-Net behind one conditioning interface), the noise-aware
classifier and CLIP. `build_model` picks the one a config's `task` trains."""
from __future__ import annotations

import math

import torch

from ..config import Config
from .classifier import NoisyClassifier, build_classifier
from .clip import NoisyCLIP
from .denoiser import Denoiser, build_denoiser


def build_model(cfg: Config) -> torch.nn.Module:
    """The untrained network of `cfg.task` (denoiser, classifier or clip), as its checkpoints hold it."""
    if cfg.task == "classifier":
        return build_classifier(cfg)
    if cfg.task == "clip":
        return NoisyCLIP(cfg)
    model = build_denoiser(cfg.model, cfg.data.resolution, cfg.model.num_classes)
    model.preview_prompts = list(cfg.sample.prompts)
    if cfg.diffusion.formulation == "edm":
        model.clean_aug_level = math.log(cfg.diffusion.sigma_min) / 4  # c_noise of the clean low-res
    return model


__all__ = ["Denoiser", "NoisyCLIP", "NoisyClassifier", "build_classifier", "build_denoiser", "build_model"]
