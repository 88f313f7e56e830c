"""Fuse a saved head with its backbone into one ONNX classifier: uint8 images in, class probabilities out.

The head is written as an ONNX graph at the backbone's ``ai.onnx`` opset and merged after the backbone
(``embeddings`` -> head input); the result has one input, ``images`` (N, S, S, 3) uint8 RGB, and two
outputs, ``probabilities`` (N, C) float32 and ``label`` (N,) int64, an index into the class names stored
in the model's metadata (``tlpipe.class_names``). Before anything is written the fused model is run on
real images and compared with the Python path (backbone session, then ``predict_proba``).

Two ways to write the head (``operators``):

- ``"standard"`` (the default): the default ONNX domain only (``MatMul``, ``Add``, ``Gemm``, ``Relu``,
  ``Exp``, ``Softmax``...; :mod:`tlpipe.pipeline.scoring.portable_head`), so any ONNX runtime runs the classifier:
  ONNX Runtime, OpenCV's DNN module, TensorRT, the ONNX -> TFLite / Core ML converters.
- ``"ml"``: skl2onnx's conversion, in the ``ai.onnx.ml`` domain (``Scaler``, ``LinearClassifier``,
  ``SVMClassifier``...), which ONNX Runtime runs and most other runtimes refuse; for heads the standard form
  does not cover (any estimator skl2onnx converts). Two skl2onnx gaps are filled here:

  - ``CalibratedClassifierCV(method="temperature")`` (the ``svm`` and ``rbf-svm`` heads) has no skl2onnx
    converter: each fold's SVM decision values (skl2onnx ``raw_scores``; binary as ``(-d, d)``, as
    scikit-learn's ``_convert_to_logits`` does) are scaled by the fold's inverse temperature, softmaxed,
    and averaged over folds.
  - skl2onnx's ``Normalizer`` divides every row by its norm; scikit-learn leaves rows whose norm is below
    ``10 * eps`` of the input dtype unchanged. Embeddings of small magnitude hit that branch, so the
    converter here reproduces it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from tlpipe.backbones.atomic import atomic_write
from tlpipe.backbones.deps import distribution_version, require
from tlpipe.backbones.export import INPUT_NAME, OUTPUT_NAME, verification_images
from tlpipe.backbones.onnx_metadata import clear_metadata, write_metadata
from tlpipe.backbones.store import ModelStore
from tlpipe.errors import InputError, TlpipeError
from tlpipe.features.colour import COLOUR
from tlpipe.features.fastdecode import recorded_resize_filter
from tlpipe.features.images import load_image
from tlpipe.pipeline.heads.persistence import load_head
from tlpipe.pipeline.scoring.score import PROBABILITIES, head_backbone

__all__ = [
    "FORMAT",
    "FuseError",
    "HEAD_PREFIX",
    "LABEL",
    "MAX_ABS_DIFF",
    "ML_DOMAIN",
    "compare",
    "convert_head",
    "export_model",
    "fuse",
    "ml_opset_for",
    "raise_default_opset",
]

FORMAT = 1
LABEL = "label"
ML_DOMAIN = "ai.onnx.ml"
MAX_ABS_DIFF = 1e-4
HEAD_PREFIX = "head/"
# How the head is written: the default ONNX domain only, or skl2onnx's ai.onnx.ml operators.
OPERATORS = ("standard", "ml")


class FuseError(TlpipeError, RuntimeError):
    """The head cannot be fused with its backbone, or the fused model does not reproduce the Python path."""


# -- skl2onnx converters for what its registry gets wrong or lacks ---------------------------------------
def _convert_normalizer(scope, operator, container) -> None:
    """Normalizer as scikit-learn computes it: rows with a norm under ``10 * eps`` are left as they are."""
    from onnx import TensorProto

    op = operator.raw_operator
    x, out = operator.inputs[0].full_name, operator.outputs[0].full_name
    if op.norm not in ("l1", "l2", "max"):
        raise FuseError(f"Normalizer(norm={op.norm!r}) is not supported")
    name = scope.get_unique_variable_name
    source = x
    if op.norm == "max":
        source = name("abs")
        container.add_node("Abs", [x], [source], name=scope.get_unique_operator_name("Abs"))
    reduce_op = {"l1": "ReduceL1", "l2": "ReduceL2", "max": "ReduceMax"}[op.norm]
    norm, reduce_name = name("norm"), scope.get_unique_operator_name(reduce_op)
    if container.target_opset >= 18:  # axes moved from an attribute to an input in opset 18
        axes = name("axes")
        container.add_initializer(axes, TensorProto.INT64, [1], [1])
        container.add_node(reduce_op, [source, axes], [norm], keepdims=1, name=reduce_name)
    else:
        container.add_node(reduce_op, [source], [norm], axes=[1], keepdims=1, name=reduce_name)
    threshold, one, small, safe = name("threshold"), name("one"), name("small"), name("safe_norm")
    container.add_initializer(threshold, TensorProto.FLOAT, [], [10 * float(np.finfo(np.float32).eps)])
    container.add_initializer(one, TensorProto.FLOAT, [], [1.0])
    container.add_node("Less", [norm, threshold], [small], name=scope.get_unique_operator_name("Less"))
    container.add_node("Where", [small, one, norm], [safe], name=scope.get_unique_operator_name("Where"))
    container.add_node("Div", [x, safe], [out], name=scope.get_unique_operator_name("Div"))


def _convert_calibrated(scope, operator, container) -> None:
    """CalibratedClassifierCV; temperature scaling here, sigmoid and isotonic by skl2onnx's converter."""
    from onnx import TensorProto
    from skl2onnx._supported_operators import sklearn_operator_name_map
    from skl2onnx.common.data_types import FloatTensorType, Int64TensorType, StringTensorType
    from skl2onnx.operator_converters.calibrated_classifier_cv import convert_sklearn_calibrated_classifier_cv

    model = operator.raw_operator
    if model.method != "temperature":
        convert_sklearn_calibrated_classifier_cv(scope, operator, container)
        return
    classes = np.asarray(model.classes_)
    # Heads fitted on class names (fit-head, compare --save-best) have string classes; older heads label indices.
    strings = classes.dtype.kind in "UO"
    if not strings and not np.issubdtype(classes.dtype, np.integer):
        raise FuseError(
            f"CalibratedClassifierCV with {classes.dtype} classes: the heads use class names or integer label indices"
        )
    name = scope.get_unique_variable_name
    fold_probs = []
    for calibrated in model.calibrated_classifiers_:
        base = calibrated.estimator
        if len(base.classes_) != len(classes):
            raise FuseError("a calibration fold saw fewer classes than the head; its scores cannot be fused")
        if hasattr(base, "predict_proba") and not hasattr(base, "decision_function"):
            raise FuseError(
                f"temperature scaling over {type(base).__name__}.predict_proba is not supported "
                f"(only decision functions, as the svm heads use)"
            )
        sub = scope.declare_local_operator(sklearn_operator_name_map[type(base)], base)
        container.add_options(id(base), {"raw_scores": True})
        scope.add_options(id(base), {"raw_scores": True})
        sub.inputs = operator.inputs
        scores = scope.declare_local_variable("fold_scores", FloatTensorType())
        label_type = StringTensorType() if strings else Int64TensorType()
        sub.outputs.extend([scope.declare_local_variable("fold_label", label_type), scores])
        beta, scaled, proba = name("beta"), name("scaled_scores"), name("fold_proba")
        container.add_initializer(beta, TensorProto.FLOAT, [], [float(calibrated.calibrators[0].beta_)])
        container.add_node("Mul", [scores.full_name, beta], [scaled], name=scope.get_unique_operator_name("Mul"))
        container.add_node("Softmax", [scaled], [proba], axis=1, name=scope.get_unique_operator_name("Softmax"))
        fold_probs.append(proba)
    total, folds, index, class_values = name("proba_sum"), name("folds"), name("argmax"), name("classes")
    container.add_node("Sum", fold_probs, [total], name=scope.get_unique_operator_name("Sum"))
    container.add_initializer(folds, TensorProto.FLOAT, [], [float(len(fold_probs))])
    probabilities = operator.outputs[1].full_name
    container.add_node("Div", [total, folds], [probabilities], name=scope.get_unique_operator_name("Div"))
    container.add_node(
        "ArgMax", [probabilities], [index], axis=1, keepdims=0, name=scope.get_unique_operator_name("ArgMax")
    )
    if strings:
        container.add_initializer(class_values, TensorProto.STRING, [len(classes)], [str(c).encode() for c in classes])
    else:
        container.add_initializer(class_values, TensorProto.INT64, [len(classes)], classes.astype(np.int64).tolist())
    container.add_node(
        "Gather", [class_values, index], [operator.outputs[0].full_name], name=scope.get_unique_operator_name("Gather")
    )


