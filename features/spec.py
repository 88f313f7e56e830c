"""The settings of a feature set and of a run, as values: :class:`FeatureSpec` (what an embedding is) and
:class:`RunOptions` (where and how the work runs, never part of a result).

One source of truth each: the defaults live here once; :meth:`FeatureSpec.check` and :meth:`RunOptions.check`
hold every rule (like timm's resolved data config and scikit-learn's ``_parameter_constraints``). The CLI
builds these from its options; library functions take them instead of long argument lists.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from tlpipe.backbones.choice import ModelChoice
from tlpipe.errors import InputError

__all__ = ["ENGINES", "FeatureSpec", "RunOptions"]

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class FeatureSpec(ModelChoice):
    """Everything that determines an embedding: the model (a :class:`~tlpipe.backbones.choice.ModelChoice`:
    backbone, weights, size, cut point, pooling, TTA, precision, or a stored export) and how images reach it.

    A ``FeatureSpec`` is a ``ModelChoice``, so it is accepted wherever a model is named. Its :attr:`key` is
    *the* feature-set key — the one ``tlpipe info`` prints and ``--features`` takes — and
    :meth:`from_key` turns such a key back into a spec, so the key names the model everywhere
    (``extract --backbone KEY``).

    Attributes
    ----------
    resize : str or None
        ``squash`` (default, like Keras ``image_dataset_from_directory``) | ``crop`` (short side, centre crop).
        None: what a feature-set key given as ``model`` spells out, else the default.
    resize_filter : str or None
        ``bilinear`` (default: the fast JPEG path) | ``antialias`` (Pillow's antialiased bilinear). None: as
        ``resize``.
    dtype : str
        ``float32`` | ``float16``: how the cache stores the embeddings.
    """

    resize: str | None = None
    resize_filter: str | None = None
    dtype: str = "float32"

    @classmethod
    def from_key(cls, key: str, **fields_: Any) -> FeatureSpec:
        """The spec of a stored feature set named by its key (or of a plain model-store key).

        Parameters
        ----------
        key : str
            A feature-set key (``<model key>[-resize-<mode>][-filter-<filter>]``) or a model-store key.
        **fields_
            Other fields (e.g. ``store``).

        Returns
        -------
        FeatureSpec
            ``model`` is the model-store key; ``resize`` / ``resize_filter`` are the settings the key spells out.
        """
        from tlpipe.features.cache import split_feature_set_key

        model_key, resize, resize_filter = split_feature_set_key(key)
        return cls(backbone=None, model=model_key, resize=resize, resize_filter=resize_filter, **fields_)

    def settled(self) -> FeatureSpec:
        """This spec with its image settings decided: a feature-set key given as ``model`` supplies what it
        spells out, the defaults the rest; a setting given that disagrees with the key is refused.

        Raises
        ------
        tlpipe.errors.InputError
            ``resize`` / ``resize_filter`` given and different from the key's.
        """
        from pathlib import Path

        from tlpipe.features.cache import RESIZE_DEFAULT, split_feature_set_key
        from tlpipe.features.fastdecode import DEFAULT_RESIZE_FILTER

        spec, resize, resize_filter = self, self.resize, self.resize_filter
        if isinstance(self.model, str) and not Path(self.model).exists():
            model_key, key_resize, key_filter = split_feature_set_key(self.model)
            for name, given, implied in (("resize", resize, key_resize), ("resize-filter", resize_filter, key_filter)):
                if given is not None and implied is not None and given != implied:
                    raise InputError(
                        f"--{name} {given} disagrees with the feature-set key {self.model} (made with {implied}): "
                        f"drop --{name}, or name the model-store key {model_key}"
                    )
            spec = replace(spec, model=model_key)
            resize, resize_filter = resize or key_resize, resize_filter or key_filter
        return replace(spec, resize=resize or RESIZE_DEFAULT, resize_filter=resize_filter or DEFAULT_RESIZE_FILTER)

    def check(self) -> FeatureSpec:
        """The spec itself when every rule holds (cheap: nothing is exported or read).

        Raises
        ------
        tlpipe.errors.InputError
            A value outside its choices (pooling, precision, TTA, resize, resize filter, dtype).
        """
        from tlpipe.backbones.tta import check_tta
        from tlpipe.features.extract import check_extract_options

        check_extract_options(
            resize=self.resize or "squash",
            resize_filter=self.resize_filter or "bilinear",
            dtype=self.dtype,
            precision=self.precision,
            pooling=self.pooling,
        )
        check_tta(self.tta)
        return self

    @property
    def key(self) -> str:
        """The feature-set key of this spec (fp32 and fp16 without exporting anything; cheap).

        Raises
        ------
        tlpipe.errors.InputError
            ``precision="int8"``: that key depends on the calibration images, so only extraction names it.
        tlpipe.backbones.store.StoreError, tlpipe.backbones.weights.WeightsUnavailable
            A stored model that is not in the store; weights that cannot be had.
        """
        from tlpipe.features.cache import feature_set_key

        spec = self.settled().check()
        if spec.precision == "int8":
            raise InputError("an int8 feature set's key depends on its calibration images: tlpipe extract names it")
        model_key = spec.model_store.resolve(spec.model).key if spec.model is not None else spec.plan().key
        if spec.precision == "fp16":
            from tlpipe.backbones.quantize import variant_key

            model_key = variant_key(spec.model_store.resolve(model_key), "fp16", None)
        assert spec.resize is not None and spec.resize_filter is not None  # settled
        return feature_set_key(model_key, spec.resize, spec.resize_filter)

    @property
    def model_choice(self) -> ModelChoice:
        """The model part alone."""
        return ModelChoice(**{f.name: getattr(self, f.name) for f in fields(ModelChoice)})


@dataclass(frozen=True)
class RunOptions:
    """Where and how the work runs; never part of a result.

    Attributes
    ----------
    device : str
        ``auto`` (CUDA when it attaches, else CPU) | ``cpu`` | ``cuda`` (strict).
    batch_size : int
        Images per inference batch and per commit.
    workers : int or None
        Decode threads; None: one per core.
    threads : int or None
        ONNX Runtime intra-op threads per stream; None: its default.
    streams : int or None
        Concurrent inference streams; None: chosen from the cores.
    n_jobs : int or None
        Parallel (head, fold) jobs for the heads; None: every core.
    engine : str
        ``local`` | ``ray`` (a Ray cluster, ``tlpipe[ray]``).
    address : str or None
        The Ray cluster (``auto``, ``ray://host:port``); None starts a local one.
    actors : int or None
        Ray inference actors; None: one per GPU, else one per node.
    quiet : bool
        No progress output.
    """

    device: str = "auto"
    batch_size: int = 32
    workers: int | None = None
    threads: int | None = None
    streams: int | None = None
    n_jobs: int | None = None
    engine: str = "local"
    address: str | None = None
    actors: int | None = None
    quiet: bool = False

    def check(self) -> RunOptions:
        """The options themselves when every rule holds.

        Raises
        ------
        tlpipe.errors.InputError
            An unknown device or engine, or a count below 1.
        """
        from tlpipe.backbones.runtime import DEVICES

        if self.device not in DEVICES:
            raise InputError(f"--device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.engine not in ENGINES:
            raise InputError(f"--engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        for name in ("batch_size", "workers", "threads", "streams", "n_jobs", "actors"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
        return self

    def with_(self, **changes: Any) -> RunOptions:
        """A copy with ``changes`` applied."""
        return replace(self, **changes)
