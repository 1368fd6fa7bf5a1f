"""`RUN/final` as a diffusers `DiffusionPipeline`: images in three lines, without our command line.

    from diffusion.pipeline import GuidedDiffusionPipeline
    pipe = GuidedDiffusionPipeline.from_pretrained("runs/shapes/final")
    images = pipe(class_labels=[2, 2], guidance_scale=3.0, num_inference_steps=25).images

Caption runs take `prompt=["a red circle"]` instead of `class_labels`. Training writes
`final/model_index.json` naming this class and its components, which the subclass's
`from_pretrained` reads. Guidance
follows the repository's convention: 0 = unconditional, 1 = conditional, above 1 = CFG. The
sampler is DDIM (trailing spacing) from the run's training schedule; `scheduler=` may replace it.
edm runs (diffusion.formulation: edm) load with diffusers' `EDMDPMSolverMultistepScheduler` (or
`EDMEulerScheduler`): the U-Net is EDM's F, whose preconditioning (c_in, c_skip, c_out, with
c_noise = ln(sigma) / 4 as the timestep) those schedulers apply themselves.
This is a plain diffusers loop for users of that library; `sample.py` remains the reference
sampler (seeds per image, every guidance kind, in-painting).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, EDMDPMSolverMultistepScheduler, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .config import DiffusionConfig

PIPELINE_CLASS = "GuidedDiffusionPipeline"


class GuidedDiffusionPipeline(DiffusionPipeline):
    """Class- or caption-conditional pixel diffusion with classifier-free guidance."""

    _optional_components = ["text_encoder"]  # caption runs only

    def __init__(self, unet, scheduler, text_encoder=None):
        super().__init__()
        if isinstance(scheduler, DDIMScheduler) and scheduler.config.timestep_spacing != "trailing":
            scheduler = DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing")  # as sample.py
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder)

    def _condition(self, class_labels, prompt, batch: int, device) -> tuple[dict, dict]:
        """(conditional, unconditional) keyword arguments for the U-Net."""
        if self.text_encoder is not None:
            from .models.text import empty_tokens_like, tokenize

            prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt or [""] * batch)
            tokens = tokenize(prompts, self.text_encoder.config.context_length).to(device)
            kwargs = []
            for t in (tokens, empty_tokens_like(tokens)):
                text = self.text_encoder(t)
                kwargs.append(dict(encoder_hidden_states=text.tokens, class_labels=text.pooled,
                                   encoder_attention_mask=text.mask))
            return kwargs[0], kwargs[1]
        classes = self.unet.config.num_class_embeds
        if classes is None:
            if class_labels is not None:
                raise ValueError("this run is unconditional: leave out class_labels")
            return {}, {}
        null = classes - 1  # the learned null class of CFG training
        if class_labels is None:  # unconditional samples
            labels = torch.full((batch,), null, device=device, dtype=torch.long)
        else:
            labels = torch.as_tensor(class_labels, device=device).long().flatten()
            if ((labels < 0) | (labels >= null)).any():
                raise ValueError(f"class_labels must be in 0..{null - 1}")
        return {"class_labels": labels}, {"class_labels": torch.full_like(labels, null)}

    @torch.no_grad()
    def __call__(self, class_labels=None, prompt: str | list[str] | None = None, guidance_scale: float = 3.0,
                 num_inference_steps: int = 25, batch_size: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 return_dict: bool = True):
        device = self.unet.device
        given = class_labels if class_labels is not None else ([prompt] if isinstance(prompt, str) else prompt)
        batch = batch_size or (len(torch.as_tensor(class_labels).flatten()) if class_labels is not None
                               else len(given) if given else 1)
        cond, uncond = self._condition(class_labels, prompt, batch, device)
        size = self.unet.config.sample_size
        from diffusers.utils.torch_utils import randn_tensor

        x = randn_tensor((batch, 3, size, size), generator=generator, device=device, dtype=self.unet.dtype)
        x = x * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(x, t)
            if not cond or guidance_scale == 1:
                out = self.unet(model_input, t, **(cond if guidance_scale else uncond)).sample
            elif guidance_scale == 0:
                out = self.unet(model_input, t, **uncond).sample
            else:
                both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
                out_c, out_u = self.unet(torch.cat([model_input] * 2), t, **both).sample.chunk(2)
                out = out_u + guidance_scale * (out_c - out_u)  # linear, so the same in eps or v
            x = self.scheduler.step(out, t, x, generator=generator).prev_sample
        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            result = images
        else:
            result = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                result = self.numpy_to_pil(result)
        return ImagePipelineOutput(images=result) if return_dict else (result,)


def export_scheduler(cfg: DiffusionConfig, train_scheduler: DDPMScheduler) -> SchedulerMixin:
    """The scheduler saved with the export: the training DDPMScheduler (ddpm), or EDM's DPM-Solver++
    over the run's sigma range and sigma_data (edm)."""
    if cfg.formulation != "edm":
        return train_scheduler
    return EDMDPMSolverMultistepScheduler(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, sigma_data=cfg.sigma_data,
                                          prediction_type="epsilon", final_sigmas_type="zero")


def write_model_index(final_dir: Path, has_text_encoder: bool, unet_class: str, scheduler_class: str = "DDPMScheduler") -> None:
    """`final/model_index.json`, so `GuidedDiffusionPipeline.from_pretrained(final_dir)` loads it.
    The scheduler is DDIM over the saved training schedule (its scheduler_config.json), or the saved
    EDM scheduler of an edm run."""
    sampler = scheduler_class if scheduler_class.startswith("EDM") else "DDIMScheduler"
    index = {"_class_name": PIPELINE_CLASS, "_diffusers_version": _diffusers_version(),
             "unet": ["diffusers", unet_class], "scheduler": ["diffusers", sampler]}
    if has_text_encoder:
        index["text_encoder"] = ["diffusion.models.text", "TextEncoder"]
    (Path(final_dir) / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__