def ml_opset_for(opset: int) -> int:
    """The newest ``ai.onnx.ml`` opset released together with ``ai.onnx`` opset ``opset``."""
    from onnx import helper

    versions = [row[3] for row in helper.VERSION_TABLE if row[2] == opset]
    if not versions:
        raise FuseError(f"unknown ai.onnx opset {opset}")
    return max(versions)


def _register_mlp_head() -> None:
    """skl2onnx finds converters by exact class: convert tlpipe's subclasses with their parent's converter —
    MLPHead (an MLPClassifier that also fits tiny data), LogisticRegressionCVHead (a LogisticRegressionCV
    whose ``score`` is accuracy) and SVCHead (an SVC whose RBF decision function runs on BLAS); all keep
    their parent's fitted attributes."""
    from skl2onnx import update_registered_converter
    from skl2onnx.operator_converters.linear_classifier import convert_sklearn_linear_classifier
    from skl2onnx.operator_converters.multilayer_perceptron import convert_sklearn_mlp_classifier
    from skl2onnx.operator_converters.support_vector_machines import convert_sklearn_svm_classifier
    from skl2onnx.shape_calculators.linear_classifier import calculate_linear_classifier_output_shapes
    from skl2onnx.shape_calculators.support_vector_machines import calculate_sklearn_svm_output_shapes

    from tlpipe.pipeline.heads.estimators import LogisticRegressionCVHead, MLPHead, SVCHead

    update_registered_converter(
        MLPHead,
        "TlpipeMLPHead",
        calculate_linear_classifier_output_shapes,
        convert_sklearn_mlp_classifier,
        options={"zipmap": [True, False, "columns"], "output_class_labels": [False, True], "nocl": [True, False]},
    )
    update_registered_converter(
        LogisticRegressionCVHead,
        "TlpipeLogisticRegressionCVHead",
        calculate_linear_classifier_output_shapes,
        convert_sklearn_linear_classifier,
        options={
            "zipmap": [True, False, "columns"],
            "nocl": [True, False],
            "output_class_labels": [False, True],
            "raw_scores": [True, False],
        },
    )
    update_registered_converter(
        SVCHead,
        "TlpipeSVCHead",
        calculate_sklearn_svm_output_shapes,
        convert_sklearn_svm_classifier,
        options={
            "zipmap": [True, False, "columns"],
            "nocl": [True, False],
            "output_class_labels": [False, True],
            "raw_scores": [True, False],
        },
    )


