"""Dispatch `python -m diffusion.evaluate COMMAND` to its module."""
from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import UserError, exit_on_user_error
from ..threads import prefer_passive_waits, set_cpu_threads
from . import COMMANDS


def build_parser(command: str) -> tuple[argparse.ArgumentParser, object]:
    """The parser of one evaluation command, and its module (imports it: torch and the rest)."""
    available = {}
    for name, module_name in COMMANDS.items():
        try:
            available[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
    if command not in available:
        raise UserError(f"unknown evaluation '{command}': choose one of {', '.join(available)}")
    module = available[command]
    parser = argparse.ArgumentParser(prog=f"python -m diffusion.evaluate {command}", description=module.__doc__,
                                     allow_abbrev=False)  # --classifier must pass through, not abbreviate --classifier-scale
    module.add_arguments(parser)
    return parser, module


def parse(parser: argparse.ArgumentParser, module, argv: list[str]):
    """Its arguments: a namespace, or (namespace, the rest) for commands that pass sample.py options on."""
    return parser.parse_args(argv) if not getattr(module, "PASS_UNKNOWN", False) else parser.parse_known_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    prefer_passive_waits()  # before torch is imported (see diffusion/threads.py)
    argv = sys.argv[1:] if argv is None else argv
    parser, module = build_parser(argv[0] if argv else "nothing")
    args = parse(parser, module, argv[1:])
    set_cpu_threads()
    module.run(args)


if __name__ == "__main__":
    main()
