"""The `tlpipe` command line: thin command modules that parse options, build a spec, call one library
function and print. Heavy imports happen inside commands, so `tlpipe --help` and `tlpipe fit-head` start fast
and run without TensorFlow or ONNX Runtime."""

from __future__ import annotations

import logging
import sys

from rich.markup import escape

# Importing the command modules registers their commands on the app.
from tlpipe.pipeline.cli import audit, demo, extract, heads, models, scoring, training  # noqa: E402,F401
from tlpipe.pipeline.cli._common import app, console

__all__ = ["app", "main"]


USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError, KeyError, PermissionError)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input or a missing extra: one line, no traceback."""
    from tlpipe.backbones import MissingExtra, ProviderError, StoreError, VerificationError, WeightsUnavailable
    from tlpipe.features.cache import CacheError

    found = [MissingExtra, ProviderError, StoreError, VerificationError, WeightsUnavailable, CacheError]
    for module, name in (
        ("tlpipe.pipeline.heads.persistence", "HeadError"),
        ("tlpipe.pipeline.scoring.score", "ScoreError"),
        ("tlpipe.pipeline.scoring.fuse", "FuseError"),
    ):
        if module in sys.modules:  # only what the command imported
            found.append(getattr(sys.modules[module], name))
    return USER_ERRORS + tuple(found)


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
        if isinstance(exc, _user_errors()):
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            console.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            sys.exit(2)
        raise