def convert_head(estimator, dim: int, opset: int, ml_opset: int, operators: str = "standard"):
    """The fitted head as an ONNX model: input ``embeddings`` (N, dim) float32, output ``probabilities``.

    ``operators="standard"``: the default ONNX domain only (:func:`tlpipe.pipeline.scoring.portable_head.onnx_head`);
    ``"ml"``: skl2onnx's conversion (``ai.onnx.ml`` operators, outputs label + probabilities) at opsets
    ``opset`` / ``ml_opset``.

    Raises
    ------
    FuseError
        The head has no form in the operators asked (named, with the reason).
    """
    if operators not in OPERATORS:
        raise InputError(f"operators must be one of {', '.join(OPERATORS)}, not {operators!r}")
    classifier = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    head = estimator.steps[-1][0] if hasattr(estimator, "steps") else type(estimator).__name__
    if operators == "standard":
        from tlpipe.pipeline.scoring.portable_head import UnsupportedHead, head_ops, onnx_head

        try:
            ops = head_ops(estimator)
            if ops.dim and ops.dim != dim:
                raise UnsupportedHead(f"it takes {ops.dim}-dimensional embeddings, the backbone gives {dim}")
            ops.dim = dim
            return onnx_head(ops, opset, input_name=OUTPUT_NAME, output_name=PROBABILITIES)
        except UnsupportedHead as exc:
            raise FuseError(
                f"head {head!r} ({type(classifier).__name__}) has no standard-operator form: {exc}; "
                f"--operators ml writes it with skl2onnx's ai.onnx.ml operators instead (ONNX Runtime runs "
                f"those; OpenCV DNN, TensorRT and the TFLite converters do not)"
            ) from exc
    require("skl2onnx")
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.preprocessing import Normalizer

    _register_mlp_head()
    try:
        with warnings.catch_warnings():  # skl2onnx's SVC converter reads SVC.probA_, deprecated in scikit-learn 1.9
            warnings.filterwarnings("ignore", message="Attribute `prob[AB]_` was deprecated", category=FutureWarning)
            return convert_sklearn(
                estimator,
                initial_types=[(OUTPUT_NAME, FloatTensorType([None, dim]))],
                target_opset={"": opset, ML_DOMAIN: ml_opset},
                options={id(classifier): {"zipmap": False}},
                custom_conversion_functions={
                    CalibratedClassifierCV: _convert_calibrated,
                    Normalizer: _convert_normalizer,
                },
            )
    except FuseError:
        raise
    except Exception as exc:  # skl2onnx raises many types for models it cannot convert
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FuseError(f"skl2onnx cannot convert head {head!r} ({type(classifier).__name__}): {reason}") from exc


