"""Checks of the post-hoc EMA and checkpoint-keeping config keys, for config validation (torch-free)."""
from __future__ import annotations

import math
from typing import Any

from ..errors import UserError, preview

MAX_SIGMA_REL = 1 / math.sqrt(12)  # = diffusion.training.phema.MAX_SIGMA_REL: a uniform average (gamma = 0)


def sigma_rel_problem(value: Any) -> str:
    """'' for a usable sigma_rel, else what is wrong with it (shared by the config and the CLI)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{preview(value)} is not a number"
    if not math.isfinite(value):
        return f"{value} is not a finite number"
    if not 0 < value < MAX_SIGMA_REL:
        return (f"{value:g} is outside (0, {MAX_SIGMA_REL:.4f}): a power-function EMA's relative width is "
                "above 0 and below 1/sqrt(12), the width of a plain average of every step")
    return ""


def check_posthoc_settings(values: dict[str, Any]) -> None:
    """train.posthoc_ema_sigma_rels, train.posthoc_ema_every and train.keep_checkpoint_steps, from a
    config's flat values; one UserError line naming the key and the fix."""
    sigmas = values["train.posthoc_ema_sigma_rels"]
    if not sigmas:
        raise UserError("config key 'train.posthoc_ema_sigma_rels' is empty: give one or more relative widths, "
                        "e.g. [0.05, 0.10]")
    for sigma in sigmas:
        problem = sigma_rel_problem(sigma)
        if problem:
            raise UserError(f"config key 'train.posthoc_ema_sigma_rels': {problem}; e.g. [0.05, 0.10]")
    if len({round(s, 3) for s in sigmas}) != len(sigmas):
        raise UserError(f"config key 'train.posthoc_ema_sigma_rels' ({preview(sigmas)}) repeats a width (to 3 "
                        "decimals, as snapshots name them): give distinct values")
    if values["train.posthoc_ema_every"] < 1:
        raise UserError(f"config key 'train.posthoc_ema_every' must be >= 1 (steps between snapshots); got "
                        f"{preview(values['train.posthoc_ema_every'])}")
    bad = [s for s in values["train.keep_checkpoint_steps"] if s < 1]
    if bad:
        raise UserError(f"config key 'train.keep_checkpoint_steps' lists step {bad[0]}: checkpoints are saved at "
                        "steps >= 1 (multiples of train.checkpoint_every)")
    every, last = values["train.checkpoint_every"], values["train.max_steps"]
    never = [s for s in values["train.keep_checkpoint_steps"] if s % every and s != last]
    if never:
        raise UserError(f"config key 'train.keep_checkpoint_steps' lists step {never[0]}, where no checkpoint is "
                        f"saved (train.checkpoint_every={every}, train.max_steps={last}): list multiples of "
                        f"{every}, e.g. {max(every, never[0] // every * every)}")
