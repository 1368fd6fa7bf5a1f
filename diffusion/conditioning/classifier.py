"""Classifier guidance (Dhariwal & Nichol 2021) with a noise-aware classifier trained on x_t.

The gradient of log p(y | x_t, t) enters through the noise prediction (`sampling.guidance.shift_eps`):
eps - s * sqrt(1 - ab) * g for every sampler, or the DDPM posterior-mean shift mu + s * Sigma * g with
form "mean" (added after the x0 clip, as guided-diffusion's `condition_mean`); the guided x0 is
clipped like any other (see `sampling.guidance`). The classifier reads the very x_t the denoiser
reads at that step, at its own time of the same noise level: the same t when both were trained with
one schedule, else mapped through sigma (`sampling.guidance.guide_time_map`), so a ddpm-trained
classifier guides an edm denoiser and the reverse, as a noise-aware CLIP does.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..checkpoints.load import LoadedModel
from ..choices import GUIDANCE_FORMS as FORMS
from ..errors import UserError
from ..sampling.guidance import GuidanceTerm, gradient_term, guide_time_map
from ..sampling.plan import SampleItem
from ..sampling.schedule import Schedule


def check_form(form: str, sampler: str) -> None:
    """The mean form is DDPM's posterior-mean shift; other samplers take the eps form."""
    if form not in FORMS:
        raise UserError(f"unknown guidance form '{form}': choose one of {', '.join(FORMS)}")
    if form == "mean" and sampler != "ddpm":
        raise UserError(f"--guidance-form mean is the DDPM posterior-mean shift: use --sampler ddpm, "
                        f"or --guidance-form eps with {sampler}")


def check_compatible(denoiser: LoadedModel, classifier: LoadedModel, where: str) -> None:
    """Refuse a checkpoint that is not a classifier, or one trained at another resolution or for other
    classes. Its schedule and formulation may differ: it is read at its own time of the denoiser's
    noise level (`classifier_terms`)."""
    if classifier.cfg.task != "classifier":
        raise UserError(f"--classifier {where} is a {classifier.cfg.task} checkpoint; train one with task: classifier")
    res, clf_res = denoiser.cfg.data.resolution, classifier.cfg.data.resolution
    if res != clf_res:
        raise UserError(f"--classifier {where} was trained at {clf_res}x{clf_res} but the denoiser makes "
                        f"{res}x{res} images: retrain it with data.resolution={res}")
    model = denoiser.model
    if getattr(model, "condition", "none") == "class" and model.num_classes != classifier.cfg.model.num_classes:
        raise UserError(f"--classifier {where} has {classifier.cfg.model.num_classes} classes but the denoiser has "
                        f"{model.num_classes}: --class-label must mean the same class to both")


def class_name(classifier: LoadedModel, label: int) -> str:
    names = classifier.info.class_names
    return names[label] if label < len(names) else str(label)


def classifier_terms(model: torch.nn.Module, scale: float, form: str = "eps", schedule: Schedule | None = None,
                     denoiser_schedule: Schedule | None = None):
    """A plan term factory: for a batch of items, the gradient term toward each item's `label`.
    `schedule` (the classifier's) gives the network's input (edm: c_in x, c_noise); the denoiser's
    model time is mapped to it at equal noise level when `denoiser_schedule` (None: the same) differs."""
    t_map = guide_time_map(denoiser_schedule, schedule) if schedule is not None and denoiser_schedule is not None \
        else (lambda t: t)

    def make(items: Sequence[SampleItem]) -> GuidanceTerm:
        if any(item.label is None for item in items):
            raise ValueError("classifier guidance needs a target label on every item")
        labels = torch.tensor([item.label for item in items], dtype=torch.long)

        def log_prob(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_in, t_in = (x, t) if schedule is None else schedule.network_input(x, t_map(t))
            return model.log_prob(x_in, t_in, labels.to(x.device))

        return gradient_term(log_prob, scale, form)

    return make
