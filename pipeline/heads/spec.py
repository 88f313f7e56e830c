"""How a head is made, as one value: the head type and every setting that changes the fitted head.

``tlpipe fit-head``, ``compare --save-best`` and the head's JSON sidecar share it; the defaults live here
once, and :meth:`HeadSpec.check` holds the rules (like scikit-learn's ``_parameter_constraints``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tlpipe.errors import InputError

__all__ = ["HeadSpec"]


@dataclass(frozen=True)
class HeadSpec:
    """A head request.

    Attributes
    ----------
    model : str
        Head type: ``logreg`` | ``svm`` | ``rbf-svm`` | ``mlp`` (:data:`tlpipe.pipeline.heads.estimators.HEADS`).
    pca : int, float, str or None
        ``"auto"`` (the head type's rule, :func:`~tlpipe.pipeline.heads.estimators.resolve_pca`), None (no PCA),
        a number of components (int >= 1) or a fraction of the variance kept (0 < f < 1).
    class_weight : str, dict or None
        None, ``"balanced"``, or a class -> weight mapping.
    search : bool
        Search the head type's small grid (:func:`~tlpipe.pipeline.heads.estimators.search_space`).
    seed : int
        Seed of the folds, the hold-out split and the head's initialisation.
    params : mapping
        Fixed hyperparameters of the head's estimator (e.g. ``{"C": 0.1}``).
    use_augmented : bool
        Also train on the feature set's augmented views of the training images (``extract --augment N``).
    """

    model: str = "logreg"
    pca: int | float | str | None = "auto"
    class_weight: str | dict | None = None
    search: bool = False
    seed: int = 0
    params: Mapping[str, Any] = field(default_factory=dict)
    use_augmented: bool = False

    def check(self) -> HeadSpec:
        """The spec itself when every rule holds.

        Raises
        ------
        tlpipe.errors.InputError
            An unknown head type, a ``pca`` of neither form, a ``class_weight`` that is not None, "balanced"
            or a mapping.
        """
        from tlpipe.pipeline.heads.estimators import HEADS

        if self.model not in HEADS:
            raise InputError(f"unknown head {self.model!r}: one of {', '.join(HEADS)}")
        pca = self.pca
        if not (pca is None or pca == "auto" or isinstance(pca, (int, float)) and not isinstance(pca, bool)):
            raise InputError(f"pca must be 'auto', None, a number of components or a fraction in (0, 1), not {pca!r}")
        if isinstance(pca, (int, float)) and not isinstance(pca, bool):
            if isinstance(pca, float) and not pca.is_integer() and not 0 < pca < 1:
                raise InputError(
                    f"pca {pca}: give a number of components (>= 1) or a fraction of the variance in (0, 1)"
                )
            if pca <= 0:
                raise InputError(
                    f"pca {pca}: give a number of components (>= 1) or a fraction of the variance in (0, 1)"
                )
        if not (self.class_weight is None or self.class_weight == "balanced" or isinstance(self.class_weight, dict)):
            raise InputError(f"class_weight must be None, 'balanced' or a mapping, not {self.class_weight!r}")
        return self

    def with_(self, **changes: Any) -> HeadSpec:
        """A copy with ``changes`` applied."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON values (what a head's sidecar records)."""
        return asdict(self) | {"params": dict(self.params)}