def raise_default_opset(model, opset: int):
    """``model`` declaring ``ai.onnx`` opset ``opset``; skl2onnx declares the lowest opset its nodes need.

    Where no node's operator changed between the two versions, only the declaration changes (exact);
    otherwise onnx's version converter rewrites the nodes.
    """
    from onnx import defs, version_converter

    current = next(imp for imp in model.opset_import if imp.domain in ("", "ai.onnx"))
    if current.version == opset:
        return model
    if current.version > opset:
        raise FuseError(f"the head needs ai.onnx opset {current.version}, the backbone has {opset}")
    since = lambda op, version: defs.get_schema(op, version).since_version  # noqa: E731
    unchanged = all(
        since(n.op_type, current.version) == since(n.op_type, opset)
        for n in model.graph.node
        if n.domain in ("", "ai.onnx")
    )
    if not unchanged:
        return version_converter.convert_version(model, opset)
    current.version = opset
    return model


def fuse(backbone, head, n_classes: int):
    """One model: the backbone, then the head (prefixed ``head/``) on its ``embeddings``; outputs
    ``probabilities`` (N, n_classes) and ``label`` (N,), the argmax. Metadata of both is dropped."""
    from onnx import TensorProto, compose, helper

    if any(node.domain == ML_DOMAIN for node in backbone.graph.node):
        raise FuseError(f"the backbone uses {ML_DOMAIN} operators; fusing expects a plain ai.onnx backbone")
    if PROBABILITIES not in [o.name for o in head.graph.output]:
        raise FuseError(f"the converted head has no {PROBABILITIES!r} output")
    for model in (backbone, head):
        clear_metadata(model)
    del head.graph.value_info[:]  # skl2onnx's intermediate shape guesses (raw scores are (N, 2) for binary)
    head.ir_version = backbone.ir_version
    head = raise_default_opset(head, next(i.version for i in backbone.opset_import if i.domain in ("", "ai.onnx")))
    head_ml = {i.domain: i.version for i in head.opset_import}.get(ML_DOMAIN)
    for imp in backbone.opset_import:
        if imp.domain == ML_DOMAIN and head_ml is not None:
            imp.version = head_ml  # declared by tf2onnx but unused (checked above): align it with the head's
    merged = compose.merge_models(
        backbone,
        head,
        io_map=[(OUTPUT_NAME, head.graph.input[0].name)],
        outputs=[HEAD_PREFIX + PROBABILITIES],
        prefix2=HEAD_PREFIX,
    )
    graph = merged.graph
    graph.node.append(helper.make_node("Identity", [HEAD_PREFIX + PROBABILITIES], [PROBABILITIES], name=PROBABILITIES))
    graph.node.append(helper.make_node("ArgMax", [PROBABILITIES], [LABEL], axis=1, keepdims=0, name=LABEL))
    batch = graph.input[0].type.tensor_type.shape.dim[0].dim_param or None
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, [batch, n_classes]),
            helper.make_tensor_value_info(LABEL, TensorProto.INT64, [batch]),
        ]
    )
    graph.name = "tlpipe_classifier"
    used = {node.domain for node in graph.node} | {""}
    kept = [imp for imp in merged.opset_import if imp.domain in used or imp.domain == "ai.onnx"]
    del merged.opset_import[:]
    merged.opset_import.extend(kept)  # tf2onnx declares ai.onnx.ml without using it; a standard head uses none
    merged.producer_name, merged.producer_version = "tlpipe", distribution_version("tlpipe") or ""
    return merged


