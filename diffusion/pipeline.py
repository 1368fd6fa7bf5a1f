"""`RUN/final` as a diffusers `DiffusionPipeline`: images in three lines, without our command line.

    from diffusion.pipeline import GuidedDiffusionPipeline
    pipe = GuidedDiffusionPipeline.from_pretrained("runs/shapes/final")
    images = pipe(class_labels=[2, 2], guidance_scale=3.0, num_inference_steps=25, seed=0).images

Caption runs take `prompt=["a red circle"]` instead of `class_labels`. Training writes
`final/model_index.json` naming this class and its components, which the subclass's
`from_pretrained` reads. Guidance follows the repository's convention: 0 = unconditional,
1 = conditional, above 1 = CFG.

It samples exactly as `sample.py` does, with the same code (`diffusion.sampling`): trailing
timesteps, x0 clipped to [-1, 1] and eps re-derived from the clipped x0 at every step, sample i
drawn from its own generator (`seed=S` seeds sample i with S + i, as `sample.py --seed S`). The
scheduler component only supplies the training schedule (its betas and prediction type), so its
other settings do not matter: runs exported with `clip_sample: true` sample correctly (diffusers'
DDIM step with that setting clips x0 but keeps the unclipped eps, which washes images out).
`sample.py` stays the tool for classifier/CLIP guidance, in-painting and upsampling.

edm runs (diffusion.formulation: edm) export diffusers' `EDMDPMSolverMultistepScheduler` with the
run's sigma_data and sigma range: the U-Net is EDM's F, whose preconditioning (c_in, c_skip, c_out,
c_noise = ln(sigma) / 4 as the timestep) diffusers' EDM schedulers apply themselves, so the export
also runs in a plain diffusers loop with `EDMDPMSolverMultistepScheduler` or `EDMEulerScheduler`.
This pipeline samples them with Heun by default (`sampler=`), through `EDMSchedule`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, EDMDPMSolverMultistepScheduler, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .choices import SAMPLERS
from .config import DiffusionConfig
from .sampling.guidance import ClassifierFreeGuidance
from .sampling.images import to_pil
from .sampling.loop import Trajectory, sample_loop
from .sampling.samplers import build_sampler, noise_from
from .sampling.schedule import EDMSchedule, NoiseSchedule

PIPELINE_CLASS = "GuidedDiffusionPipeline"


class _UNetFn:
    """The exported U-Net called as our denoiser: (x, t, **condition) -> the model's prediction."""

    def __init__(self, unet):
        self.unet = unet

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, **cond).sample


