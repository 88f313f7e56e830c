"""Saving and loading fitted heads: a joblib file plus a JSON sidecar that is checked before unpickling.

Unpickling a joblib file runs code, so :func:`load_head` reads ``<head>.json`` first and compares the
sha256 it records with the bytes of the joblib file; only matching bytes are unpickled (from memory,
so the file cannot change between the check and the load) unless the caller passes ``trust=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import sklearn

from tlpipe.errors import TlpipeError
from tlpipe.features.cache import FeatureSet, writing

__all__ = [
    "FORMAT_VERSION",
    "HeadError",
    "check_compatible",
    "head_labels",
    "load_head",
    "read_metadata",
    "save_head",
    "sidecar_path",
]

FORMAT_VERSION = 1


class HeadError(TlpipeError, RuntimeError):
    """A saved head cannot be used as asked (unverified, damaged or built for other embeddings)."""


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".json")


def _atomic_write(path: Path, write) -> None:
    """``write(file_object)`` into a temporary file next to ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _kept_dimensions(estimator, feature_set: FeatureSet) -> int:
    pca = dict(getattr(estimator, "steps", [])).get("pca")
    kept = getattr(pca, "n_components_", None)
    return int(kept) if kept is not None else int(feature_set.X.shape[1])


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _head_name(estimator) -> str:
    from tlpipe.pipeline.heads.estimators import head_name

    return head_name(estimator) if hasattr(estimator, "steps") else type(estimator).__name__


def head_labels(estimator, metadata: dict | None = None, class_names: list[str] | None = None) -> list[str]:
    """The class names of a fitted head's ``classes_``, in that order (= its ``predict_proba`` columns).

    Heads fitted by tlpipe since issue 15 know their classes by name (``classes_`` holds the names,
    ``predict`` returns them); heads saved before were fitted on the cache's label indices, which the
    sidecar's ``class_names`` (or ``class_names`` given here, e.g. the feature set's) map to names.

    Raises
    ------
    HeadError
        When the head predicts label indices and no class names are known for them.
    """
    classes = np.asarray(estimator.classes_)
    if not np.issubdtype(classes.dtype, np.integer):
        return [str(c) for c in classes]
    names = (metadata or {}).get("class_names") or class_names
    if not names:
        raise HeadError("the head predicts label indices and nothing names them (no sidecar class_names)")
    if classes.min() < 0 or classes.max() >= len(names):
        raise HeadError(f"the head predicts label indices {classes.tolist()}, its sidecar names {len(names)} classes")
    return [str(names[int(c)]) for c in classes]


def save_head(
    estimator,
    path: str | os.PathLike,
    *,
    feature_set: FeatureSet,
    metrics: dict,
    params: dict,
    cache_path: str | os.PathLike | None = None,
    rows: int | None = None,
    train_rows: np.ndarray | None = None,
    evaluation_rows: np.ndarray | None = None,
    evaluation_setup: str | None = None,
) -> dict:
    """Write a fitted head to ``path`` (joblib) and its metadata to ``path + ".json"``; return the metadata.

    Parameters
    ----------
    params : the head's parameters (``fit_head``'s info); metrics : its evaluation figures.
    cache_path, rows : where it was trained and how many training rows (``len(train_rows)`` when given).
    train_rows, evaluation_rows : (n,) int row indices into ``feature_set``. Their image sha256s are
        recorded (``training.sha256``, ``evaluation.sha256``), so :func:`~tlpipe.pipeline.heads.evaluate.evaluate_head`
        can score the same hold-out later and refuse rows the head was trained on.
    evaluation_setup : how the evaluation rows were chosen, in words.
    """
    if train_rows is not None:
        rows = int(len(train_rows))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    joblib.dump(estimator, buffer)
    payload = buffer.getvalue()
    meta = feature_set.metadata
    labels = head_labels(estimator, class_names=list(feature_set.class_names))
    unknown = sorted(set(labels) - set(feature_set.class_names))
    if unknown:
        raise HeadError(f"the head predicts class(es) {unknown} that feature set {feature_set.key} does not have")
    classes = [list(feature_set.class_names).index(name) for name in labels]  # label indices, as before
    metadata = _jsonable(
        {
            "format_version": FORMAT_VERSION,
            "head": {
                "name": _head_name(estimator),
                "params": params,
                # the embedding's dimensions and those the head's PCA kept (all of them without PCA)
                "dimensions": {"input": int(feature_set.X.shape[1]), "kept": _kept_dimensions(estimator, feature_set)},
                # what predict() returns: class names (fitted on names) or the cache's label indices (older heads)
                "predicts": "label indices"
                if np.issubdtype(np.asarray(estimator.classes_).dtype, np.integer)
                else "class names",
            },
            "feature_set": {
                "key": feature_set.key,
                "embedding_dim": int(feature_set.X.shape[1]),
                "backbone": meta.get("backbone"),
                "model_sha256": meta.get("model_sha256"),
                "input_size": meta.get("input_size"),
                "pooling": meta.get("pooling"),
                "layer": meta.get("layer"),
                "resize": feature_set.resize,
                "model_key": meta.get("key") or feature_set.key,
                "resize_filter": feature_set.resize_filter,
                "colour": feature_set.colour,  # how embedded colour profiles were handled (srgb-icc | none | mixed)
            },
            "class_names": list(feature_set.class_names),
            "classes": classes,
            "labels": labels,
            "training": {
                "cache_id": feature_set.cache_id,
                "cache_path": str(cache_path) if cache_path else None,
                "rows": rows,
                "sha256": None if train_rows is None else sorted(feature_set.sha256[train_rows].tolist()),
            },
            "evaluation": None
            if evaluation_rows is None
            else {
                "rows": int(len(evaluation_rows)),
                "setup": evaluation_setup,
                "sha256": sorted(feature_set.sha256[evaluation_rows].tolist()),
            },
            "metrics": metrics,
            "versions": {
                "sklearn": sklearn.__version__,
                "numpy": np.__version__,
                "joblib": joblib.__version__,
                "python": platform.python_version(),
            },
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "joblib_sha256": hashlib.sha256(payload).hexdigest(),
        }
    )
    with writing(path, HeadError):  # the pair is one writer's, whatever name reaches it
        _atomic_write(path, lambda f: f.write(payload))
        _atomic_write(sidecar_path(path), lambda f: f.write(json.dumps(metadata, indent=2, sort_keys=True).encode()))
    return metadata


