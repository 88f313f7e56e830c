"""Backbones: the model registry, weights resolution, ONNX export and the model store, ONNX Runtime sessions.

Nothing here imports TensorFlow or ONNX Runtime until a function needs it.
"""

from .deps import MissingExtra, require
from .export import ExportPlan, VerificationError, export_backbone, obtain_backbone, plan_export
from .registry import POOLINGS, PREPROCESSING_MODES, REGISTRY, BackboneSpec, CutPoint, get_backbone, list_backbones
from .runtime import DEVICES, OnnxEmbedder, ProviderError, create_session
from .store import ModelStore, StoreEntry, StoreError
from .weights import WEIGHTS_DIR_ENV, ResolvedWeights, WeightsUnavailable, resolve_weights

__all__ = [
    "BackboneSpec",
    "CutPoint",
    "DEVICES",
    "ExportPlan",
    "MissingExtra",
    "ModelStore",
    "OnnxEmbedder",
    "POOLINGS",
    "PREPROCESSING_MODES",
    "ProviderError",
    "REGISTRY",
    "ResolvedWeights",
    "StoreEntry",
    "StoreError",
    "VerificationError",
    "WEIGHTS_DIR_ENV",
    "WeightsUnavailable",
    "create_session",
    "export_backbone",
    "get_backbone",
    "list_backbones",
    "obtain_backbone",
    "plan_export",
    "require",
    "resolve_weights",
]
