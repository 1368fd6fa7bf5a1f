"""The sample.py command line.

Core options pick the checkpoint, sampler, seeds, guidance scale and precision. Each feature
(class labels here; prompts, classifier and CLIP guidance, in-painting, upsampling in this package) adds its own
options, turns the sample templates into more specific ones, then adds guidance terms, hooks or
finishers to the plan. `FEATURES` lists them in the order they run: a later feature sees what an
earlier one chose (classifier guidance keeps a class-conditional model's label; CLIP guidance needs
the prompts read before it).

The parser is built without importing torch (the feature modules import it inside their
functions), so `sample.py --help` and a missing checkpoint answer at once.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..choices import PRECISIONS, SAMPLERS
from ..errors import UserError, exit_on_user_error
from ..io import write_failures
from ..threads import prefer_passive_waits, set_cpu_threads
from . import autoguide, classifier, clip, inpaint, prompts, upsample
from .args import (Parser, add_trust_argument, apply_trust, check_class_label, check_count, check_guidance_scale,
                   check_seed, check_steps)
from .help_format import DefaultsHelpFormatter
from .sample_output import OUTPUTS, check_out, choose_out, earlier_outputs, make_scratch, publish, remove_scratch

__all__ = ["OUTPUTS", "build_parser", "check_args", "check_out", "earlier_outputs", "features", "main", "make_plan",
           "sampler_settings"]

if TYPE_CHECKING:
    import torch

    from ..checkpoints.load import LoadedModel
    from ..sampling.plan import SampleItem, SamplerSettings, SamplingPlan


class Feature(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def variants(self, args: argparse.Namespace, loaded: LoadedModel, variants: list[SampleItem]) -> list[SampleItem]:
        """Refine or multiply the sample templates (one group of --num-samples images each)."""
        ...

    def extend(self, args: argparse.Namespace, loaded: LoadedModel, plan: SamplingPlan) -> None:
        """Add guidance terms, hooks or finishers to the plan."""
        ...


class ClassLabel:
    def add_arguments(self, parser):
        parser.add_argument("--class-label", type=int, default=None,
                            help="class index for a class-conditional model (default: every class in turn, --num-samples "
                                 "images each)")

    def variants(self, args, loaded, variants):
        import torch

        model = loaded.model
        if getattr(model, "condition", "none") != "class":
            if args.class_label is not None and not getattr(args, "classifier", None):
                raise UserError("--class-label needs a class-conditional checkpoint (model.condition=class) or --classifier")
            return variants
        n = model.num_classes
        if args.class_label is not None:
            check_class_label(args.class_label, "--class-label", n)
        labels = [args.class_label] if args.class_label is not None else list(range(n))
        names = loaded.info.class_names
        out = []
        for item in variants:
            for label in labels:
                name = names[label] if label < len(names) else str(label)
                out.append(item.but(cond={**item.cond, "labels": torch.tensor([label])}, label=label,
                                    meta={**item.meta, "label": str(label), "class_name": name}))
        return out

    def extend(self, args, loaded, plan):
        pass


def features() -> list[Feature]:
    """Every sample.py feature, in the order they run (see the module docstring)."""
    return [autoguide.Unconditional(), ClassLabel(), prompts.TextPromptFeature(), autoguide.AutoguideFeature(),
            classifier.ClassifierGuidanceFeature(), clip.ClipGuidance(), inpaint.InpaintFeature(), upsample.UpsampleFeature()]


def build_parser(feature_list: list[Feature]) -> argparse.ArgumentParser:
    parser = Parser(prog="sample.py", description="Sample images from a trained checkpoint.",
                    formatter_class=DefaultsHelpFormatter)  # --help shows every default
    parser.add_argument("--checkpoint", required=True, help="run directory (newest checkpoint, EMA weights) or one checkpoint")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance: 0 = unconditional, 1 = conditional, >1 = guided "
                             "(default: the run's sample.guidance_scale)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help="(default: the run's sample.sampler)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's sample.steps)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="images per condition: per class when a class-conditional model has no --class-label "
                             "(every class, so a 10-class model makes 10 x this many), per --prompt with prompts "
                             "(default: the run's sample.num_samples, also per condition)")
    parser.add_argument("--batch-size", type=int, default=16, help="images denoised at once")
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed+i, so each image can be regenerated alone")
    parser.add_argument("--out", default=None,
                        help="output folder; one that holds an earlier call's images needs --overwrite (default: a "
                             "new folder each call, samples/RUN, then samples/RUN-2, ..., RUN being the checkpoint's "
                             "run folder name)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the images an earlier call wrote in --out (sample_*.png, grid.png, ...) once "
                             "all of this call's are written; other files stay (default: such an --out is refused)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=PRECISIONS, default=None,
                        help="the denoiser's precision: bf16 autocast (default on GPUs) or fp32 (default on CPU); "
                             "guidance gradients are always fp32")
    add_trust_argument(parser)
    sigmas = parser.add_argument_group("Karras sigmas (heun, euler; every sampler on an edm model)")
    sigmas.add_argument("--sigma-min", type=float, default=None,
                        help="lowest noise level (default: the run's diffusion.sigma_min, 0.002; a ddpm model's own range clamps it)")
    sigmas.add_argument("--sigma-max", type=float, default=None, help="highest noise level (default: diffusion.sigma_max, 80)")
    sigmas.add_argument("--rho", type=float, default=None, help="Karras' spacing exponent (default: sample.rho, 7)")
    sigmas.add_argument("--churn", type=float, default=None,
                        help="EDM's S_churn: stochastic sampling, 0 = deterministic (default: sample.churn)")
    sigmas.add_argument("--churn-range", type=float, nargs=2, default=None, metavar=("S_TMIN", "S_TMAX"),
                        help="churn only at sigma in this range (default: sample.churn_min, sample.churn_max)")
    sigmas.add_argument("--churn-noise", type=float, default=None, help="EDM's S_noise (default: sample.churn_noise)")
    for feature in feature_list:
        feature.add_arguments(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """The core options' ranges (floats are finite already: see cli.args)."""
    if args.guidance_scale is not None:
        check_guidance_scale(args.guidance_scale)
    if args.steps is not None:
        check_steps(args.steps)
    if args.num_samples is not None:
        check_count(args.num_samples, "--num-samples")
    check_count(args.batch_size, "--batch-size")
    check_seed(args.seed)
    check_sigma_args(args)


