"""sample.py feature: in-painting (`--image in.png --mask mask.png`).

Mask files: white = region to generate, black = keep (`--invert-mask` flips them). The image is
resized and centre-cropped to the model's resolution and the mask gets the same transform.
In-painting checkpoints (model.inpaint: true) use their mask channels by default; any other
checkpoint in-paints with `replace` (or `repaint`). The known pixels are pasted back into every
result, and `strip_NNNN.png` (input | mask overlay | result) is written beside each sample.
In-painting checkpoints sampled without --image generate from an all-unknown mask.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..choices import INPAINT_METHODS
from ..errors import UserError

if TYPE_CHECKING:  # the rest is imported where it is used, so that building the parser needs no torch
    import torch

    from ..checkpoints.load import LoadedModel
    from ..sampling.plan import SampleItem, SamplingPlan


class InpaintFeature:
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("in-painting")
        group.add_argument("--image", default=None, help="image to in-paint (resized and centre-cropped to the model)")
        group.add_argument("--mask", default=None, help="mask file: white = region to generate, black = keep")
        group.add_argument("--invert-mask", action="store_true", help="the mask file marks what to keep in white")
        group.add_argument("--inpaint-method", choices=INPAINT_METHODS, default=None,
                           help="channels (in-painting checkpoints, their default), replace (default otherwise) "
                                "or repaint (replace plus RePaint's resampling jumps)")
        group.add_argument("--jump-length", type=int, default=5, help="repaint: steps per jump back in time")
        group.add_argument("--jump-n-sample", type=int, default=5,
                           help="repaint: times each stretch is denoised (1 = no jumps, plain replace)")

    def method(self, args: argparse.Namespace, loaded: LoadedModel) -> str:
        from ..conditioning.inpaint import methods

        method = args.inpaint_method or methods.default_method(loaded.cfg)
        methods.check_method(method, loaded.cfg, args.sampler or loaded.cfg.sample.sampler)
        return method

    def variants(self, args, loaded, variants):
        from ..conditioning.inpaint import files, methods
        from ..sampling.plan import KnownPixels

        if args.image is None:
            if args.mask is not None or args.inpaint_method is not None or args.invert_mask:
                raise UserError("--mask, --invert-mask and --inpaint-method need --image IMAGE")
            if not methods.is_inpaint_model(loaded.cfg):
                return variants
            blank = {"channels": methods.unknown_channels(1, loaded.cfg.data.resolution)}
            return [item.but(cond={**item.cond, **blank}, meta={**item.meta, "inpaint": "all unknown"})
                    for item in variants]
        if args.mask is None:
            raise UserError("--image needs --mask MASK (white = region to generate, black = keep)")
        method = self.method(args, loaded)
        res = loaded.cfg.data.resolution
        image = files.load_image(args.image, res)
        keep = files.load_mask(args.mask, res, args.invert_mask)
        files.warn_coverage(keep)
        added = methods.inpaint_condition(loaded.cfg, image, keep, method)
        info = {"image": str(args.image), "mask": str(args.mask), "invert_mask": str(args.invert_mask),
                "inpaint_method": method}
        if method == "repaint":
            info.update(jump_length=str(args.jump_length), jump_n_sample=str(args.jump_n_sample))
        known = KnownPixels(image, keep)
        return [item.but(cond={**item.cond, **added}, meta={**item.meta, **info}, known=known) for item in variants]

    def extend(self, args: argparse.Namespace, loaded: LoadedModel, plan: SamplingPlan) -> None:
        if args.image is None:
            return
        from ..conditioning.inpaint import files, methods
        from ..sampling.images import save_png

        methods.add_to_plan(plan, self.method(args, loaded), args.jump_length, args.jump_n_sample)
        position = {id(item): index for index, item in enumerate(plan.items)}
        out = Path(args.out)

        def write_strips(images: torch.Tensor, items: list[SampleItem]) -> torch.Tensor:
            """input | mask overlay | result for each sample, beside sample_NNNN.png."""
            for image, item in zip(images, items):
                picture = files.strip(item.known.image, item.known.keep, image)
                save_png(files.upscale(picture), out / f"strip_{position[id(item)]:04d}.png", item.meta)
            return images

        plan.finishers.append(write_strips)


