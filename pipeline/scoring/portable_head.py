"""A fitted head as plain array operations, and as an ONNX graph in the default (``ai.onnx``) domain.

:func:`head_ops` reads a head's fitted attributes into a short list of operations (:class:`Normalize`,
:class:`Standardize`, :class:`Project`, :class:`Dense`, :class:`Softmax`, :class:`Calibrated`) whose
arithmetic is scikit-learn's own, read from its source (scikit-learn 1.9):

- ``Normalizer``: rows divided by their l1 / l2 / max norm; a norm under ``10 * eps`` of float32 counts as 1
  (``preprocessing._data._handle_zeros_in_scale``).
- ``StandardScaler``: ``(x - mean_) / scale_``; ``PCA``: ``x @ components_.T - mean_ @ components_.T``, divided
  by ``sqrt(explained_variance_)`` (clipped at eps) when whitening (``decomposition._base._transform``).
- ``LogisticRegression``: binary ``[1 - expit(d), expit(d)]`` (``_predict_proba_lr``), multiclass
  ``softmax(decision)``; the binary form is written as the softmax of ``[0, d]``, the same numbers.
- ``MLPClassifier``: hidden layers ``act(x @ W + b)`` (relu, tanh, logistic, identity), then softmax, or
  for two classes the logistic output written as the softmax of ``[0, z]`` (``predict_proba``).
- ``CalibratedClassifierCV`` (``calibration.py``): the mean over ``calibrated_classifiers_`` of each fold's
  calibrated probabilities, computed from the fold estimator's ``decision_function``:
  ``temperature`` is ``softmax(beta_ * logits)`` with binary decisions as logits ``(-d, d)``
  (``_convert_to_logits``); ``sigmoid`` is ``expit(-(a_ * d + b_))`` per class, binary ``[1 - p, p]``,
  multiclass normalised by the row sum (uniform where every class gives 0).
- ``LinearSVC``: ``x @ coef_.T + intercept_``. ``SVC`` (and tlpipe's ``SVCHead``): the one-vs-one decision
  values ``K(x, SV) @ dual coefficients + intercept`` (libsvm's ``svm_predict_values``; the RBF kernel
  ``exp(-gamma * max(|x|^2 + |sv|^2 - 2 x.sv, 0))``), negated for two classes, and for more classes
  scikit-learn's one-vs-rest transform (``utils.multiclass._ovr_decision_function``): votes, plus the
  summed confidences mapped through ``s / (3 (|s| + 1))``.

Not reproduced (refused by name): isotonic calibration, an ``SVC(probability=True)`` as the last step
(libsvm's iterative pairwise coupling), kernels other than rbf and linear, one-vs-rest logistic
regression, and any other estimator. ``_convert_to_logits`` reads a *batch* of multiclass decision values
that all lie in [0, 1] and sum to 1 per row as probabilities (it takes their log); a linear SVM's decision
values practically never do, and this form does not copy that batch-dependent rule.

:func:`onnx_head` writes the operations as an ONNX model (``MatMul``/``Add``/``Sub``/``Div``/``Gemm``/
``Relu``/``Exp``/``ReduceSum``/``Softmax``/``Less``/``Where``...), input ``embeddings`` (N, D) float32,
output ``probabilities`` (N, C) float32; :func:`evaluate` runs them in numpy (float64), for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "Calibrated",
    "Dense",
    "Fold",
    "HeadOps",
    "MIN_OPSET",
    "Normalize",
    "PROBABILITIES",
    "Project",
    "Softmax",
    "Standardize",
    "SvcDecision",
    "UnsupportedHead",
    "evaluate",
    "head_ops",
    "onnx_head",
    "uses_kernel",
]

PROBABILITIES = "probabilities"
MIN_OPSET = 13  # ReduceSum takes its axes as an input from opset 13
_ACTIVATIONS = ("identity", "relu", "tanh", "logistic")


class UnsupportedHead(ValueError):
    """A head (or one of its steps) has no exact form in plain array operations here."""


# -- the operations ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Normalize:
    """Rows divided by their ``norm`` (l1 | l2 | max); rows whose norm is below ``threshold`` are left as they are."""

    norm: str
    threshold: float = 10 * float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class Standardize:
    """``(x - mean) / scale``; either may be None (not applied)."""

    mean: np.ndarray | None
    scale: np.ndarray | None


@dataclass(frozen=True)
class Project:
    """``(x @ matrix - offset) / scale`` (PCA: matrix = components_.T, offset = mean_ @ components_.T)."""

    matrix: np.ndarray
    offset: np.ndarray
    scale: np.ndarray | None = None


@dataclass(frozen=True)
class Dense:
    """``activation(x @ kernel + bias)``; kernel (D, K), bias (K,)."""

    kernel: np.ndarray
    bias: np.ndarray
    activation: str = "identity"


@dataclass(frozen=True)
class Softmax:
    """Softmax over the last axis: logits -> probabilities."""


@dataclass(frozen=True)
class SvcDecision:
    """scikit-learn's ``SVC.decision_function``: one-vs-one values from the kernel against the support vectors,
    ``(N, 1)`` for two classes (negated, as scikit-learn does), else the one-vs-rest transform (N, n_classes).

    ``coef`` (n_sv, n_pairs): column p holds, for the pair (i, j) of classes i < j, the class-i support vectors'
    ``dual_coef_[j - 1]`` and the class-j ones' ``dual_coef_[i]``."""

    support_vectors: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    n_classes: int
    kernel: str = "rbf"
    gamma: float = 1.0


