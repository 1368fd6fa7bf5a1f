"""Tasks plug a model and a loss into the shared training loop.

A task builds its model, computes the loss on a batch, writes previews (sample grids or
diagnostics) and exports the final model. The denoiser is one task; the noise-aware classifier
and CLIP are others, trained by the same loop with the same EMA, checkpoints and resume.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..checkpoints.store import named_weights
from ..conditioning.inpaint.methods import inpaint_channels
from ..conditioning.upsample import training_condition
from ..config import Config
from ..evaluate import classifier as classifier_eval
from ..evaluate import clip as clip_eval
from ..evaluate.buckets import write_bucket_report
from ..models import Denoiser, NoisyClassifier, build_model
from ..sampling.plan import preview_grid
from ..sampling.schedule import EDMSchedule, build_schedule, build_train_scheduler, training_target


class Task(Protocol):
    cfg: Config

    def build_model(self) -> torch.nn.Module: ...

    def loss(self, model: torch.nn.Module, core: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`model` is the (possibly distributed) module to call; `core` the unwrapped one."""
        ...

    def preview(self, core: torch.nn.Module, step: int, run_dir: Path) -> None: ...

    def export(self, core: torch.nn.Module, out_dir: Path) -> None: ...


class DenoiserTask:
    """Train the denoiser with CFG condition dropout: DDPM's simple loss on uniform timesteps, or EDM's
    weighted loss on log-normal noise levels through the preconditioning (`EDMSchedule`)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.scheduler = build_train_scheduler(cfg.diffusion)
        self.schedule = build_schedule(cfg.diffusion)

    def build_model(self) -> Denoiser:
        return build_model(self.cfg)

    def condition(self, core: Denoiser, batch: dict, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        cond = core.condition_from_batch(batch)
        drop = torch.rand(x0.shape[0], device=x0.device) < self.cfg.model.cond_drop_prob
        cond = core.drop_condition(cond, drop)
        if core.upsample:  # the dataset's low-res input, upsampled and noise-augmented
            self.schedule = self.schedule.to(x0.device)
            cond.update(training_condition(batch["low_res"].to(x0.device), self.cfg, self.schedule))
        elif core.extra_channels:  # in-painting: masked image + the keep-mask drawn per item (training.batches)
            cond["channels"] = inpaint_channels(x0, batch["keep"])
        return cond

    def loss(self, model, core, batch):
        x0 = batch["image"]
        noise = torch.randn_like(x0)
        if isinstance(self.schedule, EDMSchedule):  # lambda(sigma) ||D - x0||^2 = ||F - target||^2
            x_t, t, target = self.schedule.training_example(x0, noise, self.schedule.training_sigmas(len(x0), x0.device))
        else:
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
            x_t, target = self.scheduler.add_noise(x0, noise, t), None
        if self.cfg.train.channels_last and x0.is_cuda:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        pred = model(x_t, t, **self.condition(core, batch, x0))
        target = training_target(self.scheduler, x0, noise, t) if target is None else target
        return F.mse_loss(pred.float(), target.float()), {}

    def preview(self, core, step, run_dir):
        preview_grid(core, self.cfg, run_dir / "samples" / f"step-{step:06d}.png")

    def export(self, core, out_dir):
        """Plain-diffusers export: `UNet2DModel.from_pretrained(out_dir / "unet")`.

        Caption models: `UNet2DConditionModel.from_pretrained(out_dir / "unet")`, and the text encoder
        in `text_encoder/` (`diffusion.models.text.TextEncoder.from_pretrained`, open_clip tokenizer).
        `model_index.json` makes the folder a `diffusion.pipeline.GuidedDiffusionPipeline`.
        """
        from ..pipeline import export_scheduler, write_model_index

        core.unet.save_pretrained(out_dir / "unet")
        scheduler = export_scheduler(self.cfg.diffusion, self.scheduler)
        scheduler.save_pretrained(out_dir / "scheduler")
        text = getattr(core, "text_encoder", None) is not None
        if text:
            core.text_encoder.save_pretrained(out_dir / "text_encoder")
        if not getattr(core, "extra_channels", 0):  # in-painting U-Nets need channels the pipeline does not make
            write_model_index(out_dir, text, type(core.unet).__name__, type(scheduler).__name__)


class GuideTask:
    """Shared by the noise-aware guides: their noisy inputs, at the noise levels their denoiser samples.

    ddpm: x_t = q_sample(x_0, t), t uniform over the timesteps. edm: sigma log-uniform over the
    sampling range (`EDMSchedule.guide_sigmas`), read through the same preconditioning (c_in x,
    c_noise) as the denoiser's network, so `schedule.network_input` maps a sampler's x_t to it.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.scheduler = build_train_scheduler(cfg.diffusion)
        self.schedule = build_schedule(cfg.diffusion)

    def build_model(self) -> torch.nn.Module:
        return build_model(self.cfg)

    def noisy_input(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(network input, network time) for clean images x0."""
        noise = torch.randn_like(x0)
        if isinstance(self.schedule, EDMSchedule):
            sigma = self.schedule.guide_sigmas(torch.rand(len(x0), device=x0.device))
            x_t, t, _ = self.schedule.training_example(x0, noise, sigma)
        else:
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
            x_t = self.scheduler.add_noise(x0, noise, t)
        if self.cfg.train.channels_last and x0.is_cuda:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        return x_t, t


class ClassifierTask(GuideTask):
    """Cross-entropy on noisy images (`GuideTask.noisy_input`)."""

    def loss(self, model, core, batch):
        x0, labels = batch["image"], batch["label"]
        x_t, t = self.noisy_input(x0)
        logits = model(x_t, t).float()
        loss = F.cross_entropy(logits, labels)
        return loss, {"accuracy": (logits.argmax(dim=-1) == labels).float().mean().detach()}

    def report(self, core: NoisyClassifier, out_dir: Path, name: str, title: str) -> list[dict]:
        rows = classifier_eval.held_out_accuracy(core, self.cfg, classifier_eval.PREVIEW_SAMPLES)
        write_bucket_report(rows, out_dir, name, title, chance=1 / self.cfg.model.num_classes)
        return rows

    def preview(self, core, step, run_dir):
        """Held-out accuracy per timestep bucket: RUN/diagnostics/classifier_accuracy-step-N.{csv,png}."""
        rows = self.report(core, run_dir / "diagnostics", f"{classifier_eval.REPORT_NAME}-step-{step:06d}",
                           f"noisy classifier, step {step}")
        tqdm.write(f"step {step}: {classifier_eval.summary_line(rows)}")

    def export(self, core, out_dir):
        """`classifier.safetensors` (load with NoisyClassifier + config.yaml) and the final accuracy report."""
        save_file(named_weights(core), str(out_dir / "classifier.safetensors"))
        self.report(core, out_dir, classifier_eval.REPORT_NAME, "noisy classifier, final")


class ClipTask(GuideTask):
    """Contrastive training of NoisyCLIP on (noisy image, caption) pairs (`GuideTask.noisy_input`).

    In-batch negatives are per device (ClipLoss without feature gathering). Captions that repeat
    inside a batch count as negatives of each other, as in open_clip's own training: on a dataset
    of few distinct captions this only raises the loss's floor.
    """

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.loss_fn = open_clip.ClipLoss()

    def loss(self, model, core, batch):
        x_t, t = self.noisy_input(batch["image"])
        image, text, scale = model(x_t, t, batch["tokens"])  # word drop and tokens: diffusion.training.batches
        return self.loss_fn(image.float(), text.float(), scale.float()), {}

    def preview(self, core, step, run_dir):
        rows, chance = clip_eval.retrieval_buckets(core, self.cfg)
        clip_eval.write_report(rows, chance, Path(run_dir) / clip_eval.DIAGNOSTICS_DIR,
                               f"{clip_eval.REPORT_NAME}_step-{step:06d}")

    def export(self, core, out_dir):
        """Nothing beyond the checkpoint: the towers are not usable without the timestep embedding."""


TASKS: dict[str, Callable[[Config], Task]] = {"denoiser": DenoiserTask, "classifier": ClassifierTask, "clip": ClipTask}


def build_task(cfg: Config) -> Task:
    return TASKS[cfg.task](cfg)
