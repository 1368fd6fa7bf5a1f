"""The command lines' argument parser: every bad value is one line and exit status 2, like every other
bad input (argparse alone prints its usage block), and no float option takes `nan` or `inf`.

Also the `--trust-checkpoint` option, shared by every command that loads checkpoints.
"""
from __future__ import annotations

import argparse
import math

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
        raise UserError(f"{option} is not valid UTF-8 text: {preview(text)}") from None


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
