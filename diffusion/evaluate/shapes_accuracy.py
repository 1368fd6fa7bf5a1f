"""Prompt/class accuracy on the shapes dataset, judged by the pixel-reading detector.

For each of the 12 (colour, shape) classes it draws samples asking for that class (a class label
for class-conditional models or --classifier guidance, a prompt "a red circle" for caption models
or --clip guidance), reads each image's colour and shape from its pixels, and prints the accuracy
for every combination of the swept scales. Any other sample.py option passes through.

--num-samples N is taken as given: N // 12 samples per class, one more for the first N % 12 classes.
The table is also written as JSON, by default to RUN/eval/shapes_accuracy.json (--json FILE elsewhere).

  python -m diffusion.evaluate shapes-accuracy --checkpoint R --guidance-scale 0,1,3 --num-samples 200
"""
from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

import torch

from ..checkpoints.load import load_model
from ..checkpoints.store import resolve_checkpoint, run_dir_of
from ..cli.sample import build_parser, check_args, features, make_plan, sampler_settings
from ..data.shapes import CLASS_NAMES, class_attributes, detect_label
from ..device import pick_device
from ..errors import UserError
from ..io import atomic_write_text
from ..sampling.plan import run_plan

PASS_UNKNOWN = True
REPORT_NAME = "shapes_accuracy.json"
SWEEPS = ("guidance_scale", "classifier_scale", "clip_scale")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated numbers, got '{text}'") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--num-samples", type=int, default=120,
                        help="samples per setting, spread over the 12 classes (N // 12 each, one more for the first N %% 12)")
    parser.add_argument("--guidance-scale", default="1", help="comma-separated CFG scales to sweep")
    parser.add_argument("--classifier-scale", default=None, help="comma-separated classifier-guidance scales (with --classifier)")
    parser.add_argument("--clip-scale", default=None, help="comma-separated CLIP-guidance scales (with --clip)")
    parser.add_argument("--json", default=None, help="where the table is written as JSON (default: RUN/eval/shapes_accuracy.json)")
    parser.add_argument("--detect-resolution", type=int, default=None,
                        help="area-downsample samples to this size before detecting (e.g. 16 for 64-px cascade samples)")


def class_request(label: int, use_prompt: bool) -> list[str]:
    colour, shape = class_attributes(label)
    return ["--prompt", f"a {colour} {shape}"] if use_prompt else ["--class-label", str(label)]


def class_counts(num_samples: int) -> list[int]:
    """Samples per class for a total of `num_samples`: equal shares, the first `num_samples % 12` classes one more."""
    if num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {num_samples}")
    share, extra = divmod(num_samples, len(CLASS_NAMES))
    return [share + (label < extra) for label in range(len(CLASS_NAMES))]


def class_samples(args: argparse.Namespace, rest: list[str], settings: dict[str, float]) -> torch.Tensor:
    """Samples asking for each class in turn (`class_counts` of them), class-major order.

    Class `label` uses seeds `label * 100000 + i`, so every setting and method sees the same noise.
    """
    feature_list = features()
    parser = build_parser(feature_list)
    counts = class_counts(args.num_samples)
    base = ["--checkpoint", args.checkpoint, *rest]
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
        for label, count in enumerate(counts):
            if count == 0:
                continue
            sample_args = parser.parse_args(base + ["--num-samples", str(count)] + class_request(label, use_prompt)
                                            + ["--seed", str(label * 100_000)])
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
    labels = [label for label, count in enumerate(class_counts(len(images))) for _ in range(count)]
    return sum(detect_label(img) == label for img, label in zip(images, labels)) / len(images)


def run(parsed: tuple[argparse.Namespace, list[str]]) -> None:
    args, rest = parsed
    sweeps = {"guidance_scale": _floats(args.guidance_scale)}
    if args.classifier_scale is not None:
        sweeps["classifier_scale"] = _floats(args.classifier_scale)
    if args.clip_scale is not None:
        sweeps["clip_scale"] = _floats(args.clip_scale)
    path = Path(args.json) if args.json else run_dir_of(resolve_checkpoint(args.checkpoint)) / "eval" / REPORT_NAME
    if path.is_dir():
        raise UserError(f"--json {path} is a folder: give a file name, e.g. {path / REPORT_NAME}")
    class_counts(args.num_samples)  # a bad count is refused before any sampling
    rows = []
    print(" | ".join([*sweeps, "accuracy", "n"]))
    for values in itertools.product(*sweeps.values()):
        settings = dict(zip(sweeps, values))
        acc = accuracy(args, rest, settings)
        rows.append({**settings, "accuracy": acc, "n": args.num_samples})
        print(" | ".join([*(f"{v:g}" for v in values), f"{acc:.3f}", str(args.num_samples)]), flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(rows, indent=2))
    print(f"report: {path}")
