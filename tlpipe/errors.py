"""The one root of tlpipe's exceptions.

Every error tlpipe raises for input or state a user can fix derives from :class:`TlpipeError`; each keeps
the built-in base callers already catch (``ValueError``, ``RuntimeError``, ``ImportError``, ...). The CLI
prints a :class:`TlpipeError` as one ``error:`` line and exits 2; anything else is a bug and exits 1 with its
traceback (:func:`tlpipe.pipeline.cli.main`).

Where each subclass lives (one home each, next to the code that raises it):

========================  =========================================  ======================
class                     module                                     built-in base
========================  =========================================  ======================
``InputError``            :mod:`tlpipe.errors`                       ``ValueError``
``MissingExtra``          :mod:`tlpipe.backbones.deps`               ``ImportError``
``WeightsUnavailable``    :mod:`tlpipe.backbones.weights`            ``RuntimeError``
``StoreError``            :mod:`tlpipe.backbones.store`              ``RuntimeError``
``VerificationError``     :mod:`tlpipe.backbones.export`             ``RuntimeError``
``ProviderError``         :mod:`tlpipe.backbones.runtime`            ``RuntimeError``
``LayoutError``           :mod:`tlpipe.features.sources`             ``ValueError``
``CacheError``            :mod:`tlpipe.features.cache`               ``RuntimeError``
``HeadError``             :mod:`tlpipe.pipeline.heads.persistence`   ``RuntimeError``
``LeakError``             :mod:`tlpipe.pipeline.heads.evaluate`      ``ValueError``
``ScoreError``            :mod:`tlpipe.pipeline.scoring.score`       ``RuntimeError``
``FuseError``             :mod:`tlpipe.pipeline.scoring.fuse`        ``RuntimeError``
``AuditError``            :mod:`tlpipe.pipeline.audit.checks`        ``ValueError``
``SuggestError``          :mod:`tlpipe.pipeline.suggest.core`        ``ValueError``
========================  =========================================  ======================
"""

from __future__ import annotations

__all__ = ["InputError", "NotFoundError", "TlpipeError", "UnknownNameError"]


class TlpipeError(Exception):
    """Bad input or state the user can fix; the CLI prints its one line and exits 2."""


class InputError(TlpipeError, ValueError):
    """An option value, argument or input that tlpipe refuses (the message says what and why)."""


class UnknownNameError(TlpipeError, KeyError):
    """A name that is not in its table (a backbone, a feature set, a head type...); the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class NotFoundError(TlpipeError, FileNotFoundError):
    """A file or folder the user named does not exist."""
