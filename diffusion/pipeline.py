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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, EDMDPMSolverMultistepScheduler, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .choices import SAMPLERS
from .cli.args import (BadType, BadValue, check_choice, check_class_label, check_count, check_guidance_scale,
                       check_prompt, check_seed, check_steps)
from .config import DiffusionConfig
from .config_checks import MAX_TIMESTEPS
from .errors import UserError, one_line, preview
from .memory import check_sampling_memory
from .sampling.guidance import ClassifierFreeGuidance
from .sampling.images import to_pil
from .sampling.loop import Guidance, Trajectory, sample_loop
from .sampling.samplers import SIGMA_SAMPLERS, build_sampler, noise_from
from .sampling.schedule import EDMSchedule, NoiseSchedule, default_x0_processor

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

    def _condition(self, labels: list[int] | None, prompts: list[str] | None, batch: int, device) -> tuple[dict, dict]:
        """(conditional, unconditional) keyword arguments for the U-Net, from checked labels or prompts
        (`_arguments`)."""
        if self.text_encoder is not None:
            from .models.text import empty_tokens_like, tokenize

            tokens = tokenize(prompts or [""] * batch, self.text_encoder.config.context_length).to(device)
            kwargs = []
            for t in (tokens, empty_tokens_like(tokens)):
                text = self.text_encoder(t)
                kwargs.append(dict(encoder_hidden_states=text.tokens, class_labels=text.pooled,
                                   encoder_attention_mask=text.mask))
            return kwargs[0], kwargs[1]
        classes = self.unet.config.num_class_embeds
        if classes is None:
            return {}, {}
        null = classes - 1  # the learned null class of CFG training
        unconditional = {"class_labels": torch.full((batch,), null, device=device, dtype=torch.long)}
        if labels is None:  # unconditional samples: the null class alone
            return {}, unconditional
        return {"class_labels": torch.tensor(labels, device=device, dtype=torch.long)}, unconditional

    def schedule(self) -> NoiseSchedule | EDMSchedule:
        """The run's training schedule, read from the scheduler component (whatever its class and settings):
        an EDM scheduler (edm runs) gives its sigma_data and sigma range."""
        config = self.scheduler.config
        if "sigma_data" in config:
            return EDMSchedule(config.sigma_data, config.sigma_min, config.sigma_max)
        if getattr(self, "_rules_from_scheduler", False):  # published folders, newer exports: spacing, clip, variance
            from .checkpoints.diffusers_folder import settings_of_scheduler
            from .sampling.schedule import SamplingRules

            given = settings_of_scheduler(dict(config), type(self.scheduler).__name__, "the scheduler component")
            rules = SamplingRules(**{k: given[k] for k in SamplingRules.__dataclass_fields__})
            return NoiseSchedule(self.scheduler.alphas_cumprod, config.prediction_type, rules=rules)
        return NoiseSchedule(self.scheduler.alphas_cumprod, config.prediction_type)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Our runs' `final/`, or a plain diffusers pixel-space folder (DDPMPipeline, DDIMPipeline, PNDMPipeline;
        a hub name is downloaded): those sample with their scheduler's timestep spacing, x0 clipping and
        variance type, as diffusers' own pipeline does (docs/pretrained.md). Latent and conditional folders
        are refused in one line."""
        from .checkpoints import diffusers_folder as folders

        source, rules_from_scheduler = pretrained_model_name_or_path, False
        if isinstance(source, (str, Path)) and (Path(source).exists() or folders.looks_like_hub_name(str(source))):
            source = folders.resolve_source(source)
            index_file = source / folders.MODEL_INDEX
            index = folders.load_json(index_file, "pipeline index") if index_file.is_file() else {}
            if index and index.get("_class_name") != PIPELINE_CLASS:
                folders.read_index(source)  # refuses latent and conditional pipelines
                rules_from_scheduler = True
            else:  # our export: its scheduler holds the run's rules only if the index says so (older ones: defaults)
                rules_from_scheduler = index.get(RULES_KEY) == "scheduler"
        pipe = super().from_pretrained(source, **kwargs)
        pipe._rules_from_scheduler = rules_from_scheduler
        return pipe

    @staticmethod
    def _generators(generator, seed: int | None, batch: int, device: torch.device) -> list[torch.Generator]:
        """One generator per sample: seeded seed + i, the ones given, or one shared generator."""
        if seed is not None:
            return [torch.Generator(device=device).manual_seed(seed + i) for i in range(batch)]
        if isinstance(generator, (list, tuple)):
            return list(generator)
        if generator is None:  # drawn from torch's global generator, so torch.manual_seed reproduces it
            generator = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, ()).item()))
        return [generator] * batch

    @torch.no_grad()
    def __call__(self, class_labels=None, prompt: str | list[str] | None = None, guidance_scale: float = 3.0,
                 num_inference_steps: int = 25, batch_size: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, seed: int | None = None,
                 sampler: str | None = None, output_type: str = "pil", return_dict: bool = True, autoguide=None,
                 x0_clip: bool = True):
        """`seed=S`: sample i from a generator seeded S + i (`sample.py --seed S`); else `generator`,
        one per sample or shared. `sampler`: as `sample.py --sampler` (default ddim, heun for edm runs).
        `class_labels` (class runs) or `prompt` (caption runs): one image per entry; a single int or str is
        repeated `batch_size` times. A bad argument raises `BadValue` (a ValueError; `BadType`, also a
        TypeError, for the wrong kind) naming it, checked as sample.py checks its flags (diffusion.cli.args).
        `autoguide`: a guide pipeline or its export folder (autoguidance, `sample.py --autoguide`): then
        `guidance_scale` is its strength w, eps_guide + w (eps_main - eps_guide), with CFG off.
        `x0_clip=False`: x0 is not clipped to [-1, 1] at each step (`sample.py --no-x0-clip`), as NVlabs'
        edm_sampler samples."""
        if not isinstance(x0_clip, bool):
            raise BadType(f"x0_clip must be true or false, got {preview(x0_clip)}")
        schedule = self.schedule()
        call = self._arguments(schedule, class_labels, prompt, guidance_scale, num_inference_steps, batch_size,
                               generator, seed, sampler, output_type, return_dict)
        device, batch = self.unet.device, call.batch
        cond, uncond = self._condition(call.labels, call.prompts, batch, device)
        size = self.unet.config.sample_size
        generators = self._generators(generator, call.seed, batch, device)
        if call.sampler == "ddpm" and generators[0].device != device:
            raise BadValue(f"generator: ddpm draws noise at every step, so give generators on {device} (or seed=)")
        noise = noise_from(generators, (3, size, size), generators[0].device).to(device, self.unet.dtype)
        schedule = schedule.to(device)
        trajectory = Trajectory(schedule, build_sampler(schedule, call.sampler, call.steps), generators,
                                Guidance(x0=default_x0_processor(schedule) if x0_clip else None))
        model_fn = ClassifierFreeGuidance(_UNetFn(self.unet), cond, uncond, call.scale)
        if autoguide is not None:
            from .pipeline_autoguide import guided, load_guide

            guide = load_guide(self, autoguide, self.__dict__.setdefault("_autoguides", {}))
            model_fn = guided(self, guide, _UNetFn, call.labels, call.prompts, batch, call.scale)
        bar = self.progress_bar(total=len(trajectory.sampler.steps))
        images = sample_loop(model_fn, trajectory, noise, lambda done, total: bar.update(1)).float().clamp(-1, 1)
        bar.close()
        if output_type == "pil":
            result = [to_pil(image) for image in images]  # the uint8 values sample.py's PNGs hold
        else:
            result = images / 2 + 0.5
            if output_type == "np":
                result = result.cpu().permute(0, 2, 3, 1).numpy()
        return ImagePipelineOutput(images=result) if return_dict else (result,)

    def _arguments(self, schedule, class_labels, prompt, guidance_scale, num_inference_steps, batch_size, generator,
                   seed, sampler, output_type, return_dict) -> CallArguments:
        """Every argument of __call__ checked with sample.py's checks (diffusion.cli.args), before anything runs."""
        scale = check_guidance_scale(guidance_scale, "guidance_scale")
        sampler = "heun" if sampler is None and isinstance(schedule, EDMSchedule) else sampler or "ddim"
        check_choice(sampler, "sampler", SAMPLERS)
        trailing = isinstance(schedule, NoiseSchedule) and sampler not in SIGMA_SAMPLERS
        steps = check_steps(num_inference_steps, "num_inference_steps",
                            schedule.num_train_timesteps if trailing else None)
        if steps > MAX_TIMESTEPS:
            raise BadValue(f"num_inference_steps {steps} is more than {MAX_TIMESTEPS}, the most any sampler here takes")
        check_choice(output_type, "output_type", OUTPUT_TYPES)
        if not isinstance(return_dict, bool):
            raise BadType(f"return_dict must be true or false, got {preview(return_dict)}")
        if seed is not None:
            check_seed(seed, "seed")
            if generator is not None:
                raise BadValue("give seed or generator, not both: seed=S seeds image i with S + i")
        labels, prompts = self._labels(class_labels), self._prompts(prompt)
        values, repeated = labels or prompts or (None, False)
        batch = None if batch_size is None else check_count(batch_size, "batch_size")
        if values is not None and not repeated:
            if batch is not None and batch != len(values):
                name = "class_labels" if labels is not None else "prompt"
                raise BadValue(f"batch_size={batch} does not match the {len(values)} {name} given: leave batch_size "
                               f"out (one image per entry) or give {batch} entries")
            batch = len(values)
        batch = batch or 1
        try:
            check_sampling_memory(batch, batch, self.unet.config.sample_size, self.unet.device)
        except UserError as err:  # its fix names sample.py's flags
            raise BadValue(f"batch_size {batch} is too large: {one_line(err).rsplit(': ', 1)[0]}: lower batch_size") from None
        if values is not None and repeated:  # one label or prompt for every image
            values = values * batch
        labels, prompts = (values, None) if labels is not None else (None, values)
        self._check_generator(generator, batch)
        return CallArguments(labels, prompts, batch, scale, steps, sampler, seed)

    def _labels(self, value) -> tuple[list[int], bool] | None:
        """class_labels as (a list of checked labels, whether it is one label to repeat)."""
        if value is None:
            return None
        if self.text_encoder is not None:
            raise BadValue("class_labels needs a class-conditional run; this one is caption-conditioned: give prompt=")
        classes = self.unet.config.num_class_embeds
        if classes is None:
            raise BadValue("class_labels needs a class-conditional run; this one is unconditional: leave out class_labels")
        items, repeated = flat_items(value, "class_labels")
        if not items:
            raise BadValue("class_labels is empty: give one label per image, or leave it out for unconditional images")
        name = "class_labels" if repeated else "class_labels[{}]"
        return [check_class_label(v, name.format(i), classes - 1) for i, v in enumerate(items)], repeated

    def _prompts(self, value) -> tuple[list[str], bool] | None:
        """prompt as (a list of checked captions, whether it is one caption to repeat)."""
        if value is None:
            return None
        if self.text_encoder is None:
            kind = "class-conditional: give class_labels" if self.unet.config.num_class_embeds else "unconditional"
            raise BadValue(f"prompt needs a caption-conditioned run (model.condition=text); this one is {kind}")
        if isinstance(value, str):
            return [check_prompt(value, "prompt")], True
        if not isinstance(value, (list, tuple)):
            raise BadType(f"prompt must be text or a list of text, got {preview(value)} ({type(value).__name__})")
        if not value:
            raise BadValue('prompt is an empty list: give one caption per image ("" = unconditional)')
        return [check_prompt(v, f"prompt[{i}]") for i, v in enumerate(value)], False

    @staticmethod
    def _check_generator(generator, batch: int) -> None:
        if generator is None or isinstance(generator, torch.Generator):
            return
        if not isinstance(generator, (list, tuple)) or not all(isinstance(g, torch.Generator) for g in generator):
            raise BadType(f"generator must be a torch.Generator or a list of one per image, got {preview(generator)}")
        if len(generator) != batch:
            raise BadValue(f"generator: got {len(generator)} generators for {batch} images; give one per image")
        if len({g.device for g in generator}) > 1:
            raise BadValue("generator: the generators are on different devices; put them on one")


OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class CallArguments:
    """GuidedDiffusionPipeline.__call__'s arguments once checked: one label or prompt per image."""

    labels: list[int] | None
    prompts: list[str] | None
    batch: int
    scale: float
    steps: int
    sampler: str
    seed: int | None


def flat_items(value, name: str) -> tuple[list, bool]:
    """(items, repeated) of a label argument: a whole number (repeated), or a flat list, tuple, 1-D tensor or
    array of them. Nested or ragged lists and float or bool tensors are refused, naming `name`."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        kind = value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool \
            if isinstance(value, torch.Tensor) else value.dtype.kind not in "iu"
        if kind:
            raise BadType(f"{name} must hold whole numbers, got a {value.dtype} {type(value).__name__}")
        if value.ndim > 1:
            raise BadValue(f"{name} must be one label per image (1-D), got shape {tuple(value.shape)}")
        return [int(v) for v in value.reshape(-1).tolist()], value.ndim == 0
    if isinstance(value, (list, tuple)):
        return [v.item() if isinstance(v, torch.Tensor) and v.ndim == 0 and not v.dtype.is_floating_point
                and v.dtype != torch.bool else v for v in value], False
    return [value], True


def export_scheduler(cfg: DiffusionConfig, train_scheduler: DDPMScheduler) -> SchedulerMixin:
    """The scheduler saved with the export: the run's training scheduler with its own sampling rules
    (timestep spacing, x0 clipping, variance: what `sample.py` does, so diffusers loops and this pipeline
    follow them), ddpm; or EDM's DPM-Solver++ over the run's sigma range and sigma_data (edm)."""
    if cfg.formulation != "edm":
        return type(train_scheduler).from_config(train_scheduler.config)
    return EDMDPMSolverMultistepScheduler(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, sigma_data=cfg.sigma_data,
                                          prediction_type="epsilon", final_sigmas_type="zero")


# In model_index.json (diffusers ignores "_" keys): the scheduler config holds the run's sampling rules.
# Exports written before it saved diffusers' defaults there ("leading" spacing) and sample with ours.
RULES_KEY = "_sampling_rules"


def write_model_index(final_dir: Path, has_text_encoder: bool, unet_class: str, scheduler_class: str = "DDPMScheduler") -> None:
    """`final/model_index.json`, so `GuidedDiffusionPipeline.from_pretrained(final_dir)` loads it.
    The scheduler component is the saved training schedule (scheduler_config.json), read as the DDPMScheduler
    it is (so diffusers' own `DDPMPipeline.from_pretrained(final_dir)` samples as `sample.py --sampler ddpm`),
    or an edm run's EDMDPMSolverMultistepScheduler."""
    sampler = scheduler_class
    index = {"_class_name": PIPELINE_CLASS, "_diffusers_version": _diffusers_version(), RULES_KEY: "scheduler",
             "unet": ["diffusers", unet_class], "scheduler": ["diffusers", sampler]}
    if has_text_encoder:
        index["text_encoder"] = ["diffusion.models.text", "TextEncoder"]
    (Path(final_dir) / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__

