"""Errors of bad user input. Every command-line entry point prints an ``InputError`` as one line,
``<kind> error: <message>``, and exits with code 2; anything else is a bug and keeps its
traceback."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user; the message names the file or key and what was expected."""

    kind = "input"


def one_line(err: InputError) -> str:
    """The line a command prints for ``err``."""
    return f"{err.kind} error: " + " ".join(str(err).split())
