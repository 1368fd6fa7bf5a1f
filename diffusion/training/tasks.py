"""Tasks plug a model and a loss into the shared training loop.

A task builds its model, computes the loss on a batch, writes previews (sample grids or
diagnostics) and exports the final model. The denoiser is one task; the noise-aware classifier
and CLIP are others, trained by the same loop with the same EMA, checkpoints and resume.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from ..config import Config
from ..models import Denoiser, build_denoiser
from ..schedule import build_train_scheduler, training_target


class Task(Protocol):
    cfg: Config

    def build_model(self) -> torch.nn.Module: ...

    def loss(self, model: torch.nn.Module, core: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`model` is the (possibly distributed) module to call; `core` the unwrapped one."""
        ...

    def preview(self, core: torch.nn.Module, step: int, run_dir: Path) -> None: ...

    def export(self, core: torch.nn.Module, out_dir: Path) -> None: ...


class DenoiserTask:
    """Train the denoiser with the simple diffusion loss and CFG condition dropout."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.scheduler = build_train_scheduler(cfg.diffusion)

    def build_model(self) -> Denoiser:
        model = build_denoiser(self.cfg.model, self.cfg.data.resolution, self.cfg.model.num_classes)
        model.preview_prompts = list(self.cfg.sample.prompts)
        return model

    def condition(self, core: Denoiser, batch: dict, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        cond = core.condition_from_batch(batch)
        drop = torch.rand(x0.shape[0], device=x0.device) < self.cfg.model.cond_drop_prob
        cond = core.drop_condition(cond, drop)
        if core.extra_channels:
            from ..inpaint import training_channels  # in-painting: masked image + keep-mask

            cond["channels"] = training_channels(x0, self.cfg)
        return cond

    def loss(self, model, core, batch):
        x0 = batch["image"]
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        x_t = self.scheduler.add_noise(x0, noise, t)
        if self.cfg.train.channels_last and x0.is_cuda:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        pred = model(x_t, t, **self.condition(core, batch, x0))
        loss = F.mse_loss(pred.float(), training_target(self.scheduler, x0, noise, t).float())
        return loss, {}

    def preview(self, core, step, run_dir):
        from ..generate import preview_grid

        preview_grid(core, self.cfg, self.scheduler, run_dir / "samples" / f"step-{step:06d}.png")

    def export(self, core, out_dir):
        """Plain-diffusers export: `UNet2DModel.from_pretrained(out_dir / "unet")`.

        Caption models: `UNet2DConditionModel.from_pretrained(out_dir / "unet")`, and the text encoder
        in `text_encoder/` (`diffusion.models.text.TextEncoder.from_pretrained`, open_clip tokenizer).
        `model_index.json` makes the folder a `diffusion.pipeline.GuidedDiffusionPipeline`.
        """
        from ..pipeline import write_model_index

        core.unet.save_pretrained(out_dir / "unet")
        self.scheduler.save_pretrained(out_dir / "scheduler")
        text = getattr(core, "text_encoder", None) is not None
        if text:
            core.text_encoder.save_pretrained(out_dir / "text_encoder")
        if not getattr(core, "extra_channels", 0):  # in-painting U-Nets need channels the pipeline does not make
            write_model_index(out_dir, text, type(core.unet).__name__)


TASKS: dict[str, Callable[[Config], Task]] = {"denoiser": DenoiserTask}


def register_task(name: str, factory: Callable[[Config], Task]) -> None:
    TASKS[name] = factory


def build_task(cfg: Config) -> Task:
    if cfg.task not in TASKS:
        import importlib

        importlib.import_module(f"..{cfg.task}", __package__)  # tasks register themselves on import
    return TASKS[cfg.task](cfg)