def compare(
    fused_proba: np.ndarray, fused_label: np.ndarray, reference: np.ndarray, tolerance: float = MAX_ABS_DIFF
) -> dict:
    """Parity figures of the fused model against the Python path.

    An argmax that differs only where the reference's two best classes are within ``tolerance`` of each
    other is a tie, not a mismatch (either answer is within the tolerance); such rows are counted apart.
    """
    diff = float(np.max(np.abs(fused_proba.astype(np.float64) - reference))) if reference.size else 0.0
    expected = reference.argmax(axis=1)
    top2 = np.sort(reference, axis=1)[:, -2:]
    near_tie = (top2[:, 1] - top2[:, 0]) <= tolerance
    differs = fused_label != expected
    return {
        "images": int(len(reference)),
        "max_abs_diff": diff,
        "tolerance": tolerance,
        "argmax_agree": int(np.sum(~differs)),
        "argmax_mismatch": int(np.sum(differs & ~near_tie)),
        "near_ties": int(np.sum(differs & near_tie)),
    }


def _verification_pixels(paths, size: int, resize: str, resize_filter: str) -> np.ndarray:
    if not paths:
        return verification_images(size)
    return np.stack([load_image(p, size, resize, resize_filter=resize_filter)[0] for p in paths])


@dataclass
class HeadToExport:
    """A saved head with what exporting it needs: its estimator and sidecar, its backbone's store entry, the
    pixel settings of its embeddings and its class names (in the head's column order)."""

    path: Path
    estimator: Any
    metadata: dict
    name: str
    entry: Any
    resize: str
    resize_filter: str
    labels: list[str]

    def pixels(self, paths: list[str | os.PathLike] | None) -> np.ndarray:
        """uint8 (N, S, S, 3): ``paths`` decoded as the head's embeddings were (default: crops of scikit-learn's
        sample photos)."""
        return _verification_pixels(paths, self.entry.input_size, self.resize, self.resize_filter)

    def reference(self, pixels: np.ndarray) -> np.ndarray:
        """The Python path on ``pixels``: the backbone's ONNX session, then ``predict_proba`` (N, C) float64."""
        from tlpipe.backbones.runtime import OnnxEmbedder

        embedder = OnnxEmbedder(self.entry.model_path, device="cpu")
        return np.concatenate(
            [self.estimator.predict_proba(embedder(pixels[i : i + 64])) for i in range(0, len(pixels), 64)]
        )

    def record(self) -> dict:
        """The fields every exported classifier records (class names, input, head, backbone)."""
        head_meta = self.metadata.get("head", {})
        entry = self.entry
        return {
            "format": FORMAT,
            "kind": "classifier",
            "class_names": self.labels,
            "input_size": entry.input_size,
            "resize_filter": self.resize_filter,
            "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "channels": "RGB"},
            "outputs": {
                PROBABILITIES: "float32 (N, C), columns in class_names order",
                LABEL: "int64 (N,), index into class_names",
            },
            "head": {
                "name": self.name,
                "params": head_meta.get("params"),
                "path": str(self.path.resolve()),
                "joblib_sha256": self.metadata.get("joblib_sha256"),
                "metrics": self.metadata.get("metrics"),
            },
            "backbone": {
                k: entry.metadata.get(k)
                for k in (
                    "key",
                    "backbone",
                    "model_sha256",
                    "input_size",
                    "embedding_dim",
                    "preprocessing",
                    "pooling",
                    "layer",
                )
            }
            | {"resize": self.resize, "resize_filter": self.resize_filter},
        }


