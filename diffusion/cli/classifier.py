"""sample.py feature: classifier guidance with a noise-aware classifier (`--classifier C`).

The math is in `diffusion.conditioning.classifier`: eps - s * sqrt(1 - alpha_bar_t) * grad, then the
guided x0 is clipped, so DDPM, DDIM and DPM-Solver++ all honour it alike; with the DDPM sampler
`--guidance-form mean` applies the paper's posterior-mean shift mu + s * Sigma * grad instead, mu from the
clipped x0 as in guided-diffusion. Works with unconditional denoisers (y from --class-label, or every
class in turn) and on top of classifier-free guidance for class-conditional ones. A classifier trained
with another schedule or formulation (ddpm on an edm denoiser and the reverse) reads each step at its
own time of the same noise level; while it guides, churn raises no level above the highest it was
trained at (`SamplingPlan.churn_ceiling`).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..choices import GUIDANCE_FORMS as FORMS
from ..errors import UserError

if TYPE_CHECKING:  # the rest is imported where it is used, so that building the parser needs no torch
    from ..checkpoints.load import LoadedModel
    from ..sampling.plan import SamplingPlan

# ADM used 10 for unconditional denoisers; on shapes 8 gave 0.825 and 16 gave 0.933. Sweep it per model.
DEFAULT_SCALE = 10.0  # eps form, every sampler: shapes 0.892 (DDIM 25), CelebA 0.870 (DDIM 50); docs/guidance.md


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
                           help="how classifier/CLIP gradients enter: eps: eps - s*sqrt(1-alpha_bar)*grad, then x0 "
                                "clipped (every sampler); mean: guided-diffusion's condition_mean, mu + s*Sigma*grad "
                                "with mu from the clipped x0 (--sampler ddpm)")

    def classifier(self, args: argparse.Namespace, loaded: LoadedModel) -> LoadedModel | None:
        """The classifier named by --classifier, loaded once and checked against the denoiser."""
        if not getattr(args, "classifier", None):
            if getattr(args, "classifier_scale", None) is not None:
                raise UserError("--classifier-scale needs --classifier CHECKPOINT (a task: classifier run)")
            if getattr(args, "guidance_form", "eps") != "eps" and not getattr(args, "clip", None):
                raise UserError("--guidance-form applies to gradient guidance: add --classifier CHECKPOINT (or --clip)")
            return None
        from ..checkpoints.load import load_model
        from ..conditioning.classifier import check_compatible

        device = loaded.device
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
        from ..conditioning.classifier import class_name

        n = classifier.cfg.model.num_classes
        if args.class_label is not None and not 0 <= args.class_label < n:
            raise UserError(f"--class-label {args.class_label} is out of range: the classifier has classes 0..{n - 1}")
        labels = [args.class_label] if args.class_label is not None else list(range(n))
        out = []
        for item in variants:
            if item.label is not None:  # a class-conditional denoiser: ClassLabel already chose it
                out.append(item)
                continue
            for label in labels:
                out.append(item.but(label=label, meta={**item.meta, "label": str(label),
                                                       "class_name": class_name(classifier, label)}))
        return out

    def extend(self, args, loaded, plan: SamplingPlan) -> None:
        classifier = self.classifier(args, loaded)
        if classifier is None:
            return
        from ..conditioning.classifier import check_form, classifier_terms
        from ..sampling.guidance import churn_ceiling

        scale = DEFAULT_SCALE if args.classifier_scale is None else args.classifier_scale
        if scale < 0:
            raise UserError(f"--classifier-scale must be >= 0 (0 = unguided), got {scale}")
        check_form(args.guidance_form, args.sampler or loaded.cfg.sample.sampler)
        plan.terms.append(classifier_terms(classifier.model, scale, args.guidance_form, classifier.schedule,
                                           loaded.schedule))
        if scale > 0:
            plan.churn_ceiling = churn_ceiling(plan.churn_ceiling, classifier.schedule)
        settings = {"classifier": str(classifier.path), "classifier_scale": f"{scale:g}", "guidance_form": args.guidance_form}
        for item in plan.items:
            item.meta.update(settings)
