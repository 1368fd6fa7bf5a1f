"""sample.py features: autoguidance (`--autoguide GUIDE`) and sampling with the null condition (`--unconditional`).

`--autoguide GUIDE` (a run folder or one checkpoint) guides the main model by a weaker version of
itself (Karras et al. 2024): eps = eps_guide + w (eps_main - eps_guide), w = `--guidance-scale`
(1 = the main model alone, above 1 = guided). Both get the same condition (class, caption, in-painting
channels, an upsampler's low-res input, or none); CFG is off. `--guidance-interval` limits it like CFG.
In a cascade (`--upsampler`) it guides the base stage; the upsampler stage keeps its own CFG. The
guide must pair with the main model (`diffusion.sampling.autoguide.check_pair`). The math is in
diffusion/sampling/autoguide.py.

`--unconditional` samples a class or caption model (and its guide) with the null condition, the one
classifier-free training taught it: how autoguidance is measured on an unconditional model when only
a CFG-trained one exists. Refused for models trained without condition dropout.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:  # the rest is imported where it is used, so that building the parser needs no torch
    from ..checkpoints.load import LoadedModel
    from ..sampling.plan import SampleItem, SamplingPlan


def _condition(loaded: LoadedModel) -> str:
    return getattr(loaded.model, "condition", "none")


def check_null_condition(loaded: LoadedModel, what: str) -> None:
    """Refuse --unconditional for a model without a learned null condition."""
    condition = _condition(loaded)
    if condition == "none":
        raise UserError(f"--unconditional: {what} {loaded.path} is unconditional already (model.condition: none): "
                        "leave out --unconditional")
    if loaded.cfg.model.cond_drop_prob <= 0:
        raise UserError(f"--unconditional: {what} {loaded.path} was trained without condition dropout "
                        "(model.cond_drop_prob: 0), so it never learned the null condition: use a model trained with it")


class Unconditional:
    """`--unconditional`, first of the features: checks, and the empty caption for caption models (the
    class collapse happens in `AutoguideFeature.variants`, after the class labels are listed)."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("autoguidance")
        group.add_argument("--autoguide", default=None, metavar="GUIDE",
                           help="autoguidance (Karras et al. 2024): guide by this weaker run or checkpoint of the same "
                                "kind (smaller and/or trained less long), given the same condition; --guidance-scale is "
                                "its strength w (1 = the main model alone) and classifier-free guidance is off")
        group.add_argument("--unconditional", action="store_true",
                           help="sample a class or caption model (and its --autoguide) with its null condition, the "
                                "unconditional model its condition dropout trained")

    def variants(self, args, loaded, variants):
        if not args.unconditional or getattr(args, "_unconditional_done", False):
            return variants
        for flag, given in (("--class-label", args.class_label is not None and not getattr(args, "classifier", None)),
                            ("--prompt", bool(args.prompt)), ("--prompts-file", bool(args.prompts_file)),
                            ("--negative-prompt", args.negative_prompt is not None)):
            if given:
                raise UserError(f"--unconditional samples with the null condition: leave out {flag}")
        check_null_condition(loaded, "the checkpoint")
        if _condition(loaded) == "text":
            args.prompt = [""]  # the empty caption is a caption model's null condition
        args._unconditional_done = True
        return variants

    def extend(self, args, loaded, plan):
        pass


class AutoguideFeature:
    """`--autoguide GUIDE`: a model-function factory in the plan; runs after the class labels and prompts."""

    def __init__(self):
        self._loaded: dict[tuple[str, str], LoadedModel] = {}  # evaluators build many plans per run

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        pass  # Unconditional adds both options, in one group

    def guide(self, args: argparse.Namespace, loaded: LoadedModel) -> LoadedModel | None:
        """The guide named by --autoguide, loaded once on the main model's device and checked against it."""
        if args.autoguide is None:
            return None
        from ..checkpoints import store
        from ..checkpoints.load import load_model
        from ..device import prepare_for_sampling
        from ..sampling.autoguide import check_pair

        if not Path(args.autoguide).exists():
            raise UserError(f"--autoguide {args.autoguide} not found: give a run folder or one checkpoint of a weaker "
                            "twin of the main model")
        try:
            resolved = store.resolve_checkpoint(args.autoguide)
        except UserError as err:
            raise UserError(f"--autoguide: {err}") from None
        key = (str(resolved.resolve()), str(loaded.device))
        if key not in self._loaded:
            if resolved.resolve() == Path(loaded.path).resolve():
                self._loaded[key] = loaded  # the main model itself: no second copy
            else:
                guide = load_model(resolved, loaded.device)
                if guide.cfg.task == "denoiser":
                    prepare_for_sampling(guide.model, loaded.device)
                self._loaded[key] = guide
        guide = self._loaded[key]
        check_pair(loaded, guide, args.autoguide)
        if args.unconditional:
            check_null_condition(guide, "the guide")
        return guide

    def variants(self, args, loaded, variants):
        guide = self.guide(args, loaded)
        if guide is not None and args.negative_prompt is not None:
            raise UserError("--negative-prompt is classifier-free guidance's; --autoguide turns CFG off: leave one out")
        if not args.unconditional or _condition(loaded) != "class":
            return variants
        first = variants[0]  # ClassLabel listed every class: one null-class group instead
        null = loaded.model.null_condition(first.cond)
        meta = {k: v for k, v in first.meta.items() if k not in ("label", "class_name")}
        return [first.but(cond=null, label=None, meta=meta)]

    def extend(self, args, loaded, plan: SamplingPlan) -> None:
        if args.unconditional:
            for item in plan.items:
                item.meta["unconditional"] = "true"
        guide = self.guide(args, loaded)
        if guide is None:
            return
        from ..sampling.autoguide import autoguided, guide_condition
        from ..sampling.plan import BatchModel, _stack

        schedule = guide.schedule.to(loaded.device)

        def make(batch: BatchModel):
            items: list[SampleItem] = batch.items
            conds = [guide_condition(loaded.model, guide.model, item.cond, item.prompt) for item in items]
            return autoguided(loaded.model, guide.model, schedule, batch.cond, _stack(conds, loaded.device),
                              batch.settings.guidance_scale, batch.options, batch.autocast)

        plan.model_fns.append(make)
        settings = {"autoguide": str(guide.path), "autoguide_scale": f"{plan_scale(args, loaded):g}",
                    "guidance": "autoguidance (CFG off)"}
        for item in plan.items:
            item.meta.update(settings)


def plan_scale(args: argparse.Namespace, loaded: LoadedModel) -> float:
    """The guidance scale the plan samples with: --guidance-scale, else the run's sample.guidance_scale."""
    return loaded.cfg.sample.guidance_scale if args.guidance_scale is None else args.guidance_scale
