"""ONNX model metadata, the one home for it: tlpipe writes its record as flat ``tlpipe.*`` string properties
plus the whole record as JSON under ``tlpipe``, and reads them back without building a session."""

from __future__ import annotations

import json
import os
from typing import Any

from tlpipe.errors import InputError

from .deps import require

__all__ = ["clear_metadata", "read_metadata", "record_of", "write_metadata"]


def write_metadata(onnx_model: Any, record: dict[str, Any] | None = None, **flat: Any) -> None:
    """Add tlpipe's metadata to an ``onnx.ModelProto`` (in place).

    Parameters
    ----------
    onnx_model : onnx.ModelProto
        The model.
    record : dict, optional
        Stored whole, as sorted JSON under the key ``tlpipe``.
    **flat
        Stored as ``tlpipe.<name>`` = ``str(value)`` (lists and dicts as JSON) for quick reading.
    """
    props: dict[str, str] = {}
    if record is not None:
        props["tlpipe"] = json.dumps(record, sort_keys=True)
    for name, value in flat.items():
        props[f"tlpipe.{name}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    for key, value in props.items():
        prop = onnx_model.metadata_props.add()
        prop.key, prop.value = key, value


def clear_metadata(onnx_model: Any) -> None:
    """Remove every metadata property of an ``onnx.ModelProto`` (in place)."""
    del onnx_model.metadata_props[:]


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata properties of an ONNX file (weights are not loaded).

    Parameters
    ----------
    path : path
        An .onnx file.

    Returns
    -------
    dict of str to str
        Every property, e.g. ``tlpipe.kind``.

    Raises
    ------
    ValueError
        The file is not an ONNX model.
    tlpipe.backbones.deps.MissingExtra
        The ``onnx`` package is not installed.
    """
    onnx = require("onnx")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise InputError(f"{path} is not an ONNX model ({exc})") from None
    return {p.key: p.value for p in model.metadata_props}


def record_of(metadata: dict[str, str]) -> dict[str, Any]:
    """The JSON record under ``tlpipe`` in ``metadata`` (empty when absent or unreadable)."""
    try:
        value = json.loads(metadata.get("tlpipe", "{}"))
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
