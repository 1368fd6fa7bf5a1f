"""CLIP guidance (GLIDE): steer samples toward a caption with a CLIP's gradient.

- `NoiseAwareGuide`: a CLIP trained here on x_t (task: clip); log p(c | x_t) ~ logit_scale *
  cos(f(x_t, t), g(c)), differentiated at x_t like a classifier.
- `CleanGuide`: a pretrained open_clip model that never saw noise scores the predicted x0, clamped
  to [-1, 1] (the range it was trained on), resized and normalised its way.

How a clean CLIP's gradient reaches x_t. Holding eps fixed, d x0/d x_t = 1 / sqrt(ab); the eps-form
shift would then move x0 by s (1 - ab) / ab * grad_x0, about 25,000 s at t = 999 on the linear
schedule, which throws the sample out of range at high noise. We instead use the posterior mean's
own Jacobian under a standard-normal data prior, E[x0 | x_t] = sqrt(ab) x_t, i.e. d x0/d x_t ~
sqrt(ab): x0 then moves by s (1 - ab) grad_x0, never more than s grad_x0 and fading to nothing as
t -> 0 like every guidance term. It costs no backward pass through the U-Net (unlike
differentiating the denoiser) and, unlike Crowson's x_t/x0 blend, needs no extra weighting rule.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..checkpoints.load import LoadedModel
from ..errors import UserError, first_line
from ..sampling.guidance import GuidanceTerm, StepInfo, gradient_term, guide_time_map, shift_eps
from ..sampling.schedule import Schedule, epsilon_to_x0

CUTOUT_SEED_OFFSET = 1_000_003  # cutout generators: seed + offset, separate from the sampling noise
CUTOUT_MIN_SIZE = 0.5  # smallest cutout side, as a fraction of the image side


class NoiseAwareGuide:
    """A NoisyCLIP run, scoring x_t at the CLIP time of the denoiser's noise level (the same t when both
    were trained with the same schedule; else mapped through sigma, within the levels the CLIP was
    trained at: `guide_time_map`), read through the CLIP's own formulation (edm: c_in x and c_noise)."""

    def __init__(self, loaded: LoadedModel, denoiser_schedule: Schedule):
        self.model, self.schedule = loaded.model, loaded.schedule
        self.t_map = guide_time_map(denoiser_schedule, loaded.schedule)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return self.model.encode_prompts(prompts).float()

    def term(self, text: torch.Tensor, scale: float, form: str, seeds: Sequence[int]) -> GuidanceTerm:
        def log_prob(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.model.similarity(*self.schedule.network_input(x, self.t_map(t)), text.to(x.device))

        return gradient_term(log_prob, scale, form)


class CleanGuide:
    """A pretrained open_clip model: it scores clamp(x0, -1, 1), with optional random cutouts
    (crops of x0, each resized to the CLIP input) averaged as CLIP-guided diffusion does. It reads x0,
    not x_t, so it sets no noise range (`schedule` None: no churn ceiling)."""

    schedule = None

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
        """logit_scale * cos(image, text) per sample, for x0 in [-1, 1]."""
        image = self.model.encode_image(self.views(x0, generators), normalize=True)
        cos = (image.view(x0.shape[0], -1, image.shape[-1]) * text[:, None].to(image.device)).sum(-1).mean(dim=1)
        return self.model.logit_scale.exp() * cos

    def term(self, text: torch.Tensor, scale: float, form: str, seeds: Sequence[int]) -> GuidanceTerm:
        generators = [torch.Generator().manual_seed(seed + CUTOUT_SEED_OFFSET) for seed in seeds]

        def term(eps: torch.Tensor, info: StepInfo) -> torch.Tensor:
            if scale == 0:
                return eps
            x0 = epsilon_to_x0(eps, info.x, info.alpha_bar).detach().float().clamp(-1, 1)
            with torch.enable_grad(), torch.autocast(info.x.device.type, enabled=False):
                x0.requires_grad_(True)
                grad_x0 = torch.autograd.grad(self.similarity(x0, text, generators).sum(), x0)[0]
            return shift_eps(eps, info.alpha_bar.sqrt() * grad_x0, scale, form, info)  # d x0/d x_t ~ sqrt(ab)

        return term


def load_open_clip(arch: str, weights: str | None, device: torch.device | str) -> tuple[torch.nn.Module, Callable]:
    """An open_clip model and tokenizer from a built-in architecture name (or a model-config .json)
    and a local weights file or, when asked by name, a pretrained tag. Never downloads unasked."""
    import open_clip

    name = arch
    if arch.endswith(".json"):
        if not Path(arch).is_file():
            raise UserError(f"open_clip model config not found: {arch}")
        from ..structured import load_json  # the shared loader: a damaged file is one line, not open_clip's traceback

        load_json(arch, "open_clip model config", dict, "a JSON object (embed_dim, vision_cfg, text_cfg)")
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
