"""FID and KID of samples against a reference set, with one protocol so numbers can be compared.

  python -m diffusion.evaluate fid --samples RUN_OR_CHECKPOINT --reference cifar10 --num-samples 50000 \\
      --sampler ddim --steps 100 --guidance-scale 1
  python -m diffusion.evaluate fid --samples DIR_OF_PNGS --reference DIR_OF_IMAGES --feature-extractor feats.pt

The protocol: samples from a checkpoint are drawn in batches with fixed per-sample seeds (sample i
of the plan uses seed+i; classes or prompts cycle), written as PNG (lossless) and scored as the uint8
values in those files. Reference images are resized and centre-cropped to the samples' resolution
and scored as uint8 too; their statistics are cached per dataset, split, resolution, count and
feature extractor. Features come from torchmetrics' FID Inception-v3 (torch-fidelity's port of the
TF network, pool3, TF1-style resize to 299) or from any TorchScript module given as
--feature-extractor. Any other sample.py option (--prompt, --classifier ...) passes through.

Beside FID and KID, in the same feature space: precision and recall (Kynkäänniemi et al. 2019),
density and coverage (Naeem et al. 2020), k = 3, on at most 10,000 samples against at most
--prdc-reference-num reference features (the seeded rows the cache keeps), and, when the extractor
has a classification head (`logits`) and the samples carry their class (PNG "label"), the head's
accuracy on the asked class. Every figure gets a 95% interval (diffusion/evaluate/quality.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm.auto import tqdm

from ..checkpoints.load import load_model
from ..cli.sample import build_parser, check_args, features, make_plan, sampler_settings
from ..cli.help_format import DefaultsHelpFormatter
from ..data.common import IMAGE_ERRORS, listdir, load_rgb, open_image
from ..device import pick_device
from ..errors import UserError, first_line
from ..io import atomic_write_text
from ..sampling.images import png_text, save_png
from ..sampling.plan import SampleItem, run_plan
from .extractors import RESIZES, build_extractor
from .feature_stats import KID_MAX, KID_SUBSET_SIZE, KID_SUBSETS, FeatureStats, accumulate, scores
from .quality import BOOTSTRAP_ROUNDS, NEAREST_K, fid_interval, prdc, wilson_interval
from .reference import default_cache_dir, reference_config, reference_stats

PASS_UNKNOWN = True
SKIPPED_NAMES = ("grid.png",)  # sample.py's overview grid is not a sample
FID_INTERVAL_MAX_DIM = 512  # FID's bootstrap: one D x D eigen-decomposition per round (cheap at 128-d, not 2048)
NO_HEAD = "n/a (extractor has no classification head)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = DefaultsHelpFormatter  # the description keeps its lines; every option shows its default
    parser.add_argument("--samples", required=True, help="a directory of sample images, or a run/checkpoint to sample from")
    parser.add_argument("--reference", default=None,
                        help="image directory, or dataset NAME[:SPLIT] (shapes, cifar10, celeba, imagefolder); "
                             "default with a checkpoint: the data it was trained on")
    parser.add_argument("--reference-split", default=None, help="split of the reference (default train)")
    parser.add_argument("--reference-root", default=None, help="data root of a named reference dataset")
    parser.add_argument("--reference-num", type=int, default=0, help="use the first N reference images (0 = all)")
    parser.add_argument("--num-samples", type=int, default=50000, help="samples to score")
    parser.add_argument("--sampler", default=None, help="ddpm, ddim, dpmsolver, heun or euler (default: the run's config)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's config; ddpm: 1000)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (0 uncond., 1 cond.; default: config)")
    parser.add_argument("--seed", type=int, default=0, help="sample i uses seed+i")
    parser.add_argument("--batch-size", type=int, default=64, help="for sampling and feature extraction")
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--feature-extractor", default=None, help="TorchScript file: uint8 (N,3,H,W) -> (N,D) features")
    parser.add_argument("--inception-weights", default=None, help="local copy of the FID Inception weights (offline use)")
    parser.add_argument("--inception-resize", choices=RESIZES, default="tf1",
                        help="tf1: the original FID resize (published numbers); antialias: torchmetrics' default")
    parser.add_argument("--cache-dir", default=None, help=f"reference statistics cache (default {default_cache_dir()})")
    parser.add_argument("--sample-dir", default=None, help="where generated PNGs go (default: next to --out)")
    parser.add_argument("--out", default="fid_report.json", help="JSON report")
    parser.add_argument("--workers", type=int, default=2, help="data-loading workers for the reference")
    parser.add_argument("--kid-subsets", type=int, default=KID_SUBSETS)
    parser.add_argument("--kid-subset-size", type=int, default=KID_SUBSET_SIZE)
    parser.add_argument("--prdc-reference-num", type=int, default=None,
                        help=f"reference features for precision/recall/density/coverage, a seeded subset of the "
                             f"at most {KID_MAX} the cache keeps; default: as many as samples (the papers' equal "
                             "sets: recall and coverage fall when the reference outnumbers the samples)")
    parser.add_argument("--bootstrap-rounds", type=int, default=BOOTSTRAP_ROUNDS,
                        help="resamples of the samples for the 95%% intervals")


def image_files(directory: Path) -> list[Path]:
    """The sample images in `directory`; a folder that cannot be read is a UserError (`listdir`)."""
    return sorted(p for p in (Path(e.path) for e in listdir(directory, "samples folder"))
                  if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS and p.name not in SKIPPED_NAMES)


def image_size(path: Path) -> int:
    return image_header(path)[0]


def image_header(path: Path) -> tuple[int, dict[str, str]]:
    """(width, PNG text chunks) of an image file, or a one-line UserError naming it (`open_image`: header
    only, bounded size). The width as stored: samples are square, so orientation does not change it."""
    with open_image(path, "sample") as img:
        try:
            return img.width, dict(getattr(img, "text", {}))
        except IMAGE_ERRORS as err:
            raise UserError(f"cannot read sample {path}: {first_line(err)}") from None


def png_matches(path: Path, meta: dict[str, str]) -> bool:
    """Whether `path` is a PNG already generated with exactly these settings (a resumed run)."""
    try:
        with open_image(path, "sample") as img:
            return img.format == "PNG" and dict(getattr(img, "text", {})) == png_text(meta)
    except (UserError, *IMAGE_ERRORS):  # missing, unreadable or damaged: generate it again
        return False


def image_batches(paths: list[Path], batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 (B, 3, H, W) batches of image files, refusing mixed or non-square sizes."""
    size = None
    for start in range(0, len(paths), batch_size):
        images = []
        for path in paths[start:start + batch_size]:
            array = np.asarray(load_rgb(path))
            size = size or array.shape
            if array.shape != size or size[0] != size[1]:
                raise UserError(f"sample {path} is {array.shape[1]}x{array.shape[0]}; all samples must be square "
                                f"and one size ({size[1]}x{size[0]})")
            images.append(torch.from_numpy(array.copy()).permute(2, 0, 1))
        yield torch.stack(images)


