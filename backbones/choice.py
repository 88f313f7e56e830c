"""Which model: one value object naming the backbone a command runs, built once (by the CLI or a caller)
and passed down instead of eight positional arguments."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from tlpipe.errors import InputError

from .store import ModelStore, StoreEntry

if TYPE_CHECKING:
    from .export import ExportPlan

__all__ = ["ModelChoice"]


@dataclass(frozen=True)
class ModelChoice:
    """A backbone request: a registry backbone with its weights and cut, or a stored export.

    Attributes
    ----------
    backbone : str or None
        Registry name (see ``tlpipe backbones``); ignored when ``model`` is given.
    weights : str or path or None
        "imagenet", "none" (random init), a .h5 file or a folder.
    weights_dir : path, optional
        Folder searched for local ImageNet weight files.
    size : int, optional
        Square input side in pixels (default: the backbone's).
    layer : str, optional
        Cut point (a named layer); None = the whole backbone.
    pooling : str
        "avg" | "max" | "none".
    precision : str
        "fp32" | "int8" | "fp16".
    model : str or path, optional
        A stored export (store key or folder, e.g. a fine-tune's output); wins over ``backbone``.
    store : ModelStore, optional
        The model store (default: ``~/.cache/tlpipe/models`` or ``$TLPIPE_MODEL_STORE``).
    tta : str
        "none" | "flip" | "flip+crops": test-time views made inside the exported model (:mod:`backbones.tta`).
    """

    backbone: str | None = "mobilenet_v2"
    weights: str | os.PathLike[str] | None = "imagenet"
    weights_dir: str | os.PathLike[str] | None = None
    size: int | None = None
    layer: str | None = None
    pooling: str = "avg"
    precision: str = "fp32"
    model: str | os.PathLike[str] | None = None
    store: ModelStore | None = None
    tta: str = "none"

    @classmethod
    def of(cls, **options: Any) -> ModelChoice:
        """A choice from keyword options; names that are not fields are ignored.

        Parameters
        ----------
        **options
            Any of the attributes (e.g. a command's keyword arguments).

        Returns
        -------
        ModelChoice
        """
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in options.items() if k in names})

    @classmethod
    def given(
        cls,
        choice: ModelChoice | None,
        options: dict[str, Any],
        command: str,
        used: Iterable[str] | None = None,
    ) -> ModelChoice:
        """The choice a library function runs: ``choice``, or one made of its keyword ``options`` (field names).

        Parameters
        ----------
        choice : ModelChoice or None
            Built by the caller (e.g. the CLI).
        options : dict
            Otherwise, the fields by name (a function's ``**choice_fields``); unset fields keep their defaults.
        command : str
            The function, for messages.
        used : iterable of str, optional
            The fields ``command`` uses; another field set away from its default is refused (None: all used).

        Returns
        -------
        ModelChoice

        Raises
        ------
        TypeError
            Both ``choice`` and ``options``, or an option that is not a field.
        ValueError
            A field ``command`` does not use, set.
        """
        if choice is not None and options:
            raise TypeError(f"{command}: give choice or its fields ({', '.join(options)}), not both")
        unknown = sorted(set(options) - set(cls.__dataclass_fields__))
        if unknown:
            raise TypeError(f"{command} got unexpected keyword arguments: {', '.join(unknown)}")
        choice = choice or cls(**options)
        kept = set(cls.__dataclass_fields__) if used is None else set(used)
        unused = [f.name for f in fields(cls) if f.name not in kept and getattr(choice, f.name) != f.default]
        if unused:
            raise InputError(f"{command} does not take {', '.join(unused)}")
        return choice

    def with_(self, **changes: Any) -> ModelChoice:
        """A copy with ``changes`` applied."""
        return replace(self, **changes)

    @property
    def model_store(self) -> ModelStore:
        """``store``, or the default store."""
        return self.store or ModelStore()

    def plan(self, seed: int = 0) -> ExportPlan:
        """The export plan of the registry backbone (validated, weights resolved; cheap, no TensorFlow).

        Parameters
        ----------
        seed : int
            Seed of the random initialisation with ``weights`` "none".

        Returns
        -------
        tlpipe.backbones.export.ExportPlan

        Raises
        ------
        ValueError, tlpipe.backbones.weights.WeightsUnavailable
            No registry backbone; an unknown backbone, size, layer or pooling; weights that cannot be had.
        """
        from .export import plan_export

        if self.backbone is None:
            raise InputError("a registry backbone is needed here (a stored model has no export plan)")
        return plan_export(
            self.backbone, self.weights, self.size, self.layer, self.pooling, self.weights_dir, seed=seed, tta=self.tta
        )

    def obtain(self) -> StoreEntry:
        """The fp32 store entry: the stored export, exported first when needed (minutes; needs tlpipe[tf]).

        Returns
        -------
        StoreEntry

        Raises
        ------
        tlpipe.backbones.store.StoreError
            ``model`` names nothing in the store, or its file does not match its recorded hash.
        tlpipe.backbones.deps.MissingExtra
            An export is needed and TensorFlow is not installed.
        """
        from .export import obtain_backbone

        return obtain_backbone(
            self.backbone,
            self.weights,
            self.size,
            self.layer,
            self.pooling,
            self.weights_dir,
            self.model_store,
            self.model,
            tta=self.tta,
        )