def load_for_export(
    head_path: str | os.PathLike, *, trust: bool = False, store: ModelStore | str | os.PathLike | None = None
) -> HeadToExport:
    """The saved head ``head_path`` and its backbone entry (checked against the head's record).

    Raises
    ------
    FuseError
        The sidecar's class names do not match the head.
    tlpipe.pipeline.heads.persistence.HeadError, tlpipe.backbones.store.StoreError
        The head or its backbone cannot be used.
    """
    estimator: Any
    estimator, metadata = load_head(head_path, trust=trust)
    head_name = metadata.get("head", {}).get("name") or type(estimator).__name__
    entry = head_backbone(metadata, store, str(head_path))
    resize = metadata.get("feature_set", {}).get("resize") or "squash"  # part of the embeddings' identity
    resize_filter = recorded_resize_filter(metadata.get("feature_set", {}))  # so is the filter (antialias: before)
    labels = metadata.get("labels") or []
    n_classes = len(estimator.classes_)
    if len(labels) != n_classes:
        raise FuseError(f"{head_path}: its sidecar names {len(labels)} classes, the head predicts {n_classes}")
    return HeadToExport(Path(head_path), estimator, metadata, head_name, entry, resize, resize_filter, list(labels))


def _check_out(out: Path, example: str) -> None:
    if out.is_dir():
        raise FuseError(f"{out} is a folder; give the model file's path, e.g. {out / example}")
    if not out.parent.is_dir():
        raise FuseError(f"cannot write {out}: folder {out.parent} does not exist")


