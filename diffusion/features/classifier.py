"""sample.py feature: classifier guidance with a noise-aware classifier (`--classifier C`).

The gradient of log p(y | x_t, t) enters through the noise prediction,
eps - s * sqrt(1 - alpha_bar_t) * grad, so DDPM, DDIM and DPM-Solver++ all honour it; with the DDPM
sampler `--guidance-form mean` applies the paper's posterior-mean shift mu + s * Sigma * grad instead.
The classifier reads the very x_t and t the denoiser reads at that step (the sampler's StepInfo);
the samplers' `scale_model_input` is the identity, so that is also the denoiser's input.
Works with unconditional denoisers (y from --class-label, or every class in turn) and on top of
classifier-free guidance for class-conditional ones.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import UserError
from ..generate import LoadedModel, SamplingPlan, load_model
from ..guidance import gradient_term

FORMS = ("eps", "mean")
# ADM used 10 for unconditional denoisers; on shapes 8 gave 0.825 and 16 gave 0.933. Sweep it per model.
DEFAULT_SCALE = 10.0


def check_form(form: str, sampler: str) -> None:
    """The mean form is DDPM's posterior-mean shift; other samplers take the eps form."""
    if form == "mean" and sampler != "ddpm":
        raise UserError(f"--guidance-form mean is the DDPM posterior-mean shift: use --sampler ddpm, "
                        f"or --guidance-form eps with {sampler}")


def check_compatible(denoiser: LoadedModel, classifier: LoadedModel, where: str) -> None:
    """Refuse a classifier trained for another schedule, resolution or set of classes."""
    if classifier.cfg.task != "classifier":
        raise UserError(f"--classifier {where} is a {classifier.cfg.task} checkpoint; train one with task: classifier")
    for key in ("num_train_timesteps", "beta_schedule"):
        mine, theirs = getattr(denoiser.cfg.diffusion, key), getattr(classifier.cfg.diffusion, key)
        if mine != theirs:
            raise UserError(
                f"--classifier {where} was trained for diffusion.{key}={theirs} but the denoiser uses {mine}: "
                f"retrain the classifier with diffusion.{key}={mine}"
            )
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


class ClassifierGuidanceFeature:
    def __init__(self):
        self._loaded: dict[tuple[str, str], LoadedModel] = {}  # evaluators build many plans per run

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("classifier guidance")
        group.add_argument("--classifier", default=None,
                           help="noise-aware classifier run or checkpoint (task: classifier) steering toward --class-label")
        group.add_argument("--classifier-scale", type=float, default=None,
                           help=f"classifier guidance scale s: 0 = unguided (default {DEFAULT_SCALE:g})")
        group.add_argument("--guidance-form", choices=FORMS, default="eps",
                           help="how classifier/CLIP gradients enter: eps: eps - s*sqrt(1-alpha_bar)*grad (every sampler); "
                                "mean: the DDPM posterior-mean shift mu + s*Sigma*grad (--sampler ddpm)")

    def classifier(self, args: argparse.Namespace, loaded: LoadedModel) -> LoadedModel | None:
        """The classifier named by --classifier, loaded once and checked against the denoiser."""
        if not getattr(args, "classifier", None):
            if getattr(args, "classifier_scale", None) is not None:
                raise UserError("--classifier-scale needs --classifier CHECKPOINT (a task: classifier run)")
            if getattr(args, "guidance_form", "eps") != "eps" and not getattr(args, "clip", None):
                raise UserError("--guidance-form applies to gradient guidance: add --classifier CHECKPOINT (or --clip)")
            return None
        device = next(loaded.model.parameters()).device
        key = (str(Path(args.classifier).resolve()), str(device))
        if key not in self._loaded:
            self._loaded[key] = load_model(args.classifier, device)
        classifier = self._loaded[key]
        check_compatible(loaded, classifier, args.classifier)
        return classifier

    def variants(self, args, loaded, variants):
        """Give every variant a target class: --class-label, the denoiser's label, or each class in turn."""
        classifier = self.classifier(args, loaded)
        if classifier is None:
            return variants
        n = classifier.cfg.model.num_classes
        if args.class_label is not None and not 0 <= args.class_label < n:
            raise UserError(f"--class-label {args.class_label} is out of range: the classifier has classes 0..{n - 1}")
        labels = [args.class_label] if args.class_label is not None else list(range(n))
        out = []
        for cond, meta, extra in variants:
            if "label" in extra:  # a class-conditional denoiser: ClassLabel already chose it
                out.append((cond, meta, extra))
                continue
            for label in labels:
                out.append((cond, {**meta, "label": str(label), "class_name": class_name(classifier, label)},
                            {**extra, "label": label}))
        return out

    def extend(self, args, loaded, plan: SamplingPlan) -> None:
        classifier = self.classifier(args, loaded)
        if classifier is None:
            return
        scale = DEFAULT_SCALE if args.classifier_scale is None else args.classifier_scale
        if scale < 0:
            raise UserError(f"--classifier-scale must be >= 0 (0 = unguided), got {scale}")
        check_form(args.guidance_form, args.sampler or loaded.cfg.sample.sampler)
        plan.terms.append(guidance_factory(classifier.model, scale, args.guidance_form))
        settings = {"classifier": str(classifier.path), "classifier_scale": f"{scale:g}", "guidance_form": args.guidance_form}
        for item in plan.items:
            item.meta.update(settings)


def guidance_factory(model: torch.nn.Module, scale: float, form: str = "eps"):
    """A plan term factory: for a batch of items, the gradient term toward each item's extra["label"]."""

    def make(items) -> object:
        labels = torch.tensor([item.extra["label"] for item in items], dtype=torch.long)

        def log_prob(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model.log_prob(x, t, labels.to(x.device))

        return gradient_term(log_prob, scale, form)

    return make


FEATURE = ClassifierGuidanceFeature()
