"""CLIP guidance for sample.py (GLIDE): steer samples toward --prompt with a CLIP's gradient.

  --clip RUN              a noise-aware CLIP trained here (task: clip): gradient of f(x_t, t) . g(c) w.r.t. x_t
  --clip open_clip:ARCH   a clean open_clip model with --clip-weights FILE (or a pretrained tag, online):
                          it scores the predicted x0, resized to its input size and normalised its way

Both enter as a guidance term on epsilon (every sampler), or as the DDPM mean shift with
--guidance-form mean (an option of the classifier feature). They work on unconditional and
caption-conditioned denoisers, on top of classifier-free guidance.
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import UserError, first_line
from ..generate import LoadedModel, SampleItem, SamplingPlan, load_model
from ..guidance import GuidanceTerm, StepInfo, gradient_term
from ..schedule import epsilon_to_x0
from .classifier import check_form

PRETRAINED_PREFIX = "open_clip:"
DEFAULT_SCALE = 10.0  # the best measured on shapes (noise-aware CLIP, DDPM mean form); sweep it per model
CUTOUT_SEED_OFFSET = 1_000_003  # cutout generators: seed + offset, separate from the sampling noise
CUTOUT_MIN_SIZE = 0.5  # smallest cutout side, as a fraction of the image side


class NoiseAwareGuide:
    """A NoisyCLIP run: log p(c | x_t) ~ logit_scale * cos(f(x_t, t), g(c)), differentiated at x_t."""

    def __init__(self, loaded: LoadedModel, denoiser_alphas: torch.Tensor):
        self.model = loaded.model
        clip_alphas = loaded.scheduler.alphas_cumprod.float()
        # The denoiser's timestep t -> the CLIP timestep with the nearest noise level (identity when
        # both were trained with the same schedule, as they should be).
        self.t_map = (denoiser_alphas.float()[:, None] - clip_alphas[None]).abs().argmin(dim=1)
        self.t_map = self.t_map.to(next(loaded.model.parameters()).device)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.model.encode_prompts(prompts).float()

    def term(self, text: torch.Tensor, scale: float, form: str, seeds: list[int]) -> GuidanceTerm:
        def log_prob(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.model.similarity(x, self.t_map[t], text)

        return gradient_term(log_prob, scale, form)


class CleanGuide:
    """A pretrained open_clip model that never saw noise: it scores the predicted x0.

    x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab) with eps held constant (the denoiser is not
    differentiated: one forward pass per step, no backward through the U-Net). The gradient
    with respect to x_t is then the CLIP gradient at x0 times 1 / sqrt(ab), and goes through the
    same eps / mean forms as the noise-aware CLIP. Optional random cutouts (crops of x0, each
    resized to the CLIP input) average the score over views, as CLIP-guided diffusion does.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Callable, cutouts: int = 0):
        self.model, self.tokenizer, self.cutouts = model, tokenizer, cutouts
        pre = getattr(model.visual, "preprocess_cfg", {})
        size = pre.get("size", model.visual.image_size)
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        device = model.logit_scale.device
        self.mean = torch.tensor(pre.get("mean", (0.48145466, 0.4578275, 0.40821073)), device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.get("std", (0.26862954, 0.26130258, 0.27577711)), device=device).view(1, 3, 1, 1)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            tokens = self.tokenizer(prompts).to(self.model.logit_scale.device)
            return self.model.encode_text(tokens, normalize=True).float()

    def views(self, x0: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """(B * max(1, cutouts), 3, h, w): x0 in [0, 1] resized and normalised for the CLIP."""
        images = (x0 + 1) / 2
        if self.cutouts:
            side = images.shape[-1]
            crops = []
            for image, gen in zip(images, generators):
                for _ in range(self.cutouts):
                    u = torch.rand(3, generator=gen).tolist()
                    size = max(1, round(side * (CUTOUT_MIN_SIZE + (1 - CUTOUT_MIN_SIZE) * u[0])))
                    top, left = int(u[1] * (side - size + 1)), int(u[2] * (side - size + 1))
                    crop = image[None, :, top:top + size, left:left + size]
                    crops.append(F.interpolate(crop, size=self.size, mode="bilinear", align_corners=False))
            images = torch.cat(crops)
        else:
            images = F.interpolate(images, size=self.size, mode="bilinear", align_corners=False)
        return (images - self.mean) / self.std

    def similarity(self, x0: torch.Tensor, text: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        image = self.model.encode_image(self.views(x0, generators), normalize=True)
        cos = (image.view(x0.shape[0], -1, image.shape[-1]) * text[:, None]).sum(-1).mean(dim=1)
        return self.model.logit_scale.exp() * cos

    def term(self, text: torch.Tensor, scale: float, form: str, seeds: list[int]) -> GuidanceTerm:
        generators = [torch.Generator().manual_seed(seed + CUTOUT_SEED_OFFSET) for seed in seeds]

        def term(eps: torch.Tensor, info: StepInfo) -> torch.Tensor:
            held = eps.detach()

            def log_prob(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return self.similarity(epsilon_to_x0(held, x, info.alpha_bar), text, generators)

            return gradient_term(log_prob, scale, form)(eps, info)

        return term


def load_open_clip(arch: str, weights: str | None, device: torch.device | str) -> tuple[torch.nn.Module, Callable]:
    """An open_clip model and tokenizer from a built-in architecture name (or a model-config .json)
    and a local weights file or, when asked by name, a pretrained tag. Never downloads unasked."""
    import open_clip

    name = arch
    if arch.endswith(".json"):
        if not Path(arch).is_file():
            raise UserError(f"open_clip model config not found: {arch}")
        open_clip.add_model_config(arch)
        name = Path(arch).stem
    if name not in open_clip.list_models():
        raise UserError(f"unknown open_clip architecture '{arch}': use a name like ViT-B-32 or a model-config .json")
    tags = open_clip.list_pretrained_tags_by_model(name)
    shown = ", ".join(tags[:4]) + (f", ... ({len(tags)} in all)" if len(tags) > 4 else "")
    hint = f"a pretrained tag ({shown})" if tags else "no pretrained tags exist for it"
    if not weights:
        raise UserError(f"--clip open_clip:{arch} needs --clip-weights FILE (e.g. open_clip_pytorch_model.bin) or {hint}")
    if not Path(weights).is_file() and weights not in tags:
        raise UserError(f"CLIP weights file not found: {weights} (give a local open_clip checkpoint or {hint})")
    try:
        with warnings.catch_warnings():  # torch.load's pickle-protocol warning would precede the one-line error
            warnings.simplefilter("ignore")
            model = open_clip.create_model(name, pretrained=weights, device=device)
    except Exception as err:  # a foreign or damaged file fails in many ways (unpickling, safetensors, empty dicts)
        first = first_line(err)
        raise UserError(f"cannot load CLIP weights {weights} into open_clip {name}: {first}") from None
    return model.eval().requires_grad_(False), open_clip.get_tokenizer(name)


def load_guide(args: argparse.Namespace, loaded: LoadedModel, device: torch.device) -> NoiseAwareGuide | CleanGuide:
    spec = args.clip
    if spec.startswith(PRETRAINED_PREFIX):
        model, tokenizer = load_open_clip(spec[len(PRETRAINED_PREFIX):], args.clip_weights, device)
        return CleanGuide(model, tokenizer, args.clip_cutouts)
    if args.clip_weights:
        raise UserError("--clip-weights goes with --clip open_clip:ARCH; a CLIP run directory holds its own weights")
    if args.clip_cutouts:
        raise UserError("--clip-cutouts is for clean open_clip models; a noise-aware CLIP sees the whole x_t")
    clip = load_model(spec, device)
    if clip.cfg.task != "clip":
        raise UserError(f"--clip {spec} is a {clip.cfg.task} checkpoint; give a CLIP run (task: clip) or open_clip:ARCH")
    res, clip_res = loaded.cfg.data.resolution, clip.cfg.data.resolution
    if res != clip_res:
        raise UserError(f"--clip {spec} was trained at {clip_res}x{clip_res} but the denoiser makes {res}x{res} images: "
                        f"retrain it with data.resolution={res}")
    return NoiseAwareGuide(clip, loaded.scheduler.alphas_cumprod)


class ClipGuidance:
    def __init__(self):
        self._guides: dict[tuple, NoiseAwareGuide | CleanGuide] = {}  # evaluators build many plans per run

    def guide(self, args: argparse.Namespace, loaded: LoadedModel) -> NoiseAwareGuide | CleanGuide:
        device = next(loaded.model.parameters()).device
        schedule = loaded.cfg.diffusion
        key = (args.clip, args.clip_weights, args.clip_cutouts, str(device), loaded.cfg.data.resolution,
               schedule.num_train_timesteps, schedule.beta_schedule)
        if key not in self._guides:
            self._guides[key] = load_guide(args, loaded, device)
        return self._guides[key]

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("CLIP guidance (with --prompt)")
        group.add_argument("--clip", default=None, metavar="C",
                           help="noise-aware CLIP run (task: clip), or open_clip:ARCH for a pretrained open_clip model")
        group.add_argument("--clip-scale", type=float, default=None,
                           help=f"CLIP guidance scale s: 0 = unguided (default {DEFAULT_SCALE:g})")
        group.add_argument("--clip-weights", default=None, metavar="FILE",
                           help="weights for --clip open_clip:ARCH: a local file, or a pretrained tag (downloads)")
        group.add_argument("--clip-cutouts", type=int, default=0,
                           help="random crops per image scored by a clean open_clip model (0 = the whole image)")

    def variants(self, args, loaded, variants):
        return variants

    def extend(self, args: argparse.Namespace, loaded: LoadedModel, plan: SamplingPlan) -> None:
        if args.clip is None:
            if args.clip_scale is not None or args.clip_weights or args.clip_cutouts:
                raise UserError("--clip-scale, --clip-weights and --clip-cutouts need --clip C")
            return
        scale = DEFAULT_SCALE if args.clip_scale is None else args.clip_scale
        if scale < 0 or args.clip_cutouts < 0:
            raise UserError("--clip-scale and --clip-cutouts must be >= 0 (scale 0 = unguided)")
        if any(not item.extra.get("prompt") for item in plan.items):
            raise UserError("--clip needs --prompt TEXT: the text that CLIP guidance steers toward")
        form = getattr(args, "guidance_form", "eps")
        check_form(form, args.sampler or loaded.cfg.sample.sampler)
        guide = self.guide(args, loaded)
        prompts = sorted({item.extra["prompt"] for item in plan.items})
        features = dict(zip(prompts, guide.encode_prompts(prompts)))

        def make_term(items: list[SampleItem]) -> GuidanceTerm:
            text = torch.stack([features[item.extra["prompt"]] for item in items])
            return guide.term(text, scale, form, [item.seed for item in items])

        plan.terms.append(make_term)
        for item in plan.items:
            item.meta.update({"clip": args.clip, "clip_scale": f"{scale:g}", "guidance_form": form})


FEATURE = ClipGuidance()
