"""The example inputs the documented in-painting and upsampling commands use, drawn reproducibly.

  python docs/examples/make_inputs.py [--out docs/examples]

in.png: a large blue circle (class 2 of the shapes dataset), 64x64, drawn by the dataset's own renderer.
mask.png: white = region to generate, black = keep: a band across the middle third of the circle.
sample.py resizes and centre-crops both to the model's resolution (16 px for the shapes configs).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from diffusion.data.shapes import render

SIZE = 64
BAND = (22, 42)  # rows of the white band (pixels to generate)


def example_image() -> Image.Image:
    return Image.fromarray(render({"colour": "blue", "shape": "circle", "size": "large", "dx": 0.0, "dy": 0.0}, SIZE))


def example_mask() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[BAND[0]:BAND[1]] = 255
    return Image.fromarray(mask)  # 2-D uint8: greyscale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent), help="folder for in.png and mask.png")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    example_image().save(out / "in.png")
    example_mask().save(out / "mask.png")
    print(f"wrote {out / 'in.png'} and {out / 'mask.png'}")


if __name__ == "__main__":
    main()