def read_metadata(path: str | os.PathLike) -> dict:
    """The sidecar of a saved head (no unpickling)."""
    sidecar = sidecar_path(path)
    try:
        metadata = json.loads(sidecar.read_text())
    except FileNotFoundError:
        raise HeadError(
            f"{sidecar} is missing: without it {path} cannot be verified, and loading a joblib file "
            f"runs code; pass trust=True (--trust) only if you trust where the file came from"
        ) from None
    except (OSError, ValueError) as exc:
        raise HeadError(f"cannot read {sidecar}: {exc}") from exc
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise HeadError(f"{sidecar} has head format version {version}; this tlpipe reads version {FORMAT_VERSION}")
    return metadata


def _check_expected(metadata: dict, key: str | None, dim: int | None, where: str) -> None:
    saved = metadata.get("feature_set", {})
    if key is not None and saved.get("key") != key:
        raise HeadError(
            f"{where} was trained on feature set {saved.get('key')!r}, not {key!r}: its embeddings "
            f"come from another backbone or setting; use the matching feature set or refit the head"
        )
    if dim is not None and saved.get("embedding_dim") != dim:
        raise HeadError(f"{where} expects {saved.get('embedding_dim')}-dimensional embeddings, these have {dim}")


def check_compatible(metadata: dict, feature_set: FeatureSet) -> None:
    """Raise :class:`HeadError` unless the head was trained on embeddings like ``feature_set``'s."""
    where = f"head {metadata.get('head', {}).get('name', '?')}"
    _check_expected(metadata, feature_set.key, int(feature_set.X.shape[1]), where)
    saved, current = metadata.get("feature_set", {}).get("model_sha256"), feature_set.metadata.get("model_sha256")
    if saved and current and saved != current:
        raise HeadError(
            f"{where} was trained on embeddings of backbone model {saved[:12]}, feature set "
            f"{feature_set.key} comes from model {current[:12]}: same key, different weights"
        )


def load_head(
    path: str | os.PathLike, *, trust: bool = False, expect_key: str | None = None, expect_dim: int | None = None
) -> tuple[Any, dict]:
    """Load a head saved by :func:`save_head`, verifying its sidecar hash before unpickling.

    Raises :class:`HeadError` when the sidecar is missing or the bytes do not match it (unless
    ``trust``; metadata is then ``{}`` if the sidecar is missing or unreadable) and when ``expect_key`` / ``expect_dim``
    differ from what the head was trained on.
    """
    path = Path(path)
    try:
        payload = path.read_bytes()
    except OSError as exc:
        raise HeadError(f"cannot read head {path}: {exc.strerror or exc}") from exc
    try:
        metadata = read_metadata(path)
    except HeadError:
        if not trust:
            raise
        metadata = {}
    if metadata:
        digest = hashlib.sha256(payload).hexdigest()
        if digest != metadata.get("joblib_sha256") and not trust:
            raise HeadError(
                f"{path} does not match its sidecar (sha256 {digest[:12]}, recorded "
                f"{str(metadata.get('joblib_sha256'))[:12]}): the file was changed or replaced; "
                f"refusing to unpickle it (trust=True / --trust overrides)"
            )
        _check_expected(metadata, expect_key, expect_dim, str(path))
    estimator = joblib.load(io.BytesIO(payload))
    if not hasattr(estimator, "predict_proba"):
        raise HeadError(f"{path} holds a {type(estimator).__name__}, not a classifier with predict_proba")
    n_features = getattr(estimator, "n_features_in_", None)
    if expect_dim is not None and n_features is not None and n_features != expect_dim:
        raise HeadError(f"{path} expects {n_features}-dimensional embeddings, these have {expect_dim}")
    return estimator, metadata
