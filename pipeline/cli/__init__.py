"""The `tlpipe` command line: thin command modules that parse options, build a spec, call one library
function and print. Heavy imports happen inside commands, so `tlpipe --help` and `tlpipe fit-head` start fast
and run without TensorFlow or ONNX Runtime."""

from __future__ import annotations

import logging
import sys

from rich.markup import escape

# Importing the command modules registers their commands on the app.
from tlpipe.pipeline.cli import audit, demo, extract, heads, models, scoring, suggest, training  # noqa: E402,F401
from tlpipe.pipeline.cli._common import app, console

__all__ = ["app", "main", "user_message"]


def user_message(exc: BaseException) -> str | None:
    """The one line the CLI prints for an error that is the user's to fix, or None for a bug.

    :class:`~tlpipe.errors.TlpipeError` is the user's (bad input or state, a missing extra); so is an
    ``OSError`` about a file the user named (missing, unreadable, a folder where a file was expected, disk
    full). Anything else — ``ValueError``, ``KeyError``, ``TypeError`` raised by a bug — is not disguised as
    bad input: it propagates with its traceback (exit 1).
    """
    from tlpipe.errors import TlpipeError

    if isinstance(exc, TlpipeError):
        return str(exc)
    if isinstance(exc, OSError) and (exc.filename is not None or exc.errno is not None):
        return str(exc)
    return None


def main() -> None:
    """Entry point. Exit codes: 0 ok; 1 unexpected error (traceback: a bug); 2 bad input or usage (one line
    starting with ``error:``; click's usage errors too); 3 ``--strict`` found failed images; 130 interrupted."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted", highlight=False)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - sorted below
        message = user_message(exc)
        if message is not None:
            console.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            sys.exit(2)
        raise