class GuidedDiffusionPipeline(DiffusionPipeline):
    """Class- or caption-conditional pixel diffusion with classifier-free guidance, sampled as sample.py does."""

    _optional_components = ["text_encoder"]  # caption runs only

    def __init__(self, unet, scheduler, text_encoder=None):
        super().__init__()
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
        unconditional = {"class_labels": torch.full((batch,), null, device=device, dtype=torch.long)}
        if class_labels is None:  # unconditional samples: the null class alone
            return {}, unconditional
        labels = torch.as_tensor(class_labels, device=device).long().flatten()
        if ((labels < 0) | (labels >= null)).any():
            raise ValueError(f"class_labels must be in 0..{null - 1}")
        return {"class_labels": labels}, unconditional

    def schedule(self) -> NoiseSchedule | EDMSchedule:
        """The run's training schedule, read from the scheduler component (whatever its class and settings):
        an EDM scheduler (edm runs) gives its sigma_data and sigma range."""
        config = self.scheduler.config
        if "sigma_data" in config:
            return EDMSchedule(config.sigma_data, config.sigma_min, config.sigma_max)
        return NoiseSchedule(self.scheduler.alphas_cumprod, config.prediction_type)

    @staticmethod
    def _generators(generator, seed: int | None, batch: int, device: torch.device) -> list[torch.Generator]:
        """One generator per sample: seeded seed + i, the ones given, or one shared generator."""
        if seed is not None:
            return [torch.Generator(device=device).manual_seed(seed + i) for i in range(batch)]
        if isinstance(generator, list):
            if len(generator) != batch:
                raise ValueError(f"got {len(generator)} generators for {batch} samples")
            return generator
        if generator is None:  # drawn from torch's global generator, so torch.manual_seed reproduces it
            generator = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, ()).item()))
        return [generator] * batch

    @torch.no_grad()
    def __call__(self, class_labels=None, prompt: str | list[str] | None = None, guidance_scale: float = 3.0,
                 num_inference_steps: int = 25, batch_size: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, seed: int | None = None,
                 sampler: str | None = None, output_type: str = "pil", return_dict: bool = True):
        """`seed=S`: sample i from a generator seeded S + i (`sample.py --seed S`); else `generator`,
        one per sample or shared. `sampler`: as `sample.py --sampler` (default ddim, heun for edm runs)."""
        schedule = self.schedule()
        sampler = sampler or ("heun" if isinstance(schedule, EDMSchedule) else "ddim")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        device = self.unet.device
        given = class_labels if class_labels is not None else ([prompt] if isinstance(prompt, str) else prompt)
        batch = batch_size or (len(torch.as_tensor(class_labels).flatten()) if class_labels is not None
                               else len(given) if given else 1)
        cond, uncond = self._condition(class_labels, prompt, batch, device)
        size = self.unet.config.sample_size
        generators = self._generators(generator, seed, batch, device)
        if sampler == "ddpm" and generators[0].device != device:
            raise ValueError(f"ddpm draws noise at every step: give generators on {device} (or seed=)")
        noise = noise_from(generators, (3, size, size), generators[0].device).to(device, self.unet.dtype)
        schedule = schedule.to(device)
        trajectory = Trajectory(schedule, build_sampler(schedule, sampler, num_inference_steps), generators)
        model_fn = ClassifierFreeGuidance(_UNetFn(self.unet), cond, uncond, guidance_scale)
        bar = self.progress_bar(total=len(trajectory.sampler.steps))
        images = sample_loop(model_fn, trajectory, noise, lambda done, total: bar.update(1)).float().clamp(-1, 1)
        bar.close()
        if output_type == "pil":
            result = [to_pil(image) for image in images]  # the uint8 values sample.py's PNGs hold
        else:
            result = images / 2 + 0.5
            if output_type != "pt":
                result = result.cpu().permute(0, 2, 3, 1).numpy()
        return ImagePipelineOutput(images=result) if return_dict else (result,)


def export_scheduler(cfg: DiffusionConfig, train_scheduler: DDPMScheduler) -> SchedulerMixin:
    """The scheduler saved with the export: the training schedule with "trailing" spacing, the
    timesteps every sampler here visits, for diffusers loops (ddpm); or EDM's DPM-Solver++ over the
    run's sigma range and sigma_data (edm)."""
    if cfg.formulation != "edm":
        return type(train_scheduler).from_config(train_scheduler.config, timestep_spacing="trailing")
    return EDMDPMSolverMultistepScheduler(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, sigma_data=cfg.sigma_data,
                                          prediction_type="epsilon", final_sigmas_type="zero")


def write_model_index(final_dir: Path, has_text_encoder: bool, unet_class: str, scheduler_class: str = "DDPMScheduler") -> None:
    """`final/model_index.json`, so `GuidedDiffusionPipeline.from_pretrained(final_dir)` loads it.
    The scheduler component is the saved training schedule (scheduler_config.json), read as a DDIMScheduler,
    or an edm run's EDMDPMSolverMultistepScheduler."""
    sampler = scheduler_class if scheduler_class.startswith("EDM") else "DDIMScheduler"
    index = {"_class_name": PIPELINE_CLASS, "_diffusers_version": _diffusers_version(),
             "unet": ["diffusers", unet_class], "scheduler": ["diffusers", sampler]}
    if has_text_encoder:
        index["text_encoder"] = ["diffusion.models.text", "TextEncoder"]
    (Path(final_dir) / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__

