"""The command lines' argument parser: every bad value is one line and exit status 2, like every other
bad input (argparse alone prints its usage block), and no float option takes `nan` or `inf`.

Also the `--trust-checkpoint` option, shared by every command that loads checkpoints, and the checks
of sampling arguments shared by sample.py and the diffusers pipeline (diffusion.pipeline): each takes
the argument's name (`--steps`, `num_inference_steps`) and raises `BadValue` or `BadType`, which are
UserErrors to the command lines (one line, exit status 2) and ValueError / TypeError to a library caller.
Torch-free, like the parsers.
"""
from __future__ import annotations

import argparse
import math
import numbers
from typing import Any, Sequence

from ..errors import UserError, preview


def finite_float(text: str) -> float:
    """argparse type of every float option: `nan`, `inf` and `1e999` are refused (a NaN guidance scale
    would write black images and exit 0)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {preview(text)}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {preview(text)}")
    return value


def check_text(option: str, text: str) -> None:
    """Text from the command line goes into files, PNG metadata and prompts: refuse bytes that are not
    UTF-8 (Python keeps them as lone surrogates, which no UTF-8 writer accepts)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadValue(f"{option} is not valid UTF-8 text: {preview(text)}") from None


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are a UserError (one line, exit status 2) and whose float
    options (`type=float`, in any argument group) are finite."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")

    def parse_known_args(self, args=None, namespace=None):
        for action in self._actions:
            if action.type is float:
                action.type = finite_float
        parsed, rest = super().parse_known_args(args, namespace)
        names = {action.dest: (action.option_strings or [action.dest])[0] for action in self._actions}
        for dest, value in vars(parsed).items():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str):
                    check_text(names.get(dest, dest), item)
        return parsed, rest


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load checkpoints whose info.json does not list every file's sha256 (older or hand-made "
                             "ones); the files it lists are still checked")


def apply_trust(args: argparse.Namespace) -> None:
    """Make --trust-checkpoint apply to every checkpoint this process loads."""
    if getattr(args, "trust_checkpoint", False):
        from ..checkpoints.store import trust_checkpoints

        trust_checkpoints()


# -- sampling arguments, shared by sample.py and diffusion.pipeline ---------------------------------------------

SEED_LIMIT = 2**63 - 2**32  # sample i uses seed + i, a torch.Generator seed (below 2^63)
MAX_PROMPT_CHARS = 10_000  # as config_checks allows in sample.prompts; a prompt is cut to the context length anyway


class BadValue(UserError, ValueError):
    """A sampling argument with a value no sampler can use: a UserError to the command lines, a ValueError
    to library callers."""


class BadType(BadValue, TypeError):
    """A sampling argument of the wrong kind (text for a number, 2.5 steps): also a TypeError."""


def whole_number(value: Any, name: str) -> int:
    """`value` as an int: ints (and numpy's) only; True, 2.5, "3" and tensors are refused, naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BadType(f"{name} must be a whole number, got {preview(value)} ({type(value).__name__})")
    return int(value)


def real_number(value: Any, name: str) -> float:
    """`value` as a finite float: numbers only (not True, not text), and not nan or inf."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BadType(f"{name} must be a number, got {preview(value)} ({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number):
        raise BadValue(f"{name} must be a finite number, got {number}")
    return number


def check_guidance_scale(value: Any, name: str = "--guidance-scale") -> float:
    """Classifier-free guidance scale: finite and >= 0 (a NaN scale draws black images)."""
    scale = real_number(value, name)
    if scale < 0:
        raise BadValue(f"{name} must be >= 0 (0 = unconditional, 1 = conditional), got {scale:g}")
    return scale


def check_steps(value: Any, name: str = "--steps", most: int | None = None) -> int:
    """Sampling steps: a whole number from 1 to `most` (a ddpm model's training timesteps, for the samplers
    that visit them)."""
    steps = whole_number(value, name)
    if steps <= 0:
        raise BadValue(f"{name} must be positive, got {steps}")
    if most is not None and steps > most:
        raise BadValue(f"{name} {steps} is more than the model's {most} training timesteps: give {name} from 1 to {most}")
    return steps


def check_count(value: Any, name: str) -> int:
    """A positive whole number of images (--num-samples, --batch-size, batch_size)."""
    count = whole_number(value, name)
    if count <= 0:
        raise BadValue(f"{name} must be positive, got {count}")
    return count


def check_seed(value: Any, name: str = "--seed") -> int:
    seed = whole_number(value, name)
    if not 0 <= seed < SEED_LIMIT:
        raise BadValue(f"{name} must be a whole number in [0, 2^63), got {seed}")
    return seed


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        error = BadValue if isinstance(value, str) else BadType
        raise error(f"{name} must be one of {', '.join(choices)}, got {preview(value)}")
    return value


def check_class_label(value: Any, name: str, classes: int) -> int:
    """A class index of a model with `classes` classes (its null class excluded)."""
    label = whole_number(value, name)
    if not 0 <= label < classes:
        raise BadValue(f"{name} {label} is out of range: this model has classes 0..{classes - 1}")
    return label


def check_prompt(value: Any, name: str = "--prompt") -> str:
    """A caption: text, UTF-8, at most MAX_PROMPT_CHARS characters ("" is the unconditional caption)."""
    if not isinstance(value, str):
        raise BadType(f"{name} must be text, got {preview(value)} ({type(value).__name__})")
    check_text(name, value)
    if len(value) > MAX_PROMPT_CHARS:
        raise BadValue(f"{name} holds {len(value)} characters; at most {MAX_PROMPT_CHARS}")
    return value
