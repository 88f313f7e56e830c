"""Heads: small scikit-learn classifiers on a cached feature set.

- :mod:`.estimators` — the head types (``logreg``, ``svm``, ``rbf-svm``, ``mlp``), cross-validation, splits;
- :mod:`.selection` — comparing heads (``tlpipe compare``) and feature sets (the sweep), choosing the best;
- :mod:`.fit` — ``tlpipe fit-head``: split, fit, held-out metrics, saved head;
- :mod:`.evaluate` — a saved head on a split, with the leak check;
- :mod:`.persistence` — the joblib file and its checked JSON sidecar;
- :mod:`.engine` — where the parallel (head, fold) jobs run (joblib or Ray).

Nothing here renders: reports live in :mod:`tlpipe.pipeline.reports`.
"""

from __future__ import annotations

from typing import Any

__all__: list[str] = []

# Heads saved before the heads package existed pickled their classes as ``tlpipe.pipeline.heads.<Class>``;
# they resolve here (on first use only, so importing the package stays cheap).
_PICKLED = ("MLPHead", "SVCHead", "LogisticRegressionCVHead")


def __getattr__(name: str) -> Any:
    if name in _PICKLED:
        from . import estimators

        return getattr(estimators, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