def check_sigma_args(args: argparse.Namespace) -> None:
    """The Karras-sigma options (heun, euler; every sampler on an edm model)."""
    for flag, value in (("--sigma-min", args.sigma_min), ("--sigma-max", args.sigma_max), ("--rho", args.rho),
                        ("--churn-noise", args.churn_noise)):
        if value is not None and not value > 0:
            raise UserError(f"{flag} must be positive, got {value:g}")
    if args.churn is not None and args.churn < 0:
        raise UserError(f"--churn must be >= 0 (0 = deterministic), got {args.churn:g}")
    if args.churn_range is not None and not 0 <= args.churn_range[0] <= args.churn_range[1]:
        raise UserError(f"--churn-range S_TMIN S_TMAX needs 0 <= S_TMIN <= S_TMAX, got {args.churn_range}")


def sampler_settings(args: argparse.Namespace, loaded: LoadedModel) -> SamplerSettings:
    """The command line's sampler, steps, scale, batch size and precision, defaulting to the run's config."""
    from ..device import default_precision
    from ..sampling.plan import SamplerSettings, sigma_options

    sampler = args.sampler or loaded.cfg.sample.sampler
    total = loaded.cfg.diffusion.num_train_timesteps
    steps = args.steps or (total if sampler == "ddpm" and args.sampler else loaded.cfg.sample.steps)
    trailing = loaded.cfg.diffusion.formulation == "ddpm" and sampler not in ("heun", "euler")
    if trailing and steps > total:  # Karras-sigma samplers are not bound to the training timesteps
        given = f"--steps {steps}" if args.steps else f"the checkpoint's sample.steps ({steps})"
        raise UserError(f"{given} is more than the model's {total} training timesteps: give --steps from 1 to {total}")
    scale = loaded.cfg.sample.guidance_scale if args.guidance_scale is None else args.guidance_scale
    precision = args.dtype or default_precision(loaded.device)
    lo, hi = args.churn_range or (None, None)
    sigmas = sigma_options(loaded.cfg.sample, sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho,
                           churn=args.churn, churn_min=lo, churn_max=hi, churn_noise=args.churn_noise)
    return SamplerSettings(sampler, steps, scale, args.batch_size, precision, sigmas)


