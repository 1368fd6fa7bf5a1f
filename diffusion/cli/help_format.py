"""The `--help` formatter of the command lines: every option shows its default.

argparse's ArgumentDefaultsHelpFormatter skips options without help text and repeats a default the help
already states; this one adds `(default: X)` to every optional argument whose help does not say
"default" itself, keeps the description's line breaks, and leaves flags (store_true) and required options alone.
"""
from __future__ import annotations

import argparse

NO_DEFAULT_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction,
                      argparse._VersionAction, argparse._CountAction, argparse._StoreConstAction)


def shows_default(action: argparse.Action) -> bool:
    """Whether the option's help line should end with its default (not already stated there)."""
    return (bool(action.option_strings) and not action.required and action.default is not argparse.SUPPRESS
            and not isinstance(action, NO_DEFAULT_ACTIONS) and "default" not in (action.help or "").lower())


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """RawDescriptionHelpFormatter plus every option's default in its help line."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if not shows_default(action):
            return action.help or ""
        default = "none" if action.default is None else "%(default)s"
        return f"{action.help or ''} (default: {default})".strip()

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and shows_default(action):  # argparse prints no help line for an option without help
            action.help = "(default: none)" if action.default is None else "(default: %(default)s)"
        return super()._format_action(action)
