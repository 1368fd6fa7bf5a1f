"""User-facing errors: one clear line, exit status 2, no traceback."""
from __future__ import annotations

import functools
import signal
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix."""


class Interrupted(Exception):
    """A run stopped early on SIGINT or SIGTERM after saving its state (and saying so)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process the signal ended (130, 143): never 0,
        so a scheduler does not take a stopped run for a finished one."""
        return 128 + self.signum


class Diverged(Exception):
    """Training produced a non-finite loss or weights; the run stops without saving them."""

    exit_status = 3


def preview(value: object, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters, for echoing a user's value inside a one-line error (a
    value may be megabytes long, or hold a newline)."""
    text = repr(value) if not isinstance(value, str) or len(value) <= 4 * limit else repr(value[: 4 * limit])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(err: BaseException, limit: int = 200) -> str:
    """An exception's message cut to its first line (the exception's name if it has none), for
    quoting a library's error inside a one-line UserError. For torch.load(weights_only=True), whose
    first lines are advice, the line that gives the reason."""
    text = str(err).strip()
    if text.startswith("Weights only load failed"):
        rest = [line.split("WeightsUnpickler error:")[-1].strip() for line in text.splitlines()[1:]]
        reason = next((line for line in rest if line and not line.startswith("Check the documentation")), "")
        text = f"torch.load refused it as not plain weights: {reason}"
    return (text.splitlines() or [type(err).__name__])[0][:limit]


MESSAGE_LIMIT = 2000  # characters of an error line; a longer one is cut


def one_line(err: BaseException) -> str:
    """The message of a UserError (or Diverged) as the one line the command prints. A UserError raised
    in a data-loader worker reaches the main process re-raised by torch with the worker's traceback
    in its message: its last line is the original message."""
    text = str(err)
    if "\nOriginal Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(f"{type(err).__name__}: ", 1)[-1]
    text = " ".join(text.split("\n"))
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 3] + "..."


def exit_on_user_error(main: F) -> F:
    """Wrap a CLI entry point: a UserError prints one line and exits with status 2; an Interrupted run
    exits with its status (it has said what it saved); a second Ctrl-C exits 130 in one line."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {one_line(err)}", file=sys.stderr)
            raise SystemExit(2) from None
        except Interrupted as err:  # saved: a further Ctrl-C while the interpreter exits changes nothing
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            raise SystemExit(err.exit_status) from None
        except Diverged as err:
            print(f"error: {one_line(err)}", file=sys.stderr)
            raise SystemExit(Diverged.exit_status) from None
        except KeyboardInterrupt:
            print("interrupted: stopped at once, without saving", file=sys.stderr)
            raise SystemExit(128 + signal.SIGINT) from None

    return wrapper  # type: ignore[return-value]
