"""Upsampler quality on held-out real images, against bicubic and bilinear baselines on the same inputs.

Each high-res original is turned into the upsampler's low-res input (as in training: the config's
downsampling, 8-bit quantisation), then super-resolved at each --aug-levels value. Per method:
- psnr, ssim: against the original (torchmetrics; pixels in [0, 1]);
- consistency: PSNR of downsample(result) (the same downsampling) against the low-res input;
- detail: high-frequency power of the result over the original's, the top half of the radially
  averaged power spectrum (radii N/4..N/2, N = the high resolution); 1 = as much fine detail.

  python -m diffusion.evaluate upsample --checkpoint UP_RUN [--aug-levels 0,0.1,0.25] [--num-images 64]
      [--consistency both|on|off]

`--consistency both` (the default) scores every level twice: the model alone ("diffusion") and with
every step projected onto the low-res input ("diffusion+consistency", see `consistency_term`).

Writes OUT/upsample.csv, OUT/upsample.md and OUT/upsample_grid.png (per image: low-res | bicubic |
SR at each level, without then with the projection | original). FID/KID: write the SR, bicubic
and bilinear images with --save-images (OUT/sr_LEVEL[_consistency]/, OUT/bicubic/, OUT/bilinear/)
and score each folder with `python -m diffusion.evaluate fid --samples FOLDER`.
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ..checkpoints.load import load_model
from ..checkpoints.store import run_dir_of
from ..conditioning import upsample as up
from ..device import default_precision, pick_device
from ..errors import UserError
from ..io import atomic_write_text
from ..sampling.images import save_grid, save_png
from ..sampling.plan import SampleItem, SamplerSettings, SamplingPlan, run_plan, sigma_options
from ..sampling.samplers import SAMPLERS
from .inpaint import held_out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="upsampler run (model.upsample: true)")
    parser.add_argument("--aug-levels", default="0,0.1,0.25",
                        help="comma-separated fractions of the training timesteps (edm upsamplers: sigmas)")
    parser.add_argument("--consistency", choices=("both", "on", "off"), default="both",
                        help="score the SR with the low-res consistency projection, without it, or both")
    parser.add_argument("--num-images", type=int, default=64, help="held-out images")
    parser.add_argument("--images", default=None, help="folder of high-res images (default: the checkpoint's dataset)")
    parser.add_argument("--split", default="test", help="dataset split of the held-out images")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the checkpoint's config")
    parser.add_argument("--steps", type=int, default=None, help="default: the checkpoint's sample.steps")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="CFG scale for conditional upsamplers")
    parser.add_argument("--grid-images", type=int, default=6, help="images shown in the picture grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None, help="output directory (default: RUN/eval/upsample)")
    parser.add_argument("--save-images", action="store_true",
                        help="also write every SR, bicubic and bilinear image (for FID/KID)")


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().clamp(-1, 1) + 1) / 2)


def high_frequency_power(images: torch.Tensor) -> torch.Tensor:
    """Mean power over radii N/4..N/2 of the radially averaged spectrum, one value per image (N, C, H, W)."""
    x = to_unit(images)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fftshift(torch.fft.fft2(x).abs() ** 2, dim=(-2, -1)).mean(dim=1)  # (N, H, W)
    h, w = power.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h) - h // 2, torch.arange(w) - w // 2, indexing="ij")
    radius = (yy**2 + xx**2).float().sqrt().round().long()
    nyquist = min(h, w) // 2
    profile = torch.stack([power[:, radius == r].mean(dim=-1) for r in range(nyquist + 1)], dim=-1)  # (N, R)
    return profile[:, nyquist // 2:].mean(dim=-1)


def score(results: torch.Tensor, originals: torch.Tensor, low: torch.Tensor, cfg) -> dict[str, float]:
    """PSNR/SSIM against the originals, consistency PSNR against the low-res input, detail ratio."""
    res, orig = to_unit(results), to_unit(originals)
    down = to_unit(up.resample(results.float(), low.shape[-1], cfg.upsample.downsample))
    return {
        "psnr": float(peak_signal_noise_ratio(res, orig, data_range=1.0)),
        "ssim": float(structural_similarity_index_measure(res, orig, data_range=1.0)),
        "consistency_psnr": float(peak_signal_noise_ratio(down, to_unit(low), data_range=1.0)),
        "detail": float(high_frequency_power(results).sum() / high_frequency_power(originals).sum()),
    }


def parse_levels(text: str, formulation: str = "ddpm") -> list[float]:
    """Fractions of the timesteps in [0, 1], or sigmas >= 0 for an edm upsampler."""
    top, what = (float("inf"), "sigmas >= 0") if formulation == "edm" else (1.0, "fractions in [0, 1]")
    try:
        levels = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--aug-levels must be comma-separated {what}; got {text!r}") from None
    if not levels or not all(0.0 <= v <= top for v in levels):
        raise UserError(f"--aug-levels must be comma-separated {what}; got {text!r}")
    return levels


def run(args: argparse.Namespace) -> list[dict]:
    parse_levels(args.aug_levels, "edm")  # the form, before loading anything
    device = pick_device(args.device)
    loaded = load_model(args.checkpoint, device)
    if not loaded.cfg.model.upsample:
        raise UserError(f"{args.checkpoint} is not an upsampler (model.upsample: false)")
    levels = parse_levels(args.aug_levels, loaded.cfg.diffusion.formulation)
    cfg = loaded.cfg
    originals, conds = held_out(loaded, args)
    low = up.make_low_res(originals, cfg.upsample)
    res = cfg.data.resolution
    settings = SamplerSettings(args.sampler or cfg.sample.sampler, args.steps or cfg.sample.steps, args.guidance_scale,
                               args.batch_size, default_precision(device), sigma_options(cfg.sample))
    out = Path(args.out) if args.out else run_dir_of(loaded.path) / "eval" / "upsample"
    rows, shown = [], {}

    def add(method: str, fraction: float | str, results: torch.Tensor, seconds: float, folder: str,
            meta: dict[str, str]) -> None:
        """Score one method's results; keep them for the grid (under `folder`), and write them there if asked."""
        rows.append({"method": method, "aug_level": fraction, **score(results, originals, low, cfg), "seconds": seconds})
        shown[folder] = results
        if args.save_images:
            for i, image in enumerate(results):
                save_png(image, out / folder / f"{i:04d}.png", meta)

    for name in ("bicubic", "bilinear"):
        start = time.perf_counter()
        results = up.resample(low, res, name).clamp(-1, 1)
        add(name, "", results, time.perf_counter() - start, name, {"method": name})
    projections = {"both": (False, True), "on": (True,), "off": (False,)}[args.consistency]
    for fraction, project in ((f, p) for f in levels for p in projections):
        level = up.aug_level(fraction, loaded.schedule)
        items = [SampleItem(seed=args.seed + i, low_res=low[i:i + 1], cond={**conds[i], **up.sampling_condition(
            low[i:i + 1], cfg, loaded.schedule, level, args.seed + i)}) for i in range(len(low))]
        plan = SamplingPlan(items, constraints=[up.consistency_constraint(cfg)] if project else [])
        start = time.perf_counter()
        results = run_plan(loaded, plan, settings)
        add("diffusion+consistency" if project else "diffusion", fraction, results, time.perf_counter() - start,
            f"sr_{fraction:g}{'_consistency' if project else ''}", {"aug_level": str(fraction), "consistency": str(project)})
    write_reports(rows, out, settings, len(originals))
    n = min(args.grid_images, len(originals))
    columns = [up.resample(low[:n], res, "nearest"), shown["bicubic"][:n],
               *(v[:n] for k, v in shown.items() if k.startswith("sr_")), originals[:n]]
    save_grid(torch.stack(columns, dim=1).flatten(0, 1), out / "upsample_grid.png", nrow=len(columns))
    return rows


def write_reports(rows: list[dict], out: Path, settings: SamplerSettings, count: int) -> None:
    keys = ["method", "aug_level", "psnr", "ssim", "consistency_psnr", "detail", "seconds"]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "upsample.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"{count} held-out images, {settings.sampler} {settings.steps} steps; PSNR/SSIM vs the original, "
             "consistency = PSNR(downsample(result), low-res), detail = high-frequency power / original's (1 = as much)",
             "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [str(row["method"]), str(row["aug_level"]),
                 *(f"{row[k]:.3f}" for k in ("psnr", "ssim", "consistency_psnr", "detail")), f"{row['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(out / "upsample.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
