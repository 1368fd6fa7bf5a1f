"""Prompt/class accuracy on the shapes dataset, judged by the pixel-reading detector.

For each of the 12 (colour, shape) classes it draws samples asking for that class (a class label
for class-conditional models or --classifier guidance, a prompt "a red circle" for caption models
or --clip guidance), reads each image's colour and shape from its pixels, and prints the accuracy
for every combination of the swept scales. Any other sample.py option passes through.

  python -m diffusion.evaluate shapes-accuracy --checkpoint R --guidance-scale 0,1,3 --num-samples 200
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import tempfile
from pathlib import Path

import torch

from ..checkpoints.load import load_model
from ..cli.sample import build_parser, check_args, features, make_plan, sampler_settings
from ..data.shapes import CLASS_NAMES, class_attributes, detect_label
from ..device import pick_device
from ..errors import UserError
from ..sampling.plan import run_plan

PASS_UNKNOWN = True
SWEEPS = ("guidance_scale", "classifier_scale", "clip_scale")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated numbers, got '{text}'") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--num-samples", type=int, default=120, help="total samples per setting, spread over the 12 classes")
    parser.add_argument("--guidance-scale", default="1", help="comma-separated CFG scales to sweep")
    parser.add_argument("--classifier-scale", default=None, help="comma-separated classifier-guidance scales (with --classifier)")
    parser.add_argument("--clip-scale", default=None, help="comma-separated CLIP-guidance scales (with --clip)")
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    parser.add_argument("--detect-resolution", type=int, default=None,
                        help="area-downsample samples to this size before detecting (e.g. 16 for 64-px cascade samples)")


def class_request(label: int, use_prompt: bool) -> list[str]:
    colour, shape = class_attributes(label)
    return ["--prompt", f"a {colour} {shape}"] if use_prompt else ["--class-label", str(label)]


def class_samples(args: argparse.Namespace, rest: list[str], settings: dict[str, float]) -> torch.Tensor:
    """Samples asking for each class in turn, `ceil(num_samples / 12)` per class, class-major order.

    Class `label` uses seeds `label * 100000 + i`, so every setting and method sees the same noise.
    """
    feature_list = features()
    parser = build_parser(feature_list)
    per_class = max(1, math.ceil(args.num_samples / len(CLASS_NAMES)))
    base = ["--checkpoint", args.checkpoint, "--num-samples", str(per_class), *rest]
    for key, value in settings.items():
        base += [f"--{key.replace('_', '-')}", str(value)]
    probe = parser.parse_args(base)
    loaded = load_model(probe.checkpoint, pick_device(getattr(probe, "device", None)))
    if loaded.cfg.data.name != "shapes":
        raise UserError(f"shapes-accuracy needs a shapes model; {args.checkpoint} was trained on {loaded.cfg.data.name}")
    use_prompt = loaded.cfg.model.condition == "text" or getattr(probe, "clip", None) is not None
    out = []
    with tempfile.TemporaryDirectory(prefix="shapes-accuracy-") as scratch:  # a cascade writes its low-res stage there
        if "--out" not in rest:
            base += ["--out", scratch]
        for label in range(len(CLASS_NAMES)):
            sample_args = parser.parse_args(base + class_request(label, use_prompt) + ["--seed", str(label * 100_000)])
            check_args(sample_args)
            sampling = sampler_settings(sample_args, loaded)
            plan = make_plan(sample_args, loaded, feature_list, sampling)
            out.append(run_plan(loaded, plan, sampling, bar=False))
    return torch.cat(out)


def accuracy(args: argparse.Namespace, rest: list[str], settings: dict[str, float]) -> float:
    """Fraction of samples whose detected class is the requested one."""
    images = class_samples(args, rest, settings)
    size = getattr(args, "detect_resolution", None)  # callers such as guidance_comparison pass their own namespace
    if size and size < images.shape[-1]:
        images = torch.nn.functional.interpolate(images.float(), size=size, mode="area")
    per_class = len(images) // len(CLASS_NAMES)
    return sum(detect_label(img) == i // per_class for i, img in enumerate(images)) / len(images)


def run(parsed: tuple[argparse.Namespace, list[str]]) -> None:
    args, rest = parsed
    sweeps = {"guidance_scale": _floats(args.guidance_scale)}
    if args.classifier_scale is not None:
        sweeps["classifier_scale"] = _floats(args.classifier_scale)
    if args.clip_scale is not None:
        sweeps["clip_scale"] = _floats(args.clip_scale)
    rows = []
    print(" | ".join([*sweeps, "accuracy", "n"]))
    for values in itertools.product(*sweeps.values()):
        settings = dict(zip(sweeps, values))
        acc = accuracy(args, rest, settings)
        n = math.ceil(args.num_samples / len(CLASS_NAMES)) * len(CLASS_NAMES)
        rows.append({**settings, "accuracy": acc, "n": n})
        print(" | ".join([*(f"{v:g}" for v in values), f"{acc:.3f}", str(n)]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
