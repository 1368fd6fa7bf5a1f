"""Which settings read each config key, as one table, and the checks built on it: a value no part of
this config's run reads (`model.inpaint: true` on a classifier, `model.text.width` without captions)
is refused in one line naming both keys and the fix, before anything is built, instead of being
ignored while the saved config claims it.

READERS maps every dotted key to the settings under which something reads it: a tuple of
alternatives, each a tuple of `Is` conditions that must all hold (`ALWAYS`: read by every run).
A new config key gets a row here (tests/test_config_combinations.py fails until it has one).

Rows marked tolerated (`Row(..., strict=False)`) are accepted unread: network-size, sampling and
data-source knobs that a shared override list sets for every task (tests' TINY list, a sweep's
base), and the ddpm schedule keys of a config switched to `diffusion.formulation=edm` (docs/edm.md
switches any config that way). An unread value there changes nothing the run does.

Torch-free: config loading imports this.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .errors import UserError, preview


@dataclass(frozen=True)
class Is:
    """A condition on one deciding key: its value is one of `values`, or passes `test` (described by `text`)."""

    key: str
    values: tuple = ()
    test: Callable[[Any], bool] | None = None
    text: str = ""

    def holds(self, values: dict[str, Any]) -> bool:
        value = values[self.key]
        return self.test(value) if self.test is not None else value in self.values

    def describe(self) -> str:
        return f"{self.key} {self.text}" if self.test is not None else f"{self.key} is {' or '.join(map(show, self.values))}"


@dataclass(frozen=True)
class Row:
    when: tuple[tuple[Is, ...], ...]  # alternatives; each holds when all its conditions hold
    strict: bool = True  # refuse a non-default value when no alternative holds


def show(value: Any) -> str:
    """A value as a config file writes it (true, cosine, [1, 2])."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str):
        return value if value and value.isprintable() and len(value) <= 40 else preview(value)
    return preview(value)


ALWAYS: tuple[tuple[Is, ...], ...] = ((),)
DENOISER = Is("task", ("denoiser",))
CLASSIFIER = Is("task", ("classifier",))
CLIP = Is("task", ("clip",))
DDPM = Is("diffusion.formulation", ("ddpm",))
EDM = Is("diffusion.formulation", ("edm",))
UNET = ((DENOISER,), (CLASSIFIER,))  # the U-Net's layout: the denoiser, and the classifier's half U-Net
CLASS_LABELS = ((DENOISER, Is("model.condition", ("class",))), (CLASSIFIER,))
CAPTIONS = ((DENOISER, Is("model.condition", ("text",))), (CLIP,))


def data(*names: str) -> tuple[Is, ...]:
    return (Is("data.name", names),)


def when(*alternatives: tuple[Is, ...], strict: bool = True) -> Row:
    return Row(tuple(alternatives), strict)


def rows(keys: str, row: Row) -> dict[str, Row]:
    return {key: row for key in keys.split()}


ALL = Row(ALWAYS)
READERS: dict[str, Row] = {
    **rows("task output_dir init_from", ALL),
    **rows("data.name data.resolution data.split data.hflip data.num_workers data.pin_memory data.subset_size", ALL),
    "data.root": when(data("cifar10", "celeba", "imagefolder"), strict=False),  # shapes are drawn, not read
    "data.download": when(data("cifar10"), strict=False),
    **rows("data.shapes_size data.shapes_seed", when(data("shapes"), strict=False)),
    **rows("data.celeba_attributes data.celeba_captions", when(data("celeba"))),
    "data.cache": when(data("celeba"), strict=False),
    "data.subset_seed": when((Is("data.subset_size", test=lambda v: v > 0, text="is above 0"),)),
    **rows("model.condition model.inpaint model.upsample", when((DENOISER,))),
    "model.num_classes": when(*CLASS_LABELS),
    "model.cond_drop_prob": when((DENOISER, Is("model.condition", ("class", "text")))),
    **rows("model.base_channels model.channel_mult model.layers_per_block model.attention_resolutions "
           "model.attention_head_dim model.dropout model.scale_shift_norm", when(*UNET, strict=False)),
    **rows("model.text.width model.text.layers model.text.heads model.text.context_length", when(*CAPTIONS)),
    "model.pool": when((CLASSIFIER,)),
    **rows("model.embed_dim model.vision.width model.vision.layers model.vision.head_width model.vision.patch_size",
           when((CLIP,))),
    "diffusion.formulation": ALL,
    # edm denoisers: the demo's step limit and the scaling FLOP count read it
    "diffusion.num_train_timesteps": when((DDPM,), (DENOISER,), strict=False),
    **rows("diffusion.beta_schedule diffusion.prediction_type", when((DDPM,), strict=False)),
    # a diffusers scheduler's keys (docs/pretrained.md): the schedule, and how ddpm denoisers sample
    **rows("diffusion.beta_start diffusion.beta_end diffusion.trained_betas diffusion.from_pretrained",
           when((DDPM,), strict=False)),
    **rows("diffusion.clip_sample diffusion.clip_sample_range diffusion.thresholding diffusion.dynamic_thresholding_ratio "
           "diffusion.sample_max_value diffusion.variance_type diffusion.timestep_spacing diffusion.steps_offset",
           when((DDPM, DENOISER), strict=False)),
    "model.unet_config": when((DENOISER,)),
    # ddpm denoisers: the range of the Karras-sigma samplers (heun, euler)
    **rows("diffusion.sigma_min diffusion.sigma_max", when((EDM,), (DENOISER,))),
    "diffusion.sigma_data": when((EDM,)),
    **rows("diffusion.p_mean diffusion.p_std", when((EDM, DENOISER))),  # edm guides draw log-uniform sigmas
    **rows("train.max_steps train.batch_size train.lr train.weight_decay train.warmup_steps train.grad_clip "
           "train.grad_accum train.mixed_precision train.ema_decay train.ema_warmup train.seed train.log_every "
           "train.sample_every train.checkpoint_every train.keep_checkpoints train.compile train.channels_last "
           "train.allow_tf32 train.loss_spike", ALL),
    "train.compile_backend": when((Is("train.compile", (True,)),)),
    "train.keep_checkpoint_steps": ALL,
    "train.posthoc_ema": ALL,
    **rows("train.posthoc_ema_sigma_rels train.posthoc_ema_every train.posthoc_ema_fp16",
           when((Is("train.posthoc_ema", (True,)),))),
    "train.ema_power": when((Is("train.ema_warmup", (True,)),)),  # diffusers' EMAModel reads it only in warm-up
    "train.caption_word_drop": when((CLIP,)),  # the denoiser's captions are dropped whole (model.cond_drop_prob)
    **rows("sample.sampler sample.steps sample.guidance_scale sample.rho sample.churn sample.churn_min "
           "sample.churn_max sample.churn_noise sample.num_samples", when((DENOISER,), strict=False)),
    "sample.prompts": when((DENOISER, Is("model.condition", ("text",)))),
    **rows("inpaint.box inpaint.strokes inpaint.half inpaint.border inpaint.all_known inpaint.all_unknown "
           "inpaint.max_boxes inpaint.box_size inpaint.max_strokes inpaint.stroke_width inpaint.stroke_vertices "
           "inpaint.border_size", when((DENOISER, Is("model.inpaint", (True,))))),
    **rows("upsample.factor upsample.downsample upsample.upsample upsample.aug_noise upsample.aug_level "
           "upsample.quantise upsample.consistency", when((DENOISER, Is("model.upsample", (True,))))),
}