def make_plan(args: argparse.Namespace, loaded: LoadedModel, feature_list: list[Feature],
              settings: SamplerSettings) -> SamplingPlan:
    from ..sampling.plan import SampleItem, SamplingPlan

    variants = [SampleItem(seed=0)]
    for feature in feature_list:
        variants = feature.variants(args, loaded, variants)
    meta = {**settings.meta(loaded.schedule), "checkpoint": str(loaded.path)}
    count = args.num_samples if args.num_samples is not None else loaded.cfg.sample.num_samples
    items = []
    for template in variants:
        for _ in range(count):
            seed = args.seed + len(items)
            items.append(template.but(seed=seed, meta={**meta, **template.meta, "seed": str(seed)}))
    plan = SamplingPlan(items)
    for feature in feature_list:
        feature.extend(args, loaded, plan)
    return plan


def load_denoiser(path: str, device: torch.device) -> LoadedModel:
    from ..checkpoints.load import load_model
    from ..device import prepare_for_sampling

    loaded = load_model(path, device)
    if loaded.cfg.task != "denoiser":
        raise UserError(f"{path} is a {loaded.cfg.task} checkpoint; --checkpoint needs a denoiser")
    prepare_for_sampling(loaded.model, device)
    return loaded


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path:
    prefer_passive_waits()  # before torch is imported (see diffusion/threads.py)
    feature_list = features()
    args = build_parser(feature_list).parse_args(argv)
    apply_trust(args)
    check_args(args)
    from ..checkpoints.diffusers_folder import looks_like_hub_name  # torch-free

    if not Path(args.checkpoint).exists() and not looks_like_hub_name(args.checkpoint):  # first, before the slow imports
        raise UserError(f"checkpoint not found: {args.checkpoint}")
    out, numbered_from = choose_out(args.out, args.checkpoint, args.overwrite)
    set_cpu_threads()
    from ..device import pick_device

    loaded = load_denoiser(args.checkpoint, pick_device(args.device))
    if args.num_samples is None:
        args.num_samples = loaded.cfg.sample.num_samples
    old = earlier_outputs(out)  # only with --overwrite (choose_out refused them otherwise)
    scratch = None

    def cleanup() -> None:
        remove_scratch(scratch)

    kept = f"the {len(old)} earlier images in {out} are unchanged" if old else "nothing was written"
    with write_failures(f"the samples for {out}", out.parent, f"free space there or choose another --out; {kept}",
                        cleanup):
        scratch = make_scratch(out)
        args.out = str(scratch)  # the features' finishers write strips and low-res stages there too
        images, grid = sample_into(args, loaded, feature_list, scratch)
        out = publish(scratch, out, numbered_from)
    if old:
        print(f"--overwrite: replaced the {len(old)} images an earlier call wrote in {out}")
    print(f"wrote {len(images)} samples and {grid} to {out}")
    return out


def sample_into(args: argparse.Namespace, loaded: LoadedModel, feature_list: list[Feature], folder: Path):
    """Plan, sample and write every image into `folder`; returns the images and the grid's file name."""
    from ..memory import check_sampling_memory
    from ..sampling.images import save_grid, save_png
    from ..sampling.plan import run_plan

    settings = sampler_settings(args, loaded)
    resolution = loaded.cfg.data.resolution
    check_sampling_memory(args.num_samples, args.batch_size, resolution, loaded.device)  # before the plan lists them
    plan = make_plan(args, loaded, feature_list, settings)
    check_sampling_memory(len(plan.items), args.batch_size, resolution, loaded.device)
    images = run_plan(loaded, plan, settings)
    for index, (image, item) in enumerate(zip(images, plan.items)):
        save_png(image, folder / f"sample_{index:04d}.png", item.meta)
    save_grid(images, folder / "grid.png", nrow=args.num_samples if len(images) > args.num_samples else None)
    return images, "grid.png"
