"""sample.py feature: prompts for caption models, and the CFG refinements every model can use.

`--prompt TEXT` (repeatable) or `--prompts-file FILE` gives one group of --num-samples images per
prompt; `--prompt ""` is the empty caption, i.e. unconditional. `--negative-prompt` replaces the
empty caption in CFG's unconditional branch. For models that are not caption-conditioned the
prompt is only recorded (item.prompt, meta["prompt"]) for CLIP guidance (`--clip`).

`--guidance-rescale`, `--dynamic-threshold` and `--guidance-interval` refine classifier-free
guidance for any conditional model and any sampler (formulas in diffusion/sampling/guidance.py);
`--guidance-interval` also limits classifier and CLIP gradient guidance. `--no-x0-clip` leaves the
predicted x0 unclipped (NVlabs' edm_sampler); the default clips it to [-1, 1].
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError, preview

if TYPE_CHECKING:  # the rest is imported where it is used, so that building the parser needs no torch
    from ..checkpoints.load import LoadedModel
    from ..sampling.guidance import CFGOptions
    from ..sampling.plan import SamplingPlan


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt values, then the non-blank lines of --prompts-file."""
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UserError(f"--prompts-file {path} not found: give a text file with one prompt per line")
        try:
            lines = [line.strip() for line in path.read_bytes().decode("utf-8").splitlines()]
        except UnicodeDecodeError:
            raise UserError(f"--prompts-file {path} is not UTF-8 text: give a text file with one prompt per line") from None
        found = [line for line in lines if line]
        if not found:
            raise UserError(f"--prompts-file {path} has no prompts: write one prompt per line")
        prompts += found
    return prompts


def warn_if_cut(prompt: str, context_length: int) -> None:
    from ..models.text import token_count

    count = token_count(prompt)
    if count > context_length:
        print(f"warning: prompt {preview(prompt)} has {count} tokens, more than the model's context length of "
              f"{context_length}: it was cut to the first {context_length - 2}", file=sys.stderr)


def is_text_model(loaded: LoadedModel) -> bool:
    return getattr(loaded.model, "condition", "none") == "text"


def cfg_options(args: argparse.Namespace, num_train_timesteps: int | None) -> CFGOptions:
    """Check the CFG refinement flags and turn them into the plan's CFGOptions (`num_train_timesteps`
    None: an edm model, whose guidance interval is in sigma)."""
    from ..sampling.guidance import CFGOptions

    options = CFGOptions()
    if args.guidance_rescale is not None:
        if not 0.0 <= args.guidance_rescale <= 1.0:
            raise UserError(f"--guidance-rescale is a blend weight in [0, 1] (0.7 is typical), got {args.guidance_rescale}")
        options.rescale = args.guidance_rescale
    if args.dynamic_threshold is not None:
        if not 50.0 <= args.dynamic_threshold <= 100.0:
            raise UserError(f"--dynamic-threshold is a percentile in [50, 100] (Imagen uses 99.5), got {args.dynamic_threshold}")
        options.threshold = args.dynamic_threshold
    if getattr(args, "no_x0_clip", False):
        if options.threshold is not None:
            raise UserError("--no-x0-clip and --dynamic-threshold both choose how x0 is processed: give one of them")
        options.x0_clip = False
    if args.guidance_interval is not None:
        lo, hi = args.guidance_interval
        if num_train_timesteps is None and not 0 <= lo <= hi:
            raise UserError(f"--guidance-interval LO HI needs 0 <= LO <= HI (an edm model's interval is in sigma), "
                            f"got {lo:g} {hi:g}")
        if num_train_timesteps is not None and not 0 <= lo <= hi < num_train_timesteps:
            raise UserError(f"--guidance-interval LO HI needs 0 <= LO <= HI < {num_train_timesteps} (training "
                            f"timesteps), got {lo:g} {hi:g}")
        options.interval = (lo, hi)
    return options


class TextPromptFeature:
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("prompts and CFG refinements")
        group.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                           help="caption to draw (repeatable; --num-samples images each); \"\" = unconditional")
        group.add_argument("--prompts-file", default=None, metavar="FILE", help="text file with one prompt per line")
        group.add_argument("--negative-prompt", default=None, metavar="TEXT",
                           help="caption for CFG's unconditional branch instead of the empty caption")
        group.add_argument("--guidance-rescale", type=float, default=None, metavar="PHI",
                           help="CFG rescale (Lin et al. 2023): blend weight phi in [0, 1] toward the conditional x0's std")
        group.add_argument("--dynamic-threshold", type=float, default=None, metavar="P",
                           help="Imagen dynamic thresholding of the predicted x0 at percentile P (e.g. 99.5)")
        group.add_argument("--no-x0-clip", action="store_true",
                           help="leave the predicted x0 as the model gives it, as NVlabs' edm_sampler does (default: "
                                "x0 clipped to [-1, 1] at every step, after guidance)")
        group.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                           help="apply guidance (CFG, --classifier, --clip) only at training timesteps LO <= t <= HI "
                                "(edm models: sigma; Kynkaanniemi et al. 2024)")

    def variants(self, args, loaded, variants):
        prompts = read_prompts(args)
        text_model = is_text_model(loaded)
        if args.negative_prompt is not None and not text_model:
            raise UserError("--negative-prompt needs a caption-conditioned checkpoint (model.condition=text)")
        if not prompts and text_model:
            prompts = list(loaded.cfg.sample.prompts)
            if not prompts:
                raise UserError('this caption model needs --prompt TEXT (or --prompt "" for unconditional samples)')
        if not prompts:
            return variants
        if not text_model and getattr(args, "clip", None) is None:
            raise UserError("--prompt needs a caption-conditioned checkpoint (model.condition=text) or --clip CHECKPOINT "
                            "for CLIP guidance")
        model = loaded.model
        out = []
        for prompt in prompts:
            tokens = None
            if text_model:
                warn_if_cut(prompt, model.context_length)
                tokens = model.tokenize(prompt)
            for item in variants:
                cond = {**item.cond, "tokens": tokens} if tokens is not None else item.cond
                out.append(item.but(cond=cond, meta={**item.meta, "prompt": prompt}, prompt=prompt))
        return out

    def extend(self, args, loaded, plan: SamplingPlan) -> None:
        plan.cfg = cfg_options(args, getattr(loaded.schedule, "num_train_timesteps", None))
        settings = {}
        if plan.cfg.rescale:
            settings["guidance_rescale"] = str(plan.cfg.rescale)
        if plan.cfg.threshold is not None:
            settings["dynamic_threshold"] = str(plan.cfg.threshold)
        if not plan.cfg.x0_clip:
            settings["x0_clip"] = "off"
        if plan.cfg.interval is not None:
            settings["guidance_interval"] = str(plan.cfg.interval)
        if args.negative_prompt is not None:
            model = loaded.model
            warn_if_cut(args.negative_prompt, model.context_length)
            negative = model.tokenize(args.negative_prompt)
            settings["negative_prompt"] = args.negative_prompt
            for item in plan.items:
                item.uncond = {**model.null_condition(item.cond), "tokens": negative}
        for item in plan.items:
            item.meta.update(settings)