@dataclass(frozen=True)
class Fold:
    """One calibrated classifier: ``scores`` (operations giving the decision values, (N, 1) for two classes, else
    (N, n_classes)) and its calibration: ``beta`` (temperature) or ``a``, ``b`` (sigmoid, one per column)."""

    scores: tuple
    method: str
    beta: float = 1.0
    a: np.ndarray | None = None
    b: np.ndarray | None = None


@dataclass(frozen=True)
class Calibrated:
    """The mean of the folds' calibrated probabilities (``CalibratedClassifierCV.predict_proba``)."""

    folds: tuple[Fold, ...]
    n_classes: int = 2


@dataclass
class HeadOps:
    """A head as operations: ``ops`` in order, from embeddings (N, ``dim``) to probabilities (N, ``n_classes``)."""

    ops: list = field(default_factory=list)
    dim: int = 0
    n_classes: int = 0
    names: list[str] = field(default_factory=list)  # the scikit-learn estimators, for records and messages


# -- from a fitted head -----------------------------------------------------------------------------------
def _f(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _refuse(what: str, why: str) -> UnsupportedHead:
    return UnsupportedHead(f"{what}: {why}")


def _transform_op(step, name: str):
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import Normalizer, StandardScaler

    kind = type(step)
    if isinstance(step, Normalizer) and kind.transform is Normalizer.transform:
        if step.norm not in ("l1", "l2", "max"):
            raise _refuse(f"step {name!r}", f"Normalizer(norm={step.norm!r}) is not l1, l2 or max")
        return Normalize(step.norm)
    if isinstance(step, StandardScaler) and kind.transform is StandardScaler.transform:
        mean = _f(step.mean_) if step.with_mean and step.mean_ is not None else None
        scale = _f(step.scale_) if step.with_std and step.scale_ is not None else None
        return Standardize(mean, scale)
    if isinstance(step, PCA) and kind.transform is PCA.transform:
        components = _f(step.components_)
        scale = None
        if step.whiten:
            scale = np.sqrt(_f(step.explained_variance_))
            scale[scale < np.finfo(scale.dtype).eps] = np.finfo(scale.dtype).eps
        return Project(components.T, _f(step.mean_).reshape(1, -1) @ components.T, scale)
    raise _refuse(
        f"step {name!r} ({kind.__name__})",
        "no plain-operator form here (Normalizer, StandardScaler and PCA have one)",
    )


def _binary_logits(kernel: np.ndarray, bias: np.ndarray) -> Dense:
    """A one-column decision d written as the two logits [0, d] (softmax([0, d]) = [1 - expit(d), expit(d)])."""
    return Dense(np.hstack([np.zeros_like(kernel), kernel]), np.concatenate([[0.0], bias]))


def _logistic_ops(clf, name: str) -> list:
    from sklearn.linear_model import LogisticRegression

    if type(clf).predict_proba is not LogisticRegression.predict_proba:
        raise _refuse(f"{name} ({type(clf).__name__})", "its predict_proba is not LogisticRegression's")
    coef, intercept = _f(clf.coef_), np.broadcast_to(_f(clf.intercept_), (len(clf.coef_),))
    if len(clf.classes_) == 2:
        return [_binary_logits(coef.T, intercept), Softmax()]
    multi = getattr(clf, "multi_class", "deprecated")
    if multi == "ovr" or (multi in ("auto", "deprecated", "warn") and getattr(clf, "solver", "") == "liblinear"):
        raise _refuse(f"{name} ({type(clf).__name__})", "one-vs-rest logistic regression (only multinomial)")
    return [Dense(coef.T, np.array(intercept)), Softmax()]


def _mlp_ops(clf, name: str) -> list:
    from sklearn.neural_network import MLPClassifier

    if type(clf).predict_proba is not MLPClassifier.predict_proba:
        raise _refuse(f"{name} ({type(clf).__name__})", "its predict_proba is not MLPClassifier's")
    if clf.activation not in _ACTIVATIONS:
        raise _refuse(f"{name} ({type(clf).__name__})", f"activation {clf.activation!r}")
    if clf.out_activation_ == "logistic" and clf.n_outputs_ != 1:
        raise _refuse(f"{name} ({type(clf).__name__})", "a multi-label MLP (one logistic output per label)")
    ops: list = []
    layers = list(zip(clf.coefs_, clf.intercepts_))
    for kernel, bias in layers[:-1]:
        ops.append(Dense(_f(kernel), _f(bias), clf.activation))
    kernel, bias = layers[-1]
    if clf.out_activation_ == "logistic":
        ops += [_binary_logits(_f(kernel), _f(bias)), Softmax()]
    elif clf.out_activation_ == "softmax":
        ops += [Dense(_f(kernel), _f(bias)), Softmax()]
    else:
        raise _refuse(f"{name} ({type(clf).__name__})", f"output activation {clf.out_activation_!r}")
    return ops


def _svc_decision(svc, name: str) -> SvcDecision:
    from sklearn.svm import SVC

    if type(svc).decision_function is not SVC.decision_function:
        raise _refuse(f"{name} ({type(svc).__name__})", "its decision_function is not SVC's")
    if svc.kernel not in ("rbf", "linear"):
        raise _refuse(f"{name} ({type(svc).__name__})", f"kernel {svc.kernel!r} (rbf and linear have a form here)")
    if getattr(svc, "_sparse", False):
        raise _refuse(f"{name} ({type(svc).__name__})", "fitted on sparse input")
    n_classes = len(svc.classes_)
    if n_classes > 2 and svc.decision_function_shape != "ovr":
        raise _refuse(f"{name} ({type(svc).__name__})", "decision_function_shape='ovo'")
    sv, dual, intercept = _f(svc.support_vectors_), _f(svc._dual_coef_), _f(svc._intercept_)
    starts = np.concatenate([[0], np.cumsum(svc._n_support)])
    pairs = [(i, j) for i in range(n_classes) for j in range(i + 1, n_classes)]
    coef = np.zeros((len(sv), len(pairs)))
    for p, (i, j) in enumerate(pairs):
        si, sj = slice(starts[i], starts[i + 1]), slice(starts[j], starts[j + 1])
        coef[si, p], coef[sj, p] = dual[j - 1, si], dual[i, sj]
    return SvcDecision(sv, coef, intercept, n_classes, svc.kernel, float(getattr(svc, "_gamma", 0.0)))


def _decision_ops(estimator, name: str) -> tuple:
    """Operations giving ``estimator.decision_function`` as (N, 1) for two classes, else (N, n_classes)."""
    from sklearn.svm import SVC, LinearSVC

    if isinstance(estimator, LinearSVC) and type(estimator).decision_function is LinearSVC.decision_function:
        return (Dense(_f(estimator.coef_).T, np.broadcast_to(_f(estimator.intercept_), (len(estimator.coef_),))),)
    if isinstance(estimator, SVC):
        return (_svc_decision(estimator, name),)
    if hasattr(estimator, "steps"):
        *prep, (last_name, last) = [(n, s) for n, s in estimator.steps if s not in (None, "passthrough")]
        return tuple(_transform_op(s, n) for n, s in prep) + _decision_ops(last, last_name)
    raise _refuse(
        f"{name} ({type(estimator).__name__})",
        "calibrated over a classifier without a plain-operator decision function (LinearSVC and SVC have one)",
    )


def _calibrated_ops(clf, name: str) -> list:
    from sklearn.calibration import CalibratedClassifierCV

    if type(clf).predict_proba is not CalibratedClassifierCV.predict_proba:
        raise _refuse(f"{name} ({type(clf).__name__})", "its predict_proba is not CalibratedClassifierCV's")
    n_classes = len(clf.classes_)
    folds = []
    for calibrated in clf.calibrated_classifiers_:
        base = calibrated.estimator
        if not hasattr(base, "decision_function"):
            raise _refuse(f"{name}", f"calibration over {type(base).__name__}.predict_proba (only decision functions)")
        if len(base.classes_) != n_classes:
            raise _refuse(f"{name}", "a calibration fold saw fewer classes than the head")
        # the fold's decision columns follow its classes_: the head's, or (temperature scaling on string labels,
        # which scikit-learn encodes before fitting the folds) their indices 0..n_classes-1
        encoded = calibrated.method == "temperature" and np.array_equal(np.asarray(base.classes_), np.arange(n_classes))
        if not (encoded or np.array_equal(np.asarray(base.classes_), np.asarray(clf.classes_))):
            raise _refuse(f"{name}", "a calibration fold orders its classes differently from the head")
        scores = _decision_ops(base, name)
        if calibrated.method == "temperature":
            folds.append(Fold(scores, "temperature", beta=float(np.asarray(calibrated.calibrators[0].beta_))))
        elif calibrated.method == "sigmoid":
            a = _f([c.a_ for c in calibrated.calibrators])
            b = _f([c.b_ for c in calibrated.calibrators])
            folds.append(Fold(scores, "sigmoid", a=a, b=b))
        else:
            raise _refuse(f"{name}", f"{calibrated.method} calibration (temperature and sigmoid have a plain form)")
    return [Calibrated(tuple(folds), n_classes)]


def head_ops(estimator) -> HeadOps:
    """The head ``estimator`` (a fitted Pipeline, or a bare classifier) as operations.

    Returns
    -------
    HeadOps
        From float32 embeddings (N, dim) to probabilities (N, n_classes) in ``estimator.classes_`` order.

    Raises
    ------
    UnsupportedHead
        A step or classifier without an exact form here, named with the reason.
    """
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import SVC

    steps = (
        [(n, s) for n, s in estimator.steps if s not in (None, "passthrough")]
        if hasattr(estimator, "steps")
        else [(type(estimator).__name__.lower(), estimator)]
    )
    *prep, (name, clf) = steps
    ops = [_transform_op(step, step_name) for step_name, step in prep]
    if isinstance(clf, CalibratedClassifierCV):
        ops += _calibrated_ops(clf, name)
    elif isinstance(clf, LogisticRegression):
        ops += _logistic_ops(clf, name)
    elif isinstance(clf, MLPClassifier):
        ops += _mlp_ops(clf, name)
    elif isinstance(clf, SVC):
        raise _refuse(
            f"{name} ({type(clf).__name__})",
            "an SVC's own predict_proba is libsvm's iterative pairwise coupling (tlpipe's rbf-svm head calibrates "
            "its decision values instead)",
        )
    else:
        raise _refuse(
            f"{name} ({type(clf).__name__})",
            "no plain-operator form here (LogisticRegression, MLPClassifier and CalibratedClassifierCV over "
            "LinearSVC / SVC have one)",
        )
    dim = int(getattr(estimator, "n_features_in_", 0) or getattr(clf, "n_features_in_", 0))
    return HeadOps(ops, dim, len(clf.classes_), [type(s).__name__ for _, s in steps])


def uses_kernel(ops: HeadOps) -> bool:
    """Whether the head evaluates a kernel against support vectors (the RBF / linear SVC)."""
    return any(
        isinstance(op, Calibrated) and any(isinstance(s, SvcDecision) for f in op.folds for s in f.scores)
        for op in ops.ops
    )


# -- numpy (float64): the reference the graphs are checked against in tests ------------------------------
def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _expit(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _apply(op, x: np.ndarray) -> np.ndarray:
    if isinstance(op, Normalize):
        a = np.abs(x)
        norm = {"l1": a.sum(1), "l2": np.sqrt((x * x).sum(1)), "max": a.max(1)}[op.norm][:, None]
        return x / np.where(norm < op.threshold, 1.0, norm)
    if isinstance(op, Standardize):
        x = x - op.mean if op.mean is not None else x
        return x / op.scale if op.scale is not None else x
    if isinstance(op, Project):
        x = x @ op.matrix - op.offset
        return x / op.scale if op.scale is not None else x
    if isinstance(op, Dense):
        z = x @ op.kernel + op.bias
        return {"identity": z, "relu": np.maximum(z, 0), "tanh": np.tanh(z), "logistic": _expit(z)}[op.activation]
    if isinstance(op, Softmax):
        return _softmax(x)
    if isinstance(op, SvcDecision):
        if op.kernel == "rbf":
            d2 = (x * x).sum(1)[:, None] + (op.support_vectors**2).sum(1)[None, :] - 2 * x @ op.support_vectors.T
            k = np.exp(-op.gamma * np.maximum(d2, 0))
        else:
            k = x @ op.support_vectors.T
        dec = k @ op.coef + op.intercept
        if op.n_classes == 2:
            return -dec
        first, second = _pair_matrices(op.n_classes)
        votes = (dec >= 0) @ first + (dec < 0) @ second
        s = dec @ (first - second)
        return votes + s / (3 * (np.abs(s) + 1))
    if isinstance(op, Calibrated):
        total = np.zeros((len(x), op.n_classes))
        for fold in op.folds:
            d = x
            for sub in fold.scores:
                d = _apply(sub, d)
            if fold.method == "temperature":
                logits = np.hstack([-d, d]) if d.shape[1] == 1 else d
                total = total + _softmax(fold.beta * logits)
            else:
                p = _expit(-(fold.a * d + fold.b))
                if d.shape[1] == 1:
                    total = total + np.hstack([1 - p, p])
                else:
                    s = p.sum(1, keepdims=True)
                    total = total + np.where(s == 0, 1.0 / p.shape[1], p / np.where(s == 0, 1, s))
        return total / len(op.folds)
    raise TypeError(op)


def evaluate(ops: HeadOps, x: np.ndarray) -> np.ndarray:
    """The operations on embeddings ``x`` (N, D), in float64: probabilities (N, n_classes)."""
    x = np.asarray(x, dtype=np.float64)
    for op in ops.ops:
        x = _apply(op, x)
    return x


def _pair_matrices(n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_pairs, n_classes) indicators of the first (i) and second (j) class of each pair i < j, in libsvm order."""
    pairs = [(i, j) for i in range(n_classes) for j in range(i + 1, n_classes)]
    first, second = np.zeros((len(pairs), n_classes)), np.zeros((len(pairs), n_classes))
    for p, (i, j) in enumerate(pairs):
        first[p, i], second[p, j] = 1.0, 1.0
    return first, second


# -- ONNX (default domain) --------------------------------------------------------------------------------
class _Graph:
    """Nodes and float32 initializers with unique names, under ``prefix``."""

    def __init__(self, opset: int, prefix: str = ""):
        self.opset, self.prefix = opset, prefix
        self.nodes: list = []
        self.initializers: list = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{self.prefix}{hint}_{self.count}"

    def const(self, value, hint: str = "const", dtype=np.float32) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str | None = None, output: str | None = None, **attrs) -> str:
        from onnx import helper

        out = output or self.name(hint or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out

    def reduce_sum(self, x: str) -> str:
        return self.node("ReduceSum", [x, self.const([1], "axes", np.int64)], "row_sum", keepdims=1)

    def reduce_max(self, x: str) -> str:
        if self.opset >= 18:  # axes moved from an attribute to an input in opset 18
            return self.node("ReduceMax", [x, self.const([1], "axes", np.int64)], "row_max", keepdims=1)
        return self.node("ReduceMax", [x], "row_max", axes=[1], keepdims=1)


def _emit(g: _Graph, op, x: str) -> str:
    if isinstance(op, Normalize):
        if op.norm == "l2":
            norm = g.node("Sqrt", [g.reduce_sum(g.node("Mul", [x, x], "square"))], "norm")
        elif op.norm == "l1":
            norm = g.reduce_sum(g.node("Abs", [x], "abs"))
        else:
            norm = g.reduce_max(g.node("Abs", [x], "abs"))
        small = g.node("Less", [norm, g.const(op.threshold, "threshold")], "small_norm")
        safe = g.node("Where", [small, g.const(1.0, "one"), norm], "safe_norm")
        return g.node("Div", [x, safe], "normalized")
    if isinstance(op, Standardize):
        if op.mean is not None:
            x = g.node("Sub", [x, g.const(op.mean, "mean")], "centred")
        if op.scale is not None:
            x = g.node("Div", [x, g.const(op.scale, "scale")], "scaled")
        return x
    if isinstance(op, Project):
        x = g.node("MatMul", [x, g.const(op.matrix, "components")], "projected")
        x = g.node("Sub", [x, g.const(op.offset, "offset")], "projected")
        return g.node("Div", [x, g.const(op.scale, "whiten")], "whitened") if op.scale is not None else x
    if isinstance(op, Dense):
        if op.activation == "identity":
            x = g.node("MatMul", [x, g.const(op.kernel, "kernel")], "matmul")
            return g.node("Add", [x, g.const(op.bias, "bias")], "logits")
        z = g.node("Gemm", [x, g.const(op.kernel, "kernel"), g.const(op.bias, "bias")], "gemm")
        if op.activation == "tanh":
            # tanh(z) = 2 sigmoid(2z) - 1: OpenCV 5.0's Tanh returns NaN above z = 44 (exp overflow), its Sigmoid
            # does not; the identity costs at most a float32 rounding.
            doubled = g.node("Sigmoid", [g.node("Mul", [z, g.const(2.0, "two")])], "sigmoid_2z")
            return g.node("Sub", [g.node("Mul", [doubled, g.const(2.0, "two")]), g.const(1.0, "one")], "hidden")
        return g.node({"relu": "Relu", "logistic": "Sigmoid"}[op.activation], [z], "hidden")
    if isinstance(op, Softmax):
        return g.node("Softmax", [x], "softmax", axis=1)
    if isinstance(op, SvcDecision):
        sv = op.support_vectors
        if op.kernel == "rbf":
            x_sq = g.reduce_sum(g.node("Mul", [x, x], "square"))
            cross = g.node("MatMul", [x, g.const(-2.0 * sv.T, "minus_2_sv_t")], "cross")
            d2 = g.node("Add", [g.node("Add", [cross, x_sq]), g.const((sv**2).sum(1)[None, :], "sv_sq")], "dist2")
            d2 = g.node("Relu", [d2], "dist2")  # max(., 0) against rounding, as SVCHead does
            k = g.node("Exp", [g.node("Mul", [d2, g.const(-op.gamma, "minus_gamma")])], "kernel")
        else:
            k = g.node("MatMul", [x, g.const(sv.T, "sv_t")], "kernel")
        dec = g.node("Add", [g.node("MatMul", [k, g.const(op.coef, "dual_coef")]), g.const(op.intercept, "rho")])
        if op.n_classes == 2:
            return g.node("Neg", [dec], "decision")
        first, second = _pair_matrices(op.n_classes)
        # votes: pair (i, j) votes i where dec >= 0, j where dec < 0: sum(first) + (dec < 0) @ (second - first)
        negative = g.node("Cast", [g.node("Less", [dec, g.const(0.0, "zero")])], "negative", to=1)
        votes = g.node(
            "Add", [g.node("MatMul", [negative, g.const(second - first, "vote_swap")]), g.const(first.sum(0))]
        )
        s = g.node("MatMul", [dec, g.const(first - second, "pair_sign")], "confidence_sum")
        denominator = g.node("Mul", [g.node("Add", [g.node("Abs", [s]), g.const(1.0)]), g.const(3.0)])
        return g.node("Add", [votes, g.node("Div", [s, denominator])], "ovr_decision")
    if isinstance(op, Calibrated):
        probabilities = []
        for fold in op.folds:
            d = x
            for sub in fold.scores:
                d = _emit(g, sub, d)
            binary = op.n_classes == 2
            if fold.method == "temperature":
                logits = g.node("Concat", [g.node("Neg", [d]), d], "logits", axis=1) if binary else d
                scaled = g.node("Mul", [logits, g.const(fold.beta, "beta")], "scaled_logits")
                probabilities.append(g.node("Softmax", [scaled], "fold_proba", axis=1))
                continue
            z = g.node("Add", [g.node("Mul", [d, g.const(fold.a, "sigmoid_a")]), g.const(fold.b, "sigmoid_b")])
            p = g.node("Sigmoid", [g.node("Neg", [z])], "sigmoid")
            if binary:
                complement = g.node("Sub", [g.const(1.0, "one"), p], "complement")
                probabilities.append(g.node("Concat", [complement, p], "fold_proba", axis=1))
            else:
                total = g.reduce_sum(p)
                zero = g.node("Equal", [total, g.const(0.0, "zero")], "all_zero")
                uniform = g.const(np.full((1, op.n_classes), 1.0 / op.n_classes), "uniform")
                probabilities.append(g.node("Where", [zero, uniform, g.node("Div", [p, total])], "fold_proba"))
        total = probabilities[0] if len(probabilities) == 1 else g.node("Sum", probabilities, "proba_sum")
        return g.node("Div", [total, g.const(float(len(probabilities)), "folds")], "mean_proba")
    raise TypeError(op)


def onnx_head(ops: HeadOps, opset: int, input_name: str = "embeddings", output_name: str = PROBABILITIES):
    """The operations as an ONNX model in the default domain only.

    Parameters
    ----------
    ops : HeadOps
        From :func:`head_ops`.
    opset : int
        The ``ai.onnx`` opset to declare (the backbone's); at least :data:`MIN_OPSET`.
    input_name, output_name : str
        The graph's input, float32 (N, ops.dim), and output, float32 (N, ops.n_classes).

    Returns
    -------
    onnx.ModelProto

    Raises
    ------
    UnsupportedHead
        ``opset`` is below :data:`MIN_OPSET`.
    """
    from onnx import TensorProto, helper

    if opset < MIN_OPSET:
        raise UnsupportedHead(f"ai.onnx opset {opset}: the plain-operator head needs opset {MIN_OPSET} or later")
    g = _Graph(opset)
    x = input_name
    for op in ops.ops:
        x = _emit(g, op, x)
    g.nodes.append(helper.make_node("Identity", [x], [output_name], name=g.name("Identity")))
    graph = helper.make_graph(
        g.nodes,
        "tlpipe_head",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", ops.dim or None])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", ops.n_classes])],
        g.initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tlpipe")