def interleave(items: list[SampleItem], groups: int, limit: int) -> list[SampleItem]:
    """Round-robin over condition groups (classes, prompts), so any prefix is balanced."""
    per = len(items) // groups
    return [items[g * per + i] for i in range(per) for g in range(groups)][:limit]


def generate(args: argparse.Namespace, rest: list[str], device: torch.device) -> tuple[list[Path], dict]:
    """Sample `--num-samples` PNGs from a checkpoint into the sample directory, reusing matching files."""
    loaded = load_model(args.samples, device)
    if loaded.cfg.task != "denoiser":
        raise UserError(f"{args.samples} is a {loaded.cfg.task} checkpoint; --samples needs a denoiser or a directory")
    feature_list = features()
    parser = build_parser(feature_list)
    base = ["--checkpoint", args.samples, "--seed", str(args.seed), "--batch-size", str(args.batch_size), *rest]
    for flag, value in (("--sampler", args.sampler), ("--steps", args.steps), ("--guidance-scale", args.guidance_scale)):
        if value is not None:
            base += [flag, str(value)]
    probe = parser.parse_args(base + ["--num-samples", "1"])
    check_args(probe)
    settings = sampler_settings(probe, loaded)
    sampler, steps, scale = settings.sampler, settings.steps, settings.guidance_scale
    variants = [SampleItem(seed=0)]
    for feature in feature_list:  # how many condition groups (classes, prompts) the plan cycles through
        variants = feature.variants(probe, loaded, variants)
    per_group = math.ceil(args.num_samples / len(variants))
    plan = make_plan(parser.parse_args(base + ["--num-samples", str(per_group)]), loaded, feature_list, settings)
    items = interleave(plan.items, len(variants), args.num_samples)
    out = Path(args.sample_dir) if args.sample_dir else Path(args.out).with_name(Path(args.out).stem + "_samples")
    paths = [out / f"sample_{i:05d}.png" for i in range(len(items))]
    todo = [i for i, (path, item) in enumerate(zip(paths, items)) if not png_matches(path, item.meta)]
    if len(todo) < len(items):
        print(f"reusing {len(items) - len(todo)} matching samples in {out}")
    chunk = args.batch_size * 4
    for start in tqdm(range(0, len(todo), chunk), desc=f"sampling {len(todo)} images", leave=False):
        batch = todo[start:start + chunk]
        images = run_plan(loaded, dataclasses.replace(plan, items=[items[i] for i in batch]), settings, bar=False)
        for i, image in zip(batch, images):
            save_png(image, paths[i], items[i].meta)
    info = {"source": "checkpoint", "checkpoint": str(loaded.path), "step": loaded.info.step, "sample_dir": str(out),
            "sampler": sampler, "steps": steps, "guidance_scale": scale, "seed": args.seed, "groups": len(variants),
            "extra_options": rest, "resolution": image_size(paths[0]), "trained_on": loaded.cfg.data}
    return paths, info


