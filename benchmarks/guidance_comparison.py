"""CFG vs classifier guidance vs CLIP guidance on shapes, in one table (GLIDE's comparison, at toy scale).

Every method asks for the same 12 (colour, shape) classes with the same seeds, sampler, steps and
sample count, and is scored by the same pixel detector (diffusion.evaluate.shapes_accuracy):
  cfg         the caption-conditioned denoiser, prompt "a red circle", classifier-free guidance scale s
  classifier  the unconditional denoiser + a noise-aware classifier, class label, classifier scale s
  clip        the unconditional denoiser + a noise-aware CLIP, prompt "a red circle", CLIP scale s
Methods whose checkpoint is missing are skipped with a note.

  python benchmarks/guidance_comparison.py --num-samples 120 --json guidance_comparison.json
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.cli.help_format import DefaultsHelpFormatter  # noqa: E402  (torch-free)


def build_parser() -> argparse.ArgumentParser:
    """The options (torch-free, so --help is fast)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--text-model", default="runs/shapes_text", help="caption-conditioned denoiser (CFG)")
    parser.add_argument("--uncond", default="runs/shapes_uncond", help="unconditional denoiser (classifier, CLIP)")
    parser.add_argument("--classifier", default="runs/classifier_shapes")
    parser.add_argument("--clip", default="runs/clip_shapes")
    parser.add_argument("--cfg-scales", default="0,1,2,3,5")
    parser.add_argument("--classifier-scales", default="0,1,3,10")
    parser.add_argument("--clip-scales", default="0,1,3,10")
    parser.add_argument("--num-samples", type=int, default=120, help="per setting, spread over the 12 classes")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--sample-args", default="", help='extra sample.py options for every row, e.g. "--guidance-interval 0 600"')
    parser.add_argument("--methods", default="cfg,classifier,clip", help="which methods to run")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--grid", default=None, help="also draw a PNG: per method, 2 rows of the 12 classes at its best scale")
    return parser


if __name__ == "__main__":  # --help and bad flags answer before torch is imported (0.1 s, not 10-30 s)
    build_parser().parse_args()

from diffusion.data.shapes import CLASS_NAMES  # noqa: E402
from diffusion.errors import exit_on_user_error  # noqa: E402
from diffusion.evaluate.shapes_accuracy import _floats, accuracy, class_samples  # noqa: E402
from diffusion.sampling.images import save_grid  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)



def methods(args: argparse.Namespace) -> list[tuple[str, str, list[str], str, list[float]]]:
    """(name, denoiser, extra sample.py options, swept option, scales) per method."""
    return [
        ("cfg", args.text_model, [], "guidance_scale", _floats(args.cfg_scales)),
        ("classifier", args.uncond, ["--classifier", args.classifier], "classifier_scale", _floats(args.classifier_scales)),
        ("clip", args.uncond, ["--clip", args.clip], "clip_scale", _floats(args.clip_scales)),
    ]


def settings_for(swept: str, scale: float) -> dict[str, float]:
    """The swept scale; classifier and CLIP guidance run on the unconditional model without CFG."""
    return {swept: scale} if swept == "guidance_scale" else {"guidance_scale": 0.0, swept: scale}


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    n = math.ceil(args.num_samples / len(CLASS_NAMES)) * len(CLASS_NAMES)
    common = ["--sampler", args.sampler, "--steps", str(args.steps), *shlex.split(args.sample_args)]
    rows: list[dict] = []
    print(f"shapes prompt accuracy: 12 classes, {n} samples per row, {args.sampler} {args.steps} steps, same seeds")
    print(f"{'method':<11}| {'scale':>6} | accuracy")
    for name, denoiser, extra, swept, scales in methods(args):
        if name not in args.methods.split(","):
            continue
        needed = [denoiser] + extra[1:]
        missing = [path for path in needed if not Path(path).exists()]
        if missing:
            print(f"{name:<11}| skipped: {', '.join(missing)} not found")
            continue
        for scale in scales:
            settings = settings_for(swept, scale)
            probe = argparse.Namespace(checkpoint=denoiser, num_samples=args.num_samples)
            acc = accuracy(probe, [*common, *extra], settings)
            rows.append({"method": name, "denoiser": denoiser, "scale": scale, "accuracy": acc, "n": n})
            print(f"{name:<11}| {scale:>6g} | {acc:.3f}", flush=True)
    best = {}
    for row in rows:
        if row["accuracy"] > best.get(row["method"], {"accuracy": -1})["accuracy"]:
            best[row["method"]] = row
    print("best: " + ", ".join(f"{m} {r['accuracy']:.3f} (scale {r['scale']:g})" for m, r in best.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.grid and best:
        draw_grid(args, common, best, Path(args.grid))
    return rows


def draw_grid(args: argparse.Namespace, common: list[str], best: dict[str, dict], path: Path, per_class: int = 2) -> None:
    """Rows of the 12 classes, `per_class` rows per method at its best scale, the same seeds for all."""
    import torch
    import torch.nn.functional as F

    rows = []
    for name, denoiser, extra, swept, _ in methods(args):
        if name not in best:
            continue
        scale = best[name]["scale"]
        settings = settings_for(swept, scale)
        probe = argparse.Namespace(checkpoint=denoiser, num_samples=per_class * len(CLASS_NAMES))
        images = class_samples(probe, [*common, *extra], settings)
        rows.append(images.view(len(CLASS_NAMES), per_class, *images.shape[1:]).transpose(0, 1).flatten(0, 1))
        print(f"grid rows {len(rows) * per_class - per_class + 1}-{len(rows) * per_class}: {name} at scale {scale:g}")
    grid = F.interpolate(torch.cat(rows).float(), scale_factor=3, mode="nearest")
    save_grid(grid, path, nrow=len(CLASS_NAMES))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
