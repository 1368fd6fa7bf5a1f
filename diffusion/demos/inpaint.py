"""In-painting demo: rows of photos, columns of mask types, each cell input | mask overlay | result.

  python -m diffusion.demos.inpaint --checkpoint R --images DIR --out DIR

Masks are drawn reproducibly from --seed (the training mask generators: box, strokes, half,
border). The default method is `channels` for in-painting checkpoints and `replace` otherwise.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from ..checkpoints.load import load_model
from ..cli.args import Parser, add_trust_argument, apply_trust
from ..conditioning.inpaint import files
from ..conditioning.inpaint.masks import MASK_TYPES, seeded_mask_grid
from ..conditioning.inpaint.methods import METHODS, default_method, run_inpainting
from ..device import default_precision, pick_device
from ..errors import UserError, exit_on_user_error
from ..io import atomic_write
from ..sampling.images import to_pil
from ..sampling.plan import SamplerSettings, sigma_options
from ..sampling.samplers import SAMPLERS


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m diffusion.demos.inpaint", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="denoiser run directory or checkpoint")
    parser.add_argument("--images", required=True, help="folder of photos (the first --num-images, by name)")
    parser.add_argument("--out", required=True, help="output folder for inpaint_demo.png")
    parser.add_argument("--num-images", type=int, default=6)
    parser.add_argument("--mask-types", default=",".join(MASK_TYPES), help=f"comma-separated, from {', '.join(MASK_TYPES)}")
    parser.add_argument("--method", choices=METHODS, default=None)
    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the run's config (ddim for repaint)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--jump-length", type=int, default=5)
    parser.add_argument("--jump-n-sample", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zoom", type=int, default=2, help="nearest-neighbour enlargement of the grid")
    parser.add_argument("--device", default=None)
    add_trust_argument(parser)
    return parser


def label_columns(grid: Image.Image, names: list[str], cell_width: int, pad: int) -> Image.Image:
    """The grid with a header naming each column's mask type."""
    header = 14
    out = Image.new("RGB", (grid.width, grid.height + header), "white")
    out.paste(grid, (0, header))
    draw = ImageDraw.Draw(out)
    for k, name in enumerate(names):
        draw.text((pad + k * (cell_width + pad) + 2, 1), name, fill="black")
    return out


@exit_on_user_error
def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    apply_trust(args)
    kinds = [k.strip() for k in args.mask_types.split(",") if k.strip()]
    if not kinds or args.num_images <= 0:
        raise UserError("--mask-types needs at least one type and --num-images must be positive")
    device = pick_device(args.device)
    loaded = load_model(args.checkpoint, device)
    res = loaded.cfg.data.resolution
    method = args.method or default_method(loaded.cfg)
    sampler = args.sampler or ("ddim" if method == "repaint" else loaded.cfg.sample.sampler)
    photos, _ = files.load_image_folder(args.images, res, args.num_images)
    images = photos.repeat_interleave(len(kinds), 0)
    keeps = seeded_mask_grid(kinds, len(photos), res, args.seed)
    settings = SamplerSettings(sampler, args.steps or loaded.cfg.sample.steps, args.guidance_scale,
                               precision=default_precision(device), sigmas=sigma_options(loaded.cfg.sample))
    results = run_inpainting(loaded, images, keeps, method, settings, seed=args.seed, jump_length=args.jump_length,
                             jump_n_sample=args.jump_n_sample, bar=True)
    cells = torch.stack([files.strip(im, kp, r, pad=2) for im, kp, r in zip(images, keeps, results)])
    pad = 4
    grid = make_grid(cells, nrow=len(kinds), padding=pad, pad_value=1.0)
    grid = files.upscale(grid, grid.shape[-2] * args.zoom)
    picture = label_columns(to_pil(grid), kinds, cells.shape[-1] * args.zoom, pad * args.zoom)
    out = Path(args.out) / "inpaint_demo.png"
    atomic_write(out, lambda tmp: picture.save(tmp, format="PNG", optimize=True))
    print(f"wrote {out} ({len(photos)} images x {len(kinds)} mask types, method {method})")
    return out


if __name__ == "__main__":
    main()
