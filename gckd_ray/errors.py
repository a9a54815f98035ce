"""Errors of bad user input. Every command-line entry point prints an ``InputError`` as one line,
``<kind> error: <message>``, and exits with code 2; anything else is a bug and keeps its
traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class InputError(ValueError):
    """Bad input from the user; the message names the file or key and what was expected."""

    kind = "input"


def one_line(err: InputError) -> str:
    """The line a command prints for ``err``."""
    return f"{err.kind} error: " + " ".join(str(err).split())


def run_command(command: Callable[[], object]) -> int:
    """A command-line entry point's exit status: 0 when ``command()`` returns, 2 with the
    error's one line on stderr when it raises an ``InputError``."""
    try:
        command()
    except InputError as err:
        print(one_line(err), file=sys.stderr)
        return 2
    return 0
