"""In-painting quality: channels vs replace vs repaint on held-out images with the same seeded masks.

For each method it in-paints the same images under the same masks (box, strokes, half, border,
drawn from --seed) with the same sampler, steps and seeds, and reports the MSE against the original
inside the masked region (pixel values in [0, 1]; lower is closer to the original) per mask type,
and the known region's max abs error, which must be 0 (the known pixels are pasted back).

  python -m diffusion.evaluate inpaint --checkpoint INPAINT_RUN [--base-checkpoint BASE_RUN]

`channels` runs on --checkpoint (an in-painting checkpoint); replace and repaint run on
--base-checkpoint if given, else on --checkpoint. Images come from --images DIR or from the
checkpoint's dataset, held-out split.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..checkpoints.load import LoadedModel, load_model
from ..checkpoints.store import run_dir_of
from ..conditioning.inpaint import files
from ..conditioning.inpaint.masks import MASK_TYPES, seeded_mask_grid
from ..conditioning.inpaint.methods import METHODS, is_inpaint_model, run_inpainting
from ..data import build_dataset
from ..device import default_precision, pick_device
from ..errors import UserError
from ..io import atomic_write_text
from ..sampling.plan import SamplerSettings, sigma_options
from ..sampling.samplers import SAMPLERS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="denoiser run (an in-painting one for the channels method)")
    parser.add_argument("--base-checkpoint", default=None, help="run used by replace and repaint (default: --checkpoint)")
    parser.add_argument("--methods", default=None, help="comma-separated, from channels,replace,repaint (default: all that apply)")
    parser.add_argument("--mask-types", default=",".join(MASK_TYPES))
    parser.add_argument("--num-images", type=int, default=16, help="held-out images; each gets every mask type")
    parser.add_argument("--images", default=None, help="folder of images (default: the checkpoint's dataset)")
    parser.add_argument("--split", default="test", help="dataset split of the held-out images")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="the same for every method (repaint needs ddpm, ddim, heun or euler)")
    parser.add_argument("--steps", type=int, default=None, help="default: the checkpoint's sample.steps")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="CFG scale for conditional models")
    parser.add_argument("--jump-length", type=int, default=5)
    parser.add_argument("--jump-n-sample", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None, help="where the table is written as JSON (default: RUN/eval/inpaint.json)")


def held_out(loaded: LoadedModel, args: argparse.Namespace) -> tuple[torch.Tensor, list[dict]]:
    """Images (N, 3, R, R) and each one's own condition (class label or caption), if it has one."""
    res = loaded.cfg.data.resolution
    if args.images:
        images, _ = files.load_image_folder(args.images, res, args.num_images)
        return images, [{} for _ in images]
    data_cfg = loaded.cfg.data
    data_cfg.hflip = False
    dataset = build_dataset(data_cfg, args.split)
    items = [dataset[i] for i in range(min(args.num_images, len(dataset)))]
    conds = [loaded.model.condition_from_batch({"image": it["image"][None], "label": torch.tensor([it["label"]]),
                                                "caption": [it["caption"]]}) for it in items]
    return torch.stack([it["image"] for it in items]), [{k: v.cpu() for k, v in c.items()} for c in conds]


def score(results: torch.Tensor, images: torch.Tensor, keeps: torch.Tensor, kinds: list[str]) -> dict[str, float]:
    """Masked-region MSE per mask type and overall ([0, 1] pixel scale), and the known region's max abs error."""
    hole = 1.0 - keeps
    sq = ((results - images) / 2) ** 2 * hole
    row: dict[str, float] = {}
    per_kind = torch.tensor([MASK_TYPES.index(k) for k in kinds]).repeat(len(images) // len(kinds))
    for k, kind in enumerate(kinds):
        sel = per_kind == MASK_TYPES.index(kind)
        row[kind] = float(sq[sel].sum() / (3 * hole[sel].sum()).clamp_min(1))
    row["all"] = float(sq.sum() / (3 * hole.sum()).clamp_min(1))
    known = (results - images).abs() * keeps
    row["known_max_abs"] = float(known.max())
    return row


def run_name(checkpoint: Path) -> str:
    """runs/x/checkpoints/step-000100 -> x@step-000100; runs/x/final -> x."""
    if checkpoint.parent.name == "checkpoints":
        return f"{checkpoint.parent.parent.name}@{checkpoint.name}"
    return checkpoint.parent.name if checkpoint.name == "final" else checkpoint.name


def methods_for(args: argparse.Namespace, loaded: LoadedModel) -> list[str]:
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise UserError(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
        return methods
    return list(METHODS) if is_inpaint_model(loaded.cfg) else ["replace", "repaint"]


def run(args: argparse.Namespace) -> list[dict]:
    device = pick_device(args.device)
    main = load_model(args.checkpoint, device)
    base = load_model(args.base_checkpoint, device) if args.base_checkpoint else main
    if base.cfg.data.resolution != main.cfg.data.resolution:
        raise UserError("--base-checkpoint makes images of another resolution than --checkpoint")
    kinds = [k.strip() for k in args.mask_types.split(",") if k.strip()]
    res, steps = main.cfg.data.resolution, args.steps or main.cfg.sample.steps
    images, conds = held_out(main, args)
    images = images.repeat_interleave(len(kinds), 0)
    conds = [c for c in conds for _ in kinds]
    keeps = seeded_mask_grid(kinds, len(images) // len(kinds), res, args.seed)
    rows = []
    header = ["method", "checkpoint", *kinds, "all", "known_max_abs", "seconds"]
    print(f"{len(images) // len(kinds)} images x {len(kinds)} mask types, sampler {args.sampler}, {steps} steps; "
          "masked-region MSE in [0, 1] pixel units (lower = closer to the original)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for method in methods_for(args, main):
        loaded = main if method == "channels" else base
        # Conditions only fit the model they were made for; base models of another kind get none.
        same_kind = loaded.cfg.model.condition == main.cfg.model.condition
        start = time.perf_counter()
        settings = SamplerSettings(args.sampler, steps, args.guidance_scale, args.batch_size,
                                   default_precision(device), sigma_options(loaded.cfg.sample))
        results = run_inpainting(loaded, images, keeps, method, settings, conds=conds if same_kind else None,
                                 seed=args.seed, jump_length=args.jump_length, jump_n_sample=args.jump_n_sample)
        row = {"method": method, "checkpoint": str(loaded.path), **score(results, images, keeps, kinds),
               "seconds": time.perf_counter() - start}
        rows.append(row)
        cells = [method, run_name(loaded.path),
                 *(f"{row[k]:.4f}" for k in [*kinds, "all"]), f"{row['known_max_abs']:.1g}", f"{row['seconds']:.0f}"]
        print("| " + " | ".join(cells) + " |", flush=True)
    path = Path(args.json) if args.json else run_dir_of(main.path) / "eval" / "inpaint.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(rows, indent=2))
    print(f"report: {path}")
    return rows