def export_model(
    head_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    trust: bool = False,
    store: ModelStore | str | os.PathLike | None = None,
    verify_images: list[str | os.PathLike] | None = None,
    operators: str = "standard",
) -> dict:
    """Fuse the saved head ``head_path`` with its backbone into the ONNX classifier ``out``.

    The backbone is the model-store entry named by the head's feature-set key. The fused model is
    checked on ``verify_images`` (default: 8 crops of scikit-learn's sample photos) against the backbone
    session + ``predict_proba``: the same argmax and probabilities within 1e-4, else :class:`FuseError`
    and nothing is written.

    Parameters
    ----------
    operators : str
        ``"standard"`` (default): the head in the default ONNX domain only, so ONNX Runtime, OpenCV DNN,
        TensorRT and the ONNX converters all run it; ``"ml"``: skl2onnx's ``ai.onnx.ml`` operators (ONNX
        Runtime only, for heads without a standard form).

    Returns
    -------
    dict
        The record stored in the model's metadata (``tlpipe``), with the verification figures.

    Raises
    ------
    FuseError
        The head has no form in ``operators``, or the fused model differs from the Python head.
    """
    if operators not in OPERATORS:
        raise InputError(f"operators must be one of {', '.join(OPERATORS)}, not {operators!r}")
    onnx, ort = require("onnx"), require("onnxruntime")
    import sklearn

    out = Path(out)
    _check_out(out, "classifier.onnx")
    head = load_for_export(head_path, trust=trust, store=store)
    entry, n_classes = head.entry, len(head.labels)
    backbone = onnx.load(str(entry.model_path))
    opset = next(imp.version for imp in backbone.opset_import if imp.domain in ("", "ai.onnx"))
    head_model = convert_head(head.estimator, entry.embedding_dim, opset, ml_opset_for(opset), operators)
    fused = fuse(backbone, head_model, n_classes)
    onnx.checker.check_model(fused)

    pixels = head.pixels(verify_images)
    reference = head.reference(pixels)
    try:
        session = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"])
        proba, label = session.run([PROBABILITIES, LABEL], {INPUT_NAME: pixels})
    except Exception as exc:  # onnxruntime's own exception types
        raise FuseError(f"ONNX Runtime cannot run the fused {head.name!r} head: {exc}") from exc
    figures = compare(proba, label, reference)
    if figures["argmax_mismatch"] or figures["max_abs_diff"] > MAX_ABS_DIFF:
        raise FuseError(f"the fused model differs from the Python head: {figures}; nothing was written")

    versions = {"onnx": onnx.__version__, "sklearn": sklearn.__version__}
    if operators == "ml":
        versions["skl2onnx"] = require("skl2onnx").__version__
    record = head.record() | {
        "colour": COLOUR,  # its reference pixels: embedded ICC profiles rendered to sRGB, as score decodes them
        "operators": operators,
        "domains": sorted({node.domain or "ai.onnx" for node in fused.graph.node}),
        "opset": {imp.domain or "ai.onnx": imp.version for imp in fused.opset_import},
        "verification": figures,
        "versions": versions,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_metadata(
        fused,
        record,
        kind="classifier",
        class_names=list(head.labels),
        input_size=entry.input_size,
        key=entry.key,
        head=head.name,
        resize=head.resize,
        resize_filter=head.resize_filter,
        operators=operators,
    )
    atomic_write(out, fused.SerializeToString())
    return record


FORMATS = ("onnx", "tflite")
VERIFY_IMAGES = 32


def export_classifier(
    head_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str | None = None,
    precision: str = "fp32",
    operators: str = "standard",
    images: list[str | os.PathLike] | None = None,
    trust: bool = False,
    store: ModelStore | str | os.PathLike | None = None,
) -> dict:
    """``tlpipe export-model``: the ONNX classifier (:func:`export_model`) or the TFLite one
    (:func:`tlpipe.pipeline.scoring.tflite.export_tflite`).

    Parameters
    ----------
    format : str, optional
        ``onnx`` | ``tflite``; default from ``out``'s extension (``.tflite``: tflite, else onnx).
    precision : str
        ``fp32`` | ``fp16`` | ``int8``: TFLite only (an ONNX classifier's precision is its backbone's: extract with
        ``--precision`` and fit the head on those embeddings).
    operators : str
        ``standard`` | ``ml``: ONNX only (see :func:`export_model`).
    images : list of path, optional
        Photos like the ones to classify: the model is verified on up to 32 of them (int8: calibrated on a sample,
        verified on others).

    Raises
    ------
    ValueError
        An option that does not fit the format (named).
    """
    suffix = Path(out).suffix.lower()
    fmt = format or ("tflite" if suffix == ".tflite" else "onnx")
    if fmt not in FORMATS:
        raise InputError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if suffix in (".onnx", ".tflite") and suffix != "." + fmt:
        raise InputError(f"--format {fmt} but --out {out} ends in {suffix}: name the file .{fmt}")
    if fmt == "onnx":
        if precision != "fp32":
            raise InputError(
                f"--precision {precision} is for --format tflite; an ONNX classifier has its backbone's precision: "
                f"extract with --precision {precision}, fit the head on that feature set, then export it"
            )
        return export_model(
            head_path,
            out,
            trust=trust,
            store=store,
            verify_images=list(images)[:VERIFY_IMAGES] if images else None,
            operators=operators,
        )
    if operators != "standard":
        raise InputError("--operators is for --format onnx (a TFLite classifier is built from Keras layers)")
    from tlpipe.pipeline.scoring.tflite import export_tflite

    return export_tflite(head_path, out, precision=precision, images=images, trust=trust, store=store)