def number(text: str | None, kind: type) -> int | float | None:
    try:
        return kind(text) if text is not None else None
    except ValueError:
        return None


def directory_samples(args: argparse.Namespace) -> tuple[list[Path], dict]:
    files = image_files(Path(args.samples))
    if len(files) < 2:
        raise UserError(f"{args.samples} holds {len(files)} images; FID needs at least 2")
    if len(files) < args.num_samples:
        print(f"note: scoring all {len(files)} images in {args.samples} (fewer than --num-samples {args.num_samples}); "
              "FID is biased upwards at small n, compare only at equal n")
    files = files[:args.num_samples]
    jpegs = sum(p.suffix.lower() in (".jpg", ".jpeg") for p in files)
    if jpegs:
        print(f"note: {jpegs} sample images are JPEG; compression artefacts raise FID (sample.py writes PNG)")
    meta = image_header(files[0])[1]
    info = {"source": "directory", "sample_dir": str(Path(args.samples).resolve()), "sampler": meta.get("sampler"),
            "steps": number(meta.get("steps"), int), "resolution": image_size(files[0]),
            "guidance_scale": number(meta.get("guidance_scale"), float),
            "checkpoint": meta.get("checkpoint"), "settings_from": "PNG metadata of the first image" if meta else None}
    return files, info


def is_image_dir(path: Path) -> bool:
    return path.is_dir() and any(True for _ in image_files(path))


def sample_label(path: Path) -> int | None:
    """The class a sample was asked for: its PNG "label" text (sample.py writes it), or None."""
    text = image_header(path)[1].get("label")
    return int(text) if text is not None and text.strip().isdigit() else None


