"""CLIP guidance for sample.py (GLIDE): steer samples toward --prompt with a CLIP's gradient.

  --clip RUN              a noise-aware CLIP trained here (task: clip): gradient of f(x_t, t) . g(c) w.r.t. x_t
  --clip open_clip:ARCH   a clean open_clip model with --clip-weights FILE (or a pretrained tag, online):
                          it scores the predicted x0 clamped to [-1, 1] (see diffusion.conditioning.clip)

Both enter as a guidance term on epsilon (every sampler), or as the DDPM mean shift with
--guidance-form mean (an option of the classifier feature). They work on unconditional and
caption-conditioned denoisers, on top of classifier-free guidance. A noise-aware CLIP trained with
another schedule or formulation reads each step at its own time of the same noise level, and while it
guides, churn raises no level above the highest it was trained at (`SamplingPlan.churn_ceiling`).
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:  # the rest is imported where it is used, so that building the parser needs no torch
    import torch

    from ..checkpoints.load import LoadedModel
    from ..conditioning.clip import CleanGuide, NoiseAwareGuide
    from ..sampling.guidance import GuidanceTerm
    from ..sampling.plan import SampleItem, SamplingPlan

PRETRAINED_PREFIX = "open_clip:"
DEFAULT_SCALE = 10.0  # measured best or near it with the eps form on every sampler: shapes (0.717 DDIM 25) and CelebA (0.845 DDIM 50); docs/guidance.md


def load_guide(args: argparse.Namespace, loaded: LoadedModel, device: torch.device) -> NoiseAwareGuide | CleanGuide:
    from ..checkpoints.load import load_model
    from ..conditioning.clip import CleanGuide, NoiseAwareGuide, load_open_clip

    spec = args.clip
    if spec.startswith(PRETRAINED_PREFIX):
        model, tokenizer = load_open_clip(spec[len(PRETRAINED_PREFIX):], args.clip_weights, device)
        return CleanGuide(model, tokenizer, args.clip_cutouts)
    if args.clip_weights:
        raise UserError("--clip-weights goes with --clip open_clip:ARCH; a CLIP run directory holds its own weights")
    if args.clip_cutouts:
        raise UserError("--clip-cutouts is for clean open_clip models; a noise-aware CLIP sees the whole x_t")
    clip = load_model(spec, device)
    if clip.cfg.task != "clip":
        raise UserError(f"--clip {spec} is a {clip.cfg.task} checkpoint; give a CLIP run (task: clip) or open_clip:ARCH")
    res, clip_res = loaded.cfg.data.resolution, clip.cfg.data.resolution
    if res != clip_res:
        raise UserError(f"--clip {spec} was trained at {clip_res}x{clip_res} but the denoiser makes {res}x{res} images: "
                        f"retrain it with data.resolution={res}")
    return NoiseAwareGuide(clip, loaded.schedule)


class ClipGuidance:
    def __init__(self):
        self._guides: dict[tuple, NoiseAwareGuide | CleanGuide] = {}  # evaluators build many plans per run

    def guide(self, args: argparse.Namespace, loaded: LoadedModel) -> NoiseAwareGuide | CleanGuide:
        device = loaded.device
        schedule = loaded.cfg.diffusion
        key = (args.clip, args.clip_weights, args.clip_cutouts, str(device), loaded.cfg.data.resolution,
               schedule.formulation, schedule.num_train_timesteps, schedule.beta_schedule)
        if key not in self._guides:
            self._guides[key] = load_guide(args, loaded, device)
        return self._guides[key]

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("CLIP guidance (with --prompt)")
        group.add_argument("--clip", default=None, metavar="C",
                           help="noise-aware CLIP run (task: clip), or open_clip:ARCH for a pretrained open_clip model")
        group.add_argument("--clip-scale", type=float, default=None,
                           help=f"CLIP guidance scale s: 0 = unguided (default {DEFAULT_SCALE:g})")
        group.add_argument("--clip-weights", default=None, metavar="FILE",
                           help="weights for --clip open_clip:ARCH: a local file, or a pretrained tag (downloads)")
        group.add_argument("--clip-cutouts", type=int, default=0,
                           help="random crops per image scored by a clean open_clip model (0 = the whole image)")

    def variants(self, args, loaded, variants):
        return variants

    def extend(self, args: argparse.Namespace, loaded: LoadedModel, plan: SamplingPlan) -> None:
        if args.clip is None:
            if args.clip_scale is not None or args.clip_weights or args.clip_cutouts:
                raise UserError("--clip-scale, --clip-weights and --clip-cutouts need --clip C")
            return
        scale = DEFAULT_SCALE if args.clip_scale is None else args.clip_scale
        if scale < 0 or args.clip_cutouts < 0:
            raise UserError("--clip-scale and --clip-cutouts must be >= 0 (scale 0 = unguided)")
        if any(not item.prompt for item in plan.items):
            raise UserError("--clip needs --prompt TEXT: the text that CLIP guidance steers toward")
        import torch

        from ..conditioning.classifier import check_form

        form = getattr(args, "guidance_form", "eps")
        check_form(form, args.sampler or loaded.cfg.sample.sampler)
        guide = self.guide(args, loaded)
        prompts = sorted({item.prompt for item in plan.items})
        features = dict(zip(prompts, guide.encode_prompts(prompts)))

        def make_term(items: list[SampleItem]) -> GuidanceTerm:
            text = torch.stack([features[item.prompt] for item in items])
            return guide.term(text, scale, form, [item.seed for item in items])

        plan.terms.append(make_term)
        if scale > 0 and guide.schedule is not None:
            from ..sampling.guidance import churn_ceiling

            plan.churn_ceiling = churn_ceiling(plan.churn_ceiling, guide.schedule)
        for item in plan.items:
            item.meta.update({"clip": args.clip, "clip_scale": f"{scale:g}", "guidance_form": form})


