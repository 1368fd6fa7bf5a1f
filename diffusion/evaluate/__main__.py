"""Dispatch `python -m diffusion.evaluate COMMAND` to its module."""
from __future__ import annotations

import importlib
import sys

from ..cli.args import Parser, add_trust_argument, apply_trust
from ..errors import UserError, exit_on_user_error
from . import COMMANDS


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    available = {}
    for name, module_name in COMMANDS.items():
        try:
            available[name] = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
    if not argv or argv[0] not in available:
        given = argv[0] if argv else "nothing"
        raise UserError(f"unknown evaluation '{given}': choose one of {', '.join(available)}")
    module = available[argv[0]]
    parser = Parser(prog=f"python -m diffusion.evaluate {argv[0]}", description=module.__doc__,
                    allow_abbrev=False)  # --classifier must pass through, not abbreviate --classifier-scale
    module.add_arguments(parser)
    if not any("--trust-checkpoint" in action.option_strings for action in parser._actions):
        add_trust_argument(parser)
    if getattr(module, "PASS_UNKNOWN", False):
        args = parser.parse_known_args(argv[1:])
        apply_trust(args[0])
    else:
        args = parser.parse_args(argv[1:])
        apply_trust(args)
    module.run(args)


if __name__ == "__main__":
    main()