def class_accuracy(labels: list[int | None], predicted: list[torch.Tensor], classes: int) -> dict:
    """The head's accuracy on the asked class over the labelled samples, with Wilson's 95% interval."""
    known = [(i, label) for i, label in enumerate(labels) if label is not None]
    if not known:
        return {"class_accuracy_note": "n/a (the samples carry no class label)"}
    highest = max(label for _, label in known)
    if highest >= classes:
        return {"class_accuracy_note": f"n/a (the samples ask for class {highest}; the extractor's head has "
                                       f"{classes} classes)"}
    guesses = torch.cat(predicted)
    correct = sum(int(guesses[i]) == label for i, label in known)
    accuracy = wilson_interval(correct, len(known))
    return {"class_accuracy": accuracy.value, "class_accuracy_ci95": [accuracy.lo, accuracy.hi],
            "class_accuracy_n": len(known),
            "class_accuracy_note": f"the extractor's head on the asked class; Wilson 95%, {len(known)} labelled samples"}


def reference_rows(stats: FeatureStats, limit: int, seed: int = 0) -> torch.Tensor:
    """At most `limit` of the reference feature rows the cache keeps, a seeded subset."""
    rows = stats.kid
    if len(rows) <= limit:
        return rows
    return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:limit].sort().values]


def moments(stats: FeatureStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance (n - 1) of a set from its feature sum and outer-product sum."""
    mean = stats.total.double() / stats.count
    return mean, (stats.outer.double() - stats.count * torch.outer(mean, mean)) / (stats.count - 1)


def quality(ref: FeatureStats, fake: FeatureStats, fid: float, args: argparse.Namespace) -> dict:
    """Precision, recall, density, coverage and FID's interval, each as `NAME` and `NAME_ci95` [lo, hi]."""
    real = reference_rows(ref, args.prdc_reference_num or len(fake.kid))
    out: dict = {"prdc": {"k": NEAREST_K, "n_samples": len(fake.kid), "n_reference": len(real),
                          "bootstrap_rounds": args.bootstrap_rounds, "seed": 0,
                          "interval": "bootstrap over samples, reference and k-NN radii fixed, 2.5-97.5 percentile "
                                      "spread around the point estimate"}}
    if min(len(real), len(fake.kid)) < NEAREST_K + 1:
        out["prdc"]["note"] = f"n/a (k={NEAREST_K} needs at least {NEAREST_K + 1} samples and reference images)"
    else:
        for name, interval in prdc(real, fake.kid, NEAREST_K, args.bootstrap_rounds).items():
            out[name], out[f"{name}_ci95"] = interval.value, [interval.lo, interval.hi]
    if ref.dim > FID_INTERVAL_MAX_DIM:
        out["fid_ci95_note"] = f"not computed for {ref.dim}-d features (one {ref.dim}-d eigen-decomposition per round)"
    else:
        interval = fid_interval(*moments(ref), fake.kid, fid, args.bootstrap_rounds)
        out["fid_ci95"] = [interval.lo, interval.hi]
        out["fid_ci95_note"] = (f"bootstrap over {len(fake.kid)} sample features, reference statistics fixed, "
                                "2.5-97.5 percentile spread around the point estimate")
    return out


def shown(report: dict, name: str, digits: int = 3) -> str:
    """`value [lo, hi]` of a metric in the report, or n/a."""
    if report.get(name) is None:
        return "n/a"
    lo, hi = report.get(f"{name}_ci95") or (None, None)
    interval = f" [{lo:.{digits}f}, {hi:.{digits}f}]" if lo is not None else ""
    return f"{report[name]:.{digits}f}{interval}"


def print_report(report: dict) -> None:
    s, r, q = report["samples"], report["reference"], report["prdc"]
    setting = f"{s['sampler']}, {s['steps']} steps, guidance {s['guidance_scale']}" if s.get("sampler") else "settings unknown"
    fid_note = "" if report.get("fid_ci95") else f"; FID interval: {report['fid_ci95_note']}"
    print(f"FID {shown(report, 'fid', 4)}   KID {report['kid_mean']:.6f} ± {report['kid_std']:.6f} "
          f"({report['kid_subsets']} subsets of {report['kid_subset_size']}){fid_note}")
    if q.get("note"):
        print(f"precision, recall, density, coverage: {q['note']}")
    else:
        print(f"precision {shown(report, 'precision')}   recall {shown(report, 'recall')}   "
              f"density {shown(report, 'density')}   coverage {shown(report, 'coverage')}")
        print(f"  (k={q['k']}, {q['n_samples']} samples against {q['n_reference']} reference features; "
              f"95% bootstrap over samples, {q['bootstrap_rounds']} rounds)")
    if report.get("class_accuracy") is None:
        print(f"class accuracy: {report['class_accuracy_note']}")
    else:
        print(f"class accuracy {shown(report, 'class_accuracy')} ({report['class_accuracy_note']})")
    print(f"n={report['n']} samples ({setting}) against {r['n']} images of {r['reference']} at {r['resolution']}px; "
          f"features: {report['feature_extractor']['name']}")


def run(parsed: tuple[argparse.Namespace, list[str]]) -> dict:
    args, rest = parsed
    if args.num_samples < 2 or args.batch_size <= 0:
        raise UserError("--num-samples must be at least 2 and --batch-size positive")
    if args.prdc_reference_num is not None and not NEAREST_K + 1 <= args.prdc_reference_num <= KID_MAX:
        raise UserError(f"--prdc-reference-num must be between {NEAREST_K + 1} and {KID_MAX} (the reference features "
                        f"the cache keeps), got {args.prdc_reference_num}")
    if not 20 <= args.bootstrap_rounds <= 100_000:
        raise UserError(f"--bootstrap-rounds must be between 20 and 100000 (a 95% interval needs its 2.5% tails), "
                        f"got {args.bootstrap_rounds}")
    device = pick_device(args.device)
    if not Path(args.samples).exists():
        from ..checkpoints.diffusers_folder import download, looks_like_hub_name

        if not looks_like_hub_name(args.samples):
            raise UserError(f"--samples {args.samples} not found: give a directory of images or a run/checkpoint "
                            "directory")
        args.samples = str(download(args.samples))  # a published diffusers model (docs/pretrained.md)
    extractor = build_extractor(args.feature_extractor, args.inception_weights, args.inception_resize, device)
    if is_image_dir(Path(args.samples)):
        if rest:
            raise UserError(f"unknown options {' '.join(rest)} (sampling options need --samples CHECKPOINT)")
        paths, info = directory_samples(args)
    else:
        paths, info = generate(args, rest, device)
    trained_on = info.pop("trained_on", None)
    data = reference_config(args.reference, args.reference_split, args.reference_root, trained_on, info["resolution"])
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    ref, ref_info = reference_stats(data, args.reference_num, extractor, cache_dir, args.batch_size, args.workers)
    batches = tqdm(image_batches(paths, args.batch_size), total=-(-len(paths) // args.batch_size),
                   desc="sample features", leave=False)
    predicted: list[torch.Tensor] = []  # the head's classes, batch by batch, beside the features
    classes = [0]

    def features_of(batch_iter: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        for images in batch_iter:
            if extractor.has_head:
                logits = extractor.logits(images)
                predicted.append(logits.argmax(dim=1))
                classes[0] = logits.shape[1]
            yield extractor(images)

    fake = accumulate(features_of(batches), len(paths))
    result = scores(ref, fake, args.kid_subsets, args.kid_subset_size)
    result.update(quality(ref, fake, result["fid"], args))
    if extractor.has_head:
        result.update(class_accuracy([sample_label(path) for path in paths], predicted, classes[0]))
    else:
        result["class_accuracy_note"] = NO_HEAD
    report = {"n": len(paths), **result, "sampler": info.get("sampler"), "steps": info.get("steps"),
              "guidance_scale": info.get("guidance_scale"), "reference": ref_info,
              "feature_extractor": {"name": extractor.name, "key": extractor.key, "dim": ref.dim},
              "samples": info, "device": str(device), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "protocol": "PNG samples scored as uint8; reference resized+cropped to the samples' resolution, uint8"}
    atomic_write_text(Path(args.out), json.dumps(report, indent=2))
    print_report(report)
    print(f"report: {args.out}")
    return report
