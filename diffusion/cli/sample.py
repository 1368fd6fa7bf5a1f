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
from ..threads import prefer_passive_waits, set_cpu_threads
from . import classifier, clip, inpaint, prompts, upsample
from .args import Parser, add_trust_argument, apply_trust

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
                            help="class index for a class-conditional model (default: cycle through classes)")

    def variants(self, args, loaded, variants):
        import torch

        model = loaded.model
        if getattr(model, "condition", "none") != "class":
            if args.class_label is not None and not getattr(args, "classifier", None):
                raise UserError("--class-label needs a class-conditional checkpoint (model.condition=class) or --classifier")
            return variants
        n = model.num_classes
        if args.class_label is not None and not 0 <= args.class_label < n:
            raise UserError(f"--class-label {args.class_label} is out of range: this model has classes 0..{n - 1}")
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
    return [ClassLabel(), prompts.TextPromptFeature(), classifier.ClassifierGuidanceFeature(), clip.ClipGuidance(),
            inpaint.InpaintFeature(), upsample.UpsampleFeature()]


def build_parser(feature_list: list[Feature]) -> argparse.ArgumentParser:
    parser = Parser(prog="sample.py", description="Sample images from a trained checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="run directory (newest checkpoint, EMA weights) or one checkpoint")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance: 0 = unconditional, 1 = conditional, >1 = guided (default: config)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the run's config")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's config)")
    parser.add_argument("--num-samples", type=int, default=8, help="images per condition (class or prompt)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed+i, so each image can be regenerated alone")
    parser.add_argument("--out", default="samples", help="output directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the PNGs an earlier call wrote in --out first (otherwise such an --out is refused)")
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
    if args.guidance_scale is not None and args.guidance_scale < 0:
        raise UserError(f"--guidance-scale must be >= 0 (0 = unconditional, 1 = conditional), got {args.guidance_scale}")
    if args.steps is not None and args.steps <= 0:
        raise UserError(f"--steps must be positive, got {args.steps}")
    if args.num_samples <= 0 or args.batch_size <= 0:
        raise UserError("--num-samples and --batch-size must be positive")
    if not 0 <= args.seed < 2**63 - 2**32:  # sample i uses seed + i, a torch.Generator seed
        raise UserError(f"--seed must be a whole number in [0, 2^63), got {args.seed}")
    check_sigma_args(args)


OUTPUTS = ("sample_*.png", "strip_*.png", "bicubic_*.png", "lowres_*.png", "grid.png")  # what sample.py writes


def earlier_outputs(out: Path) -> list[Path]:
    """The PNGs an earlier call wrote in --out; refused unless --overwrite (mixed with this call's, an
    earlier call's extra images would pass for this one's)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: choose another --out")
    return sorted(p for pattern in OUTPUTS for p in out.glob(pattern)) if out.is_dir() else []


def check_out(out: Path, overwrite: bool) -> None:
    old = earlier_outputs(out)
    if old and not overwrite:
        raise UserError(f"--out {out} already holds {len(old)} images from an earlier call ({old[0].name}, ...): "
                        "pass --overwrite to delete them first, or choose another --out")


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
    items = []
    for template in variants:
        for _ in range(args.num_samples):
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
    out = Path(args.out)
    check_out(out, args.overwrite)
    if not Path(args.checkpoint).exists():  # before the slow imports (load_model would say the same)
        raise UserError(f"checkpoint not found: {args.checkpoint}")
    set_cpu_threads()
    from ..device import pick_device
    from ..sampling.images import save_grid, save_png
    from ..memory import check_sampling_memory
    from ..sampling.plan import run_plan

    loaded = load_denoiser(args.checkpoint, pick_device(args.device))
    settings = sampler_settings(args, loaded)
    resolution = loaded.cfg.data.resolution
    check_sampling_memory(args.num_samples, args.batch_size, resolution, loaded.device)  # before the plan lists them
    plan = make_plan(args, loaded, feature_list, settings)
    check_sampling_memory(len(plan.items), args.batch_size, resolution, loaded.device)
    old = earlier_outputs(out)  # --overwrite (check_out refused them otherwise); finishers write during the run
    for path in old:
        path.unlink()
    if old:
        print(f"--overwrite: deleted {len(old)} images an earlier call wrote in {out}")
    images = run_plan(loaded, plan, settings)
    for index, (image, item) in enumerate(zip(images, plan.items)):
        save_png(image, out / f"sample_{index:04d}.png", item.meta)
    save_grid(images, out / "grid.png", nrow=args.num_samples if len(images) > args.num_samples else None)
    print(f"wrote {len(images)} samples and grid.png to {out}")
    return out