def is_read(key: str, values: dict[str, Any]) -> bool:
    """Whether some part of the run of the config whose flat values are `values` reads `key`."""
    return any(all(cond.holds(values) for cond in alternative) for alternative in READERS[key].when)


def _requirement(row: Row) -> str:
    return ", or ".join(" and ".join(c.describe() for c in alt) for alt in row.when)


def check_unread(values: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Refuse a non-default value of a strict key that nothing in this config's run reads."""
    for key, row in READERS.items():
        if not row.strict or values[key] == defaults[key] or is_read(key, values):
            continue
        deciding = list(dict.fromkeys(c.key for alt in row.when for c in alt if not c.holds(values)))
        has = ", ".join(f"{k}={show(values[k])}" for k in deciding)
        raise UserError(f"config key '{key}' ({show(values[key])}) is read only when {_requirement(row)}, and this "
                        f"config has {has}: remove {key} (default {show(defaults[key])}) or change "
                        f"{' / '.join(deciding)}")


# Class counts known from the config alone (imagefolder: its sub-folders, known once read).
KNOWN_CLASSES: dict[str, Callable[[dict[str, Any]], int]] = {
    "shapes": lambda v: 12,  # diffusion.data.shapes.CLASS_NAMES: 4 colours x 3 shapes
    "cifar10": lambda v: 10,
    "celeba": lambda v: 2 ** len(v["data.celeba_attributes"]),
}


def check_pairs(values: dict[str, Any]) -> None:
    """Values valid alone that are meaningless together (beyond keys nobody reads)."""
    name = values["data.name"]
    labels = is_read("model.num_classes", values)
    count = KNOWN_CLASSES[name](values) if name in KNOWN_CLASSES else None
    who = "task=classifier" if values["task"] == "classifier" else "model.condition=class"
    if labels and count == 1:
        raise UserError(f"{who} needs classes, and data.name=celeba without data.celeba_attributes has one: "
                        "choose attributes (e.g. data.celeba_attributes=[Male,Smiling])"
                        + (" or set model.condition=none" if values["task"] == "denoiser" else ""))
    if labels and count is not None and values["model.num_classes"] not in (0, count):
        raise UserError(f"config key 'model.num_classes' ({values['model.num_classes']}) does not match "
                        f"data.name={name}, which has {count} classes: set model.num_classes=0 (take it from the "
                        f"dataset) or {count}")
    if (is_read("model.text.width", values) and name == "celeba" and values["data.celeba_captions"] == "class"
            and not values["data.celeba_attributes"]):
        reader = "task=clip" if values["task"] == "clip" else "model.condition=text"
        raise UserError(f"{reader} learns from captions, and data.celeba_captions=class without "
                        "data.celeba_attributes gives every image the same caption: set data.celeba_captions=all "
                        "or choose data.celeba_attributes")
    if (values["task"] == "denoiser" and values["model.condition"] != "none" and values["model.cond_drop_prob"] == 0
            and values["sample.guidance_scale"] != 1):
        raise UserError(f"sample.guidance_scale={show(values['sample.guidance_scale'])} needs the unconditional "
                        "branch, which model.cond_drop_prob=0 never trains: set model.cond_drop_prob above 0 "
                        "(e.g. 0.2) or sample.guidance_scale=1")
    if values["sample.churn_min"] > values["sample.churn_max"]:
        raise UserError(f"sample.churn_min ({show(values['sample.churn_min'])}) is above sample.churn_max "
                        f"({show(values['sample.churn_max'])}): churn would apply at no noise level; give "
                        "churn_min <= churn_max")


def check_combinations(values: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Every combination check on a config's flat values, for config_checks.validate (after each value
    was checked alone)."""
    check_unread(values, defaults)
    check_pairs(values)
    from .ema.settings import check_posthoc_settings  # torch-free

    check_posthoc_settings(values)
