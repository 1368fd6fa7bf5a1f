"""Settings a run must share with the checkpoint it continues (--resume) or starts from (init_from),
compared key by key, so a mismatch is one line naming the setting rather than a state_dict error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import Config
from ..config_checks import flat_items
from ..errors import UserError, preview

# What the weights' shapes and meaning depend on: another value builds another model.
MODEL_KEYS = ("task", "data.resolution", "model.condition", "model.num_classes", "model.base_channels",
              "model.channel_mult", "model.layers_per_block", "model.attention_resolutions", "model.attention_head_dim",
              "model.scale_shift_norm", "model.inpaint", "model.upsample", "model.pool", "model.embed_dim",
              "model.text.width", "model.text.layers", "model.text.heads", "model.text.context_length",
              "model.vision.width", "model.vision.layers", "model.vision.head_width", "model.vision.patch_size",
              "diffusion.num_train_timesteps", "diffusion.beta_schedule", "diffusion.prediction_type", "upsample.factor",
              "diffusion.beta_start", "diffusion.beta_end", "diffusion.trained_betas", "model.unet_config")
# What the saved data position (epoch, batches into it) counts in: another value points elsewhere.
DATA_POSITION_KEYS = ("data.name", "data.split", "data.shapes_size", "data.shapes_seed", "data.subset_size",
                      "data.subset_seed", "train.batch_size", "train.grad_accum")


def differences(there: Config, here: Config, keys: tuple[str, ...]) -> list[str]:
    """'KEY=THERE there but HERE here' for each key whose values differ (model.num_classes 0 = from the
    dataset: not compared)."""
    a, b = dict(flat_items(there)), dict(flat_items(here))
    return [f"{key}={preview(a[key], 40)} there but {preview(b[key], 40)} here" for key in keys
            if a[key] != b[key] and not (key == "model.num_classes" and 0 in (a[key], b[key]))]


def check_resume_settings(checkpoint: Path, saved: Config, cfg: Config) -> None:
    """Refuse to resume checkpoint `checkpoint` (trained with `saved`) under a config that builds another
    model or reads the data in other batches."""
    model = differences(saved, cfg, MODEL_KEYS)
    if model:
        raise UserError(f"cannot resume from {checkpoint}: it was trained with other model settings: "
                        f"{_list(model)}. Resume with the run's own config ({checkpoint / 'config.yaml'}), "
                        f"or start a new run from its weights with init_from={checkpoint}")
    data = differences(saved, cfg, DATA_POSITION_KEYS)
    if data:
        raise UserError(f"cannot resume from {checkpoint}: its saved data position counts other batches: "
                        f"{_list(data)}. Resume with the run's own values")


def _list(items: list[Any]) -> str:
    return "; ".join(items[:3]) + (f" (and {len(items) - 3} more)" if len(items) > 3 else "")
