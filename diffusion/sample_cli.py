"""The sample.py command line.

Core options pick the checkpoint, sampler, seeds and guidance scale. Each feature module
(class labels here; prompts, classifier and CLIP guidance, in-painting elsewhere) contributes
its own options and adds to the sampling plan, so this file does not grow per feature.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Protocol

import torch

from .errors import UserError, exit_on_user_error
from .device import pick_device
from .generate import LoadedModel, SampleItem, SamplingPlan, load_model, run_plan, save_grid, save_png
from .schedule import SAMPLERS

Variant = tuple[dict[str, torch.Tensor], dict[str, str], dict]  # (cond, meta, extra) shared by a group of samples


class Feature(Protocol):
    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def variants(self, args: argparse.Namespace, loaded: LoadedModel, variants: list[Variant]) -> list[Variant]:
        """Refine or multiply the condition variants (one group of --num-samples images each)."""
        ...

    def extend(self, args: argparse.Namespace, loaded: LoadedModel, plan: SamplingPlan) -> None:
        """Add guidance terms, hooks or finishers to the plan."""
        ...


class ClassLabel:
    def add_arguments(self, parser):
        parser.add_argument("--class-label", type=int, default=None,
                            help="class index for a class-conditional model (default: cycle through classes)")

    def variants(self, args, loaded, variants):
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
        for cond, meta, extra in variants:
            for label in labels:
                name = names[label] if label < len(names) else str(label)
                out.append(({**cond, "labels": torch.tensor([label])}, {**meta, "label": str(label), "class_name": name},
                            {**extra, "label": label}))
        return out

    def extend(self, args, loaded, plan):
        pass


FEATURE_MODULES = ["diffusion.features.text", "diffusion.features.classifier", "diffusion.features.clip",
                   "diffusion.features.inpaint"]


def load_features() -> list[Feature]:
    """The class-label feature plus every feature module that exists (each exposes FEATURE)."""
    features: list[Feature] = [ClassLabel()]
    for name in FEATURE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        features.append(module.FEATURE)
    return features


def build_parser(features: list[Feature]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sample.py", description="Sample images from a trained checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="run directory (newest checkpoint, EMA weights) or one checkpoint")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance: 0 = unconditional, 1 = conditional, >1 = guided (default: config)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the run's config")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's config)")
    parser.add_argument("--num-samples", type=int, default=8, help="images per condition (class or prompt)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed+i, so each image can be regenerated alone")
    parser.add_argument("--out", default="samples", help="output directory")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    for feature in features:
        feature.add_arguments(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.guidance_scale is not None and args.guidance_scale < 0:
        raise UserError(f"--guidance-scale must be >= 0 (0 = unconditional, 1 = conditional), got {args.guidance_scale}")
    if args.steps is not None and args.steps <= 0:
        raise UserError(f"--steps must be positive, got {args.steps}")
    if args.num_samples <= 0 or args.batch_size <= 0:
        raise UserError("--num-samples and --batch-size must be positive")


def make_plan(args: argparse.Namespace, loaded: LoadedModel, features: list[Feature], settings: dict[str, str]) -> SamplingPlan:
    variants: list[Variant] = [({}, {}, {})]
    for feature in features:
        variants = feature.variants(args, loaded, variants)
    items = []
    for cond, meta, extra in variants:
        for _ in range(args.num_samples):
            seed = args.seed + len(items)
            items.append(SampleItem(seed=seed, cond=dict(cond), meta={**settings, **meta, "seed": str(seed)}, extra=dict(extra)))
    plan = SamplingPlan(items)
    for feature in features:
        feature.extend(args, loaded, plan)
    return plan


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path:
    features = load_features()
    args = build_parser(features).parse_args(argv)
    check_args(args)
    device = pick_device(args.device)
    loaded = load_model(args.checkpoint, device)
    if getattr(loaded.cfg, "task", "denoiser") != "denoiser":
        raise UserError(f"{args.checkpoint} is a {loaded.cfg.task} checkpoint; --checkpoint needs a denoiser")
    sampler = args.sampler or loaded.cfg.sample.sampler
    steps = args.steps or (1000 if sampler == "ddpm" and args.sampler else loaded.cfg.sample.steps)
    scale = loaded.cfg.sample.guidance_scale if args.guidance_scale is None else args.guidance_scale
    settings = {"sampler": sampler, "steps": str(steps), "guidance_scale": str(scale), "checkpoint": str(loaded.path)}
    plan = make_plan(args, loaded, features, settings)
    images = run_plan(loaded, plan, sampler, steps, scale, args.batch_size)
    out = Path(args.out)
    for index, (image, item) in enumerate(zip(images, plan.items)):
        save_png(image, out / f"sample_{index:04d}.png", item.meta)
    save_grid(images, out / "grid.png", nrow=args.num_samples if len(images) > args.num_samples else None)
    print(f"wrote {len(images)} samples and grid.png to {out}")
    return out
