"""Dispatch `python -m diffusion.evaluate COMMAND` to its module."""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys
from pathlib import Path

from ..cli.args import Parser, add_trust_argument, apply_trust
from ..cli.help_format import DefaultsHelpFormatter
from ..errors import UserError, exit_on_user_error
from ..io import check_output_path
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
    parser = Parser(prog=f"python -m diffusion.evaluate {command}", description=module.__doc__,
                    formatter_class=DefaultsHelpFormatter,
                    allow_abbrev=False)  # --classifier must pass through, not abbreviate --classifier-scale
    module.add_arguments(parser)
    if not any("--trust-checkpoint" in action.option_strings for action in parser._actions):
        add_trust_argument(parser)
    return parser, module


def summary(module_name: str) -> str:
    """The first line of an evaluation module's docstring, read from its source (no torch import: --help is fast)."""
    spec = importlib.util.find_spec(module_name)
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) if spec and spec.origin else None
    return doc.splitlines()[0] if doc else ""


def overview() -> str:
    """`python -m diffusion.evaluate --help`: every evaluation with its one-line summary."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary(module)}" for name, module in COMMANDS.items()]
    return ("usage: python -m diffusion.evaluate EVALUATION [options]   (EVALUATION --help: its options and defaults)\n\n"
            "evaluations:\n" + "\n".join(lines))


def parse(parser: argparse.ArgumentParser, module, argv: list[str]):
    """Its arguments: a namespace, or (namespace, the rest) for commands that pass sample.py options on."""
    return parser.parse_args(argv) if not getattr(module, "PASS_UNKNOWN", False) else parser.parse_known_args(argv)


OUTPUT_OPTIONS = ("out", "json", "sample_dir")  # every evaluation's output files and folders


def check_outputs(args: argparse.Namespace) -> None:
    """Every output an evaluation writes goes through the one output-path check (diffusion.io), before
    anything loads: not inside a checkpoint or a run's checkpoints/ or final/, not empty."""
    for name in OUTPUT_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, str):
            check_output_path(value, "--" + name.replace("_", "-"))


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    prefer_passive_waits()  # before torch is imported (see diffusion/threads.py)
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        if not argv:
            raise UserError(f"name an evaluation: python -m diffusion.evaluate {{{','.join(COMMANDS)}}} ...")
        return
    parser, module = build_parser(argv[0])
    args = parse(parser, module, argv[1:])
    namespace = args[0] if isinstance(args, tuple) else args
    check_outputs(namespace)
    apply_trust(namespace)
    set_cpu_threads()
    module.run(args)


if __name__ == "__main__":
    main()
