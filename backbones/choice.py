"""Which model: one value object naming the backbone a command runs, built once (by the CLI or a caller)
and passed down instead of eight positional arguments."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

from .store import ModelStore, StoreEntry

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

    def with_(self, **changes: Any) -> ModelChoice:
        """A copy with ``changes`` applied."""
        return replace(self, **changes)

    @property
    def model_store(self) -> ModelStore:
        """``store``, or the default store."""
        return self.store or ModelStore()

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
