"""Classifier heads on cached embeddings: real scikit-learn pipelines, hyperparameter search, splits.

Every head is a :class:`sklearn.pipeline.Pipeline` whose last step is named after the head, with
underscores so that step names work as keyword parameters (``"logreg"``, ``"svm"``, ``"rbf_svm"``,
``"mlp"``; :func:`head_name` maps them back), so a fitted estimator says what it is; all of them have
``predict_proba`` and ``classes_``. Class labels are whatever ``y`` held at fit time: ``fit-head`` and
``compare --save-best`` fit on class names (:func:`name_labels`), so their heads' ``predict`` returns
names; cross-validation works on the cache's label indices (``FeatureSet.y``).

Small classes are never dropped silently: a class with fewer rows than the hold-out or the CV folds
need stays in training (every fold's training rows), with a warning that names it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from itertools import product
from time import perf_counter
from typing import Any

import numpy as np
from joblib import Parallel, delayed
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import accuracy_score, f1_score, log_loss
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.class_weight import compute_sample_weight

from tlpipe.errors import InputError
from tlpipe.features.cache import FeatureSet

__all__ = [
    "AUTO_PCA",
    "CALIBRATION_FOLDS",
    "FoldScore",
    "HEADS",
    "LOGREG_CS",
    "LOGREG_CV_FOLDS",
    "LOGREG_PATH_PATIENCE",
    "LOGREG_PATH_TOL",
    "LogisticRegressionCVHead",
    "MLPHead",
    "SVCHead",
    "SVC_GRAM_BYTES",
    "SVC_KERNEL_BLOCK",
    "add_views",
    "check_rows",
    "choose_logreg_c",
    "class_balance",
    "cross_validate",
    "cv_folds",
    "fit",
    "fit_head",
    "fit_logreg_head",
    "grid_points",
    "head_name",
    "make_head",
    "name_labels",
    "rbf_kernel_block",
    "resolve_pca",
    "search_space",
    "select_split",
    "step_name",
    "summarize",
    "used_params",
    "views_within",
]

HEADS = ("logreg", "svm", "rbf-svm", "mlp")
# Heads whose classifier is wrapped in CalibratedClassifierCV: their parameters live under ``estimator__``.
_CALIBRATED = ("svm", "rbf-svm")
# pca="auto": components kept before the RBF SVM, whose kernel evaluations cost O(dims) each; embeddings'
# spectra fall fast, so 256 components keep the class structure at a fraction of the cost.
AUTO_PCA = {"rbf-svm": 256}
# Folds of the calibration split inside the SVM heads (each fold fits one SVM on 2/3 of the rows).
CALIBRATION_FOLDS = 3
# Cost order, most expensive first, so parallel runs start the long jobs early.
_COST_ORDER = {"rbf-svm": 0, "mlp": 1, "svm": 2, "logreg": 3}  # per fold


def _check_name(name: str) -> None:
    if name not in HEADS:
        raise InputError(f"unknown head {name!r}; choose one of {', '.join(HEADS)}")


def step_name(name: str) -> str:
    """The pipeline step of head ``name``: hyphens become underscores (``rbf-svm`` -> ``rbf_svm``), so
    ``set_params(rbf_svm__estimator__C=...)`` works as a keyword argument."""
    return name.replace("-", "_")


class MLPHead(MLPClassifier):
    """:class:`~sklearn.neural_network.MLPClassifier` that also fits tiny data, and says what it held out.

    Early stopping holds out ``validation_fraction`` of the rows (stratified; ``ceil(fraction * rows)`` rows, as
    scikit-learn's split counts them); when that share would hold fewer rows than there are classes, leave
    fewer training rows than classes, or a class has a single row, it cannot be split, so this fit turns early
    stopping off (with a warning) and trains for ``max_iter`` epochs instead. The parameter itself is left as
    set (scikit-learn's rule: ``fit`` never changes parameters). ``validation_rows_``: the rows the fit held
    out for early stopping (0 when off); ``early_stopping_note_``: that, in words.
    """

    early_stopping: bool  # MLPClassifier's parameter, declared for the type checker

    def fit(self, X, y, sample_weight=None):
        import math

        early = self.early_stopping
        _, counts = np.unique(np.asarray(y), return_counts=True)
        n = int(counts.sum())
        held = math.ceil(self.validation_fraction * n) if early else 0
        if early and len(counts) > 1 and (held < len(counts) or n - held < len(counts) or counts.min() < 2):
            self.early_stopping_note_ = (
                f"mlp early stopping off: a {self.validation_fraction:g} validation share of {n} rows is {held} rows, "
                f"fewer than the {len(counts)} classes (or a class has one row); trained for max_iter epochs"
            )
            warnings.warn(
                f"mlp: early stopping off for this fit: a {self.validation_fraction:g} validation share "
                f"of {n} rows is {held} rows, fewer than the {len(counts)} classes (or a class has "
                f"one row)",
                UserWarning,
                stacklevel=2,
            )
            self.early_stopping, held = False, 0
        elif early:
            self.early_stopping_note_ = (
                f"mlp early stopping validates on {held} of the {n} training rows "
                f"(validation_fraction {self.validation_fraction:g})"
            )
        else:
            self.early_stopping_note_ = "mlp early stopping off (early_stopping=False)"
        self.validation_rows_ = held
        try:
            if sample_weight is None:  # keeps scikit-learn versions without MLP sample weights working
                return super().fit(X, y)
            return super().fit(X, y, sample_weight=sample_weight)
        finally:
            self.early_stopping = early


def rbf_kernel_block(A: np.ndarray, B: np.ndarray, gamma: float, B_sq: np.ndarray | None = None) -> np.ndarray:
    """``exp(-gamma * |a - b|^2)`` for every row pair: float64 (len(A), len(B)), the squared distances from
    one BLAS product (``|a|^2 + |b|^2 - 2 a.b``, clipped at 0 against rounding). ``B_sq``: ``|b|^2`` if known."""
    kernel = A @ B.T
    kernel *= -2.0
    kernel += np.einsum("ij,ij->i", A, A)[:, None]
    kernel += (np.einsum("ij,ij->i", B, B) if B_sq is None else B_sq)[None, :]
    np.maximum(kernel, 0.0, out=kernel)
    kernel *= -gamma
    return np.exp(kernel, out=kernel)


class SVCHead(SVC):
    """:class:`~sklearn.svm.SVC` whose RBF kernel values come from BLAS.

    libsvm evaluates the kernel one (row, row) pair at a time in scalar loops. Here, for the RBF kernel on
    dense arrays:

    - ``fit`` computes the Gram matrix with :func:`rbf_kernel_block` and gives it to libsvm as a precomputed
      kernel (the same optimisation problem, so the same solution), then stores the support vectors, the
      resolved gamma and the input shape as an RBF fit does; only while the Gram matrix stays under
      :data:`SVC_GRAM_BYTES` (otherwise libsvm's own kernel);
    - the decision function computes the (rows x support vectors) kernel blocks the same way (blocks of
      about :data:`SVC_KERNEL_BLOCK` bytes), then libsvm's one-vs-one sums (``svm_predict_values``: for
      classes i < j, the class-i support vectors weighted by ``dual_coef_[j - 1]``, the class-j ones by
      ``dual_coef_[i]``, plus the intercept).

    Measured on flowers5's PCA-256 embeddings (1,837 training rows, 689 predicted, one core): fit 0.17 ->
    0.07 CPU-s, decision function 0.157 -> 0.022 CPU-s; support vectors identical, dual coefficients and
    decision values equal to 1e-13. ``predict`` and every fitted attribute are SVC's, so saved heads load
    anywhere and the ONNX export converts it with skl2onnx's SVC converter; other kernels, sparse input
    and ``probability=True`` are libsvm's as usual.
    """

    kernel: str  # SVC's parameter, declared for the type checker

    def fit(self, X, y, sample_weight=None):
        if (
            self.kernel != "rbf"
            or not isinstance(X, np.ndarray)
            or X.ndim != 2
            or X.dtype.kind != "f"
            or self.probability not in (False, "deprecated")
            or 8 * len(X) ** 2 > SVC_GRAM_BYTES
            or not np.isfinite(X).all()
        ):
            return super().fit(X, y, sample_weight=sample_weight)
        X = np.ascontiguousarray(X, dtype=np.float64)
        if isinstance(self.gamma, str):  # as SVC resolves it
            variance = X.var() if self.gamma == "scale" else 1.0
            gamma = 1.0 / (X.shape[1] * variance) if variance != 0 else 1.0
        else:
            gamma = float(self.gamma)
        gram = rbf_kernel_block(X, X, gamma)
        self.kernel = "precomputed"
        try:
            super().fit(gram, y, sample_weight=sample_weight)
        finally:
            self.kernel = "rbf"
        self._gamma, self.shape_fit_, self.n_features_in_ = gamma, X.shape, X.shape[1]
        self.support_vectors_ = X[self.support_]
        return self

    def _dense_decision_function(self, X):
        if self.kernel != "rbf":
            return super()._dense_decision_function(X)
        X = np.ascontiguousarray(X, dtype=np.float64)
        sv = self.support_vectors_
        sv_sq = np.einsum("ij,ij->i", sv, sv)
        starts = np.concatenate([[0], np.cumsum(self._n_support)])
        k = len(self._n_support)
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        out = np.empty((len(X), len(pairs)))
        block = max(1, SVC_KERNEL_BLOCK // (8 * max(1, len(sv))))
        for lo in range(0, len(X), block):
            kernel = rbf_kernel_block(X[lo : lo + block], sv, self._gamma, sv_sq)
            for p, (i, j) in enumerate(pairs):
                si, sj = slice(starts[i], starts[i + 1]), slice(starts[j], starts[j + 1])
                out[lo : lo + block, p] = (
                    kernel[:, si] @ self._dual_coef_[j - 1, si]
                    + kernel[:, sj] @ self._dual_coef_[i, sj]
                    + self._intercept_[p]
                )
        return out


# Bytes of one block of (rows x support vectors) kernel values in SVCHead's decision function.
SVC_KERNEL_BLOCK = 32 * 2**20
# Largest Gram matrix SVCHead.fit computes (256 MiB: 5,792 rows); larger fits use libsvm's own kernel.
SVC_GRAM_BYTES = 256 * 2**20


# logreg without an explicit C picks it by an internal CV over this grid (LogisticRegressionCV: one
# warm-started regularisation path per fold, then a refit on all rows at the C with the best mean
# log-loss). The best C depends on rows per dimension and on how separable the classes are, so no single
# default suits both a 2-class set of 1,000 photos and a 10-class set of 10,000.
LOGREG_CS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 1.0)
LOGREG_CV_FOLDS = 3
# The settings scikit-learn 1.9 asks for to silence its deprecation warnings (the new behaviour), where they exist.
_LRCV_QUIET = {
    k: v
    for k, v in {"l1_ratios": (0.0,), "use_legacy_attributes": False}.items()
    if k in LogisticRegressionCV().get_params()
}


# The warm-started C path stops once the mean validation log-loss has not improved at this many Cs in a
# row (1: at the first C that is worse): log-loss is (near) unimodal in log C, and the least regularised fits, past the minimum, take the most
# lbfgs iterations (measured on flowers5: C = 0.1 and 1 took half the path's time, the minimum was 0.003).
LOGREG_PATH_PATIENCE = 1
# The path's fits only rank Cs by validation log-loss, which lbfgs's tolerance 1e-3 already gives to 4 decimals
# (measured on flowers5's 4,307 MobileNetV2 embeddings: the same C, mean log-loss within 2e-4 of tol 1e-4's,
# 1.8x less CPU); the refit of the chosen C uses the head's own ``tol``.
LOGREG_PATH_TOL = 1e-3
# C of the default logreg head when a class has fewer rows than the LOGREG_CV_FOLDS folds that choose C (the
# first labels of `tlpipe suggest`'s loop: 2 per class). Measured with MobileNetV2 1.0 embeddings (standardised),
# 30 random draws each, scored on every other photo. 2 labelled photos per class: the accuracy is the same for
# every C from 1e-4 to 1 (cats_vs_dogs 0.63, flowers5_128px 0.38), the log-loss lowest at the small end
# (cats_vs_dogs 0.74 at 1e-4, 2.0 at 1e-2; flowers5_128px 1.60, 1.66). Imbalanced (3-12 per class, one class
# 1-2): small Cs predict the majority class (the intercept is not penalised): accuracy at 1e-4 / 1e-3 / 1e-2 / 1
# cats_vs_dogs 0.50 / 0.51 / 0.60 / 0.68, flowers5_128px 0.28 / 0.40 / 0.44 / 0.44; log-loss lowest at 1e-2 on
# both (0.94, 1.51). 1e-2: the best log-loss where classes differ in size, the loop's usual state.
LOGREG_FIXED_C = 1e-2


class LogisticRegressionCVHead(LogisticRegressionCV):
    """:class:`~sklearn.linear_model.LogisticRegressionCV` that picks C by the mean validation log-loss of a
    warm-started path over ``Cs`` (increasing) on ``cv`` folds, stopping early, and whose ``score`` is
    mean accuracy.

    ``fit`` (for the l2 / lbfgs / log-loss setting :func:`make_head` uses; any other falls back to
    scikit-learn's own): for each C in increasing order, one :class:`LogisticRegression` per fold,
    warm-started from that fold's previous C, is scored by log-loss over *all* classes on its validation
    rows (a small class kept in training may be missing from a fold's validation rows); the path stops
    when the mean log-loss has not improved for :data:`LOGREG_PATH_PATIENCE` Cs in a row (path fits at
    tolerance :data:`LOGREG_PATH_TOL`). The C with the
    lowest mean log-loss is refitted on all rows, warm-started from the folds' mean solution. Fitted
    attributes as scikit-learn's (``C_``, ``Cs_`` = the whole grid, ``coef_``, ``intercept_``,
    ``classes_``, ``n_iter_``) plus ``scores_``: (folds, len(Cs_)) negative log-loss, NaN past the stop.
    ``score`` is accuracy, as for every scikit-learn classifier (``LogisticRegressionCV.score`` uses its
    ``scoring``, here log-loss, so ``cross_val_score(head, X, y)`` would report it as if it were accuracy).

    A class with fewer rows (with ``groups``: fewer images) than the folds cannot be validated in every fold, so
    C is not chosen: the head is fitted at the fixed :data:`LOGREG_FIXED_C` with a one-line warning that names
    the smallest class and says how many labels per class let CV choose C; ``fixed_c_reason_`` holds that line
    (None when C was chosen by CV) and ``scores_`` is then empty (0, len(Cs_)).
    """

    cv: Any  # scikit-learn's parameter (an int, a splitter or a list of folds), declared for the type checker

    def _fixed_c_reason(self, y, groups=None) -> str | None:
        """The one-line reason C cannot be chosen by CV on ``y`` (a class smaller than the folds), else None."""
        if isinstance(self.cv, int):
            folds = self.cv
        elif hasattr(self.cv, "get_n_splits"):
            folds = self.cv.get_n_splits()
        else:  # explicit (train, test) splits: they were made for these rows
            return None
        y = np.asarray(y)
        if groups is not None:  # an image and its augmented views count once
            pairs = np.unique(np.stack([y.astype(str), np.asarray(groups).astype(str)]), axis=1)
            labels, counts = np.unique(pairs[0], return_counts=True)
            kind = "labelled images"
        else:
            labels, counts = np.unique(y, return_counts=True)
            kind = "labelled rows"
        if not len(counts) or counts.min() >= folds:
            return None
        i = int(counts.argmin())
        kind = kind if counts[i] != 1 else kind[:-1]
        return (
            f"logreg: class {_class_name(labels[i], None)} has {int(counts[i])} {kind}, fewer than the {folds} folds "
            f"that choose C by cross-validation: fitted with the fixed C = {LOGREG_FIXED_C:g} "
            f"(label at least {folds} per class to choose C by CV)"
        )

    def _fit_fixed(self, X, y, sample_weight, reason: str):
        """Fit at :data:`LOGREG_FIXED_C` (see the class) and warn with ``reason``."""
        import numbers

        from sklearn.utils.validation import validate_data

        X, y = validate_data(self, X, y, accept_sparse="csr", dtype=[np.float64, np.float32], order="C")
        warnings.warn(reason, UserWarning, stacklevel=3)
        model = LogisticRegression(
            C=LOGREG_FIXED_C,
            tol=self.tol,
            max_iter=self.max_iter,
            class_weight=self.class_weight,
            random_state=self.random_state,
            fit_intercept=self.fit_intercept,
            intercept_scaling=self.intercept_scaling,
        ).fit(X, y, sample_weight=sample_weight)
        self.classes_, self.coef_, self.intercept_ = model.classes_, model.coef_, model.intercept_
        self.n_iter_ = np.asarray(model.n_iter_)
        Cs = (
            np.logspace(-4, 4, self.Cs)
            if isinstance(self.Cs, numbers.Integral)
            else np.sort(np.asarray(self.Cs, dtype=float))
        )
        self.C_, self.Cs_ = np.array([LOGREG_FIXED_C]), Cs
        self.scores_ = np.full((0, len(Cs)), np.nan)
        self.l1_ratio_ = np.array([0.0])
        self.fixed_c_reason_: str | None = reason
        return self

    def score(self, X, y, sample_weight=None):
        from sklearn.metrics import accuracy_score

        return accuracy_score(y, self.predict(X), sample_weight=sample_weight)

    def _own_path(self) -> bool:
        return (
            self.scoring == "neg_log_loss"
            and self.solver == "lbfgs"
            and self.refit
            and not self.dual
            and getattr(self, "penalty", "deprecated") in ("deprecated", "l2")
            and list(np.ravel(getattr(self, "l1_ratios", None) or [0.0])) in ([0.0], ["warn"])
        )

    def fit(self, X, y, sample_weight=None, groups=None, **params):
        """Fit (see the class). ``groups`` (one id per row; augmented views share their image's id, see
        :func:`add_views`): the internal folds that pick C keep each group on one side
        (``StratifiedGroupKFold``), so C is not chosen by how well views predict their own image."""
        reason = self._fixed_c_reason(y, groups) if self._own_path() else None
        if reason is not None:
            return self._fit_fixed(X, y, sample_weight, reason)
        self.fixed_c_reason_ = None
        if groups is not None and not isinstance(self.cv, list):
            from sklearn.model_selection import StratifiedGroupKFold

            saved_cv = self.cv
            n = saved_cv if isinstance(saved_cv, int) else saved_cv.get_n_splits()
            state = getattr(saved_cv, "random_state", None)
            self.cv = list(StratifiedGroupKFold(n, shuffle=True, random_state=state).split(X, y, groups))
            try:
                return self.fit(X, y, sample_weight=sample_weight, **params)
            finally:
                self.cv = saved_cv
        if not self._own_path():
            return super().fit(X, y, sample_weight=sample_weight, **params)
        import numbers

        from sklearn.base import clone
        from sklearn.model_selection import check_cv
        from sklearn.utils.multiclass import check_classification_targets
        from sklearn.utils.validation import _check_sample_weight, validate_data

        X, y = validate_data(self, X, y, accept_sparse="csr", dtype=[np.float64, np.float32], order="C")
        check_classification_targets(y)
        classes = np.unique(y)
        if len(classes) < 2:
            raise InputError(
                f"This solver needs samples of at least 2 classes in the data, but the data contains "
                f"only one class: {classes[0]!r}"
            )
        weights = None if sample_weight is None else _check_sample_weight(sample_weight, X)
        Cs = (
            np.logspace(-4, 4, self.Cs)
            if isinstance(self.Cs, numbers.Integral)
            else np.sort(np.asarray(self.Cs, dtype=float))
        )
        folds = list(check_cv(self.cv, y, classifier=True).split(X, y))
        base = LogisticRegression(
            C=float(Cs[0]),
            tol=self.tol,
            max_iter=self.max_iter,
            class_weight=self.class_weight,
            random_state=self.random_state,
            fit_intercept=self.fit_intercept,
            intercept_scaling=self.intercept_scaling,
            warm_start=True,
        )
        models = [clone(base).set_params(tol=max(self.tol, LOGREG_PATH_TOL)) for _ in folds]
        scores = np.full((len(folds), len(Cs)), np.nan)
        best, best_loss, stale, start = 0, np.inf, 0, None
        for j, C in enumerate(Cs):
            for k, (train, test) in enumerate(folds):
                model = models[k].set_params(C=float(C))
                model.fit(X[train], y[train], sample_weight=None if weights is None else weights[train])
                # log-loss over all classes (a class missing from this fold's training rows gets probability 0,
                # clipped as scikit-learn's log_loss clips), computed directly: no input validation per C and fold
                proba = np.zeros((len(test), len(classes)))
                proba[:, np.searchsorted(classes, model.classes_)] = model.predict_proba(X[test])
                proba /= proba.sum(axis=1, keepdims=True)  # float32 inputs: sums are 1 to float32 precision only
                p_true = np.clip(proba[np.arange(len(test)), np.searchsorted(classes, y[test])], 1e-15, 1.0)
                scores[k, j] = np.average(np.log(p_true), weights=None if weights is None else weights[test])
            loss = -scores[:, j].mean()
            if loss < best_loss:
                best, best_loss, stale = j, loss, 0
                if all(len(m.classes_) == len(classes) for m in models):  # same shapes: a warm start for the refit
                    start = (
                        np.mean([m.coef_ for m in models], axis=0),
                        np.mean([m.intercept_ for m in models], axis=0),
                    )
            else:
                stale += 1
                if stale >= LOGREG_PATH_PATIENCE:
                    break
        final = clone(base).set_params(C=float(Cs[best]))
        if start is not None:
            final.coef_, final.intercept_ = start[0].copy(), start[1].copy()
        final.fit(X, y, sample_weight=weights)
        self.classes_, self.coef_, self.intercept_ = final.classes_, final.coef_, final.intercept_
        self.n_iter_ = np.asarray(final.n_iter_)
        self.C_ = np.array([float(Cs[best])])
        self.Cs_, self.scores_ = Cs, scores
        self.l1_ratio_ = np.array([0.0])
        return self


def _classifier(name: str, seed: int, class_weight, params: dict):
    if name == "logreg":
        # lbfgs on standardised inputs converges in tens of iterations; multinomial loss, so
        # predict_proba is a proper softmax.
        common = {"max_iter": 1000, "random_state": seed, "class_weight": class_weight}
        if "C" in params:
            return LogisticRegression(**{**common, **params})
        # Log-loss (a proper scoring rule) rather than accuracy picks C: it is continuous, so 3 small
        # folds rank neighbouring Cs less noisily than by a few images more or less correctly classified.
        # (scikit-learn itself makes neg_log_loss LogisticRegressionCV's default in 1.11.) The head's
        # ``score()`` stays accuracy, as for every scikit-learn classifier (LogisticRegressionCVHead).
        folds = StratifiedKFold(LOGREG_CV_FOLDS, shuffle=True, random_state=seed)
        return LogisticRegressionCVHead(
            **{**common, **_LRCV_QUIET, "Cs": list(LOGREG_CS), "cv": folds, "scoring": "neg_log_loss", **params}
        )
    if name == "svm":
        # liblinear's LinearSVC instead of SVC(kernel="linear"): linear in the number of rows instead of
        # quadratic. Probabilities by temperature scaling of its decision values on held-out folds: one
        # parameter for all classes, so the calibration cannot change which class wins.
        # Dual coordinate descent: its cost per pass is the non-zeros, and the strong regularisation that
        # suits high-dimensional embeddings makes it converge in a few passes.
        svm = LinearSVC(
            **{"C": 0.001, "dual": True, "max_iter": 5000, "random_state": seed, "class_weight": class_weight, **params}
        )
        return CalibratedClassifierCV(svm, method="temperature", cv=CALIBRATION_FOLDS)
    if name == "rbf-svm":
        # CalibratedClassifierCV over SVC fits 3 SVMs on 2/3 of the rows (kernel SVMs cost ~n^2, so
        # ~1.3 full fits) where SVC(probability=True) fits one SVM plus an internal 5-fold Platt
        # scaling (~4.2 full fits).
        # SVCHead: SVC with its RBF kernel values from BLAS (fit 2.4x, predict 7x faster; the same solution).
        svc = SVCHead(
            **{
                "C": 10.0,
                "gamma": "scale",
                "cache_size": 1000,
                "random_state": seed,
                "class_weight": class_weight,
                **params,
            }
        )
        return CalibratedClassifierCV(svc, method="temperature", cv=CALIBRATION_FOLDS)
    if class_weight is not None:
        raise InputError(
            "MLPClassifier has no class_weight; fit_head and compare_heads apply it as sample weights (see fit)"
        )
    # Early stopping on a 10% validation split: training stops when validation accuracy stalls instead
    # of running max_iter epochs on a training loss that keeps falling (off on tiny data, see MLPHead).
    return MLPHead(
        **{
            "hidden_layer_sizes": (256,),
            "alpha": 1e-3,
            "early_stopping": True,
            "n_iter_no_change": 10,
            "max_iter": 300,
            "random_state": seed,
            **params,
        }
    )


def make_head(
    name: str, *, seed: int = 0, class_weight: dict | str | None = None, pca: int | float | None = None, **params
) -> Pipeline:
    """An unfitted head: preprocessing, optional ``PCA(pca)``, then the classifier.

    ``params`` go to the classifier (``C``, ``gamma``, ``alpha``, ``hidden_layer_sizes``...; for the SVM
    heads to the SVM inside the calibration wrapper). ``class_weight`` ("balanced" or a dict) is set on
    the classifier; the MLP has none, so for it use :func:`fit`, which turns it into sample weights.
    """
    _check_name(name)
    steps = []
    if name in ("rbf-svm", "mlp"):
        # Distance- and activation-based heads are sensitive to each image's overall activation level
        # (contrast, object size...); L2 normalisation puts every embedding on the unit sphere (cosine
        # geometry, the usual practice for CNN embeddings) before the per-dimension standardisation.
        # Linear heads learn a per-dimension weight and a bias, so they only need the standardisation.
        steps.append(("l2", Normalizer()))
    # The linear SVM scales without centring: liblinear's cost grows with the non-zeros, and centring
    # would turn the zeros of ReLU embeddings into dense values (its intercept absorbs the mean).
    # lbfgs (logreg), PCA and the MLP want centred inputs for conditioning.
    steps.append(("scale", StandardScaler(with_mean=name != "svm")))
    if pca is not None:
        # covariance_eigh: one D x D eigendecomposition, fast for the usual rows >> dims.
        steps.append(("pca", PCA(n_components=pca, svd_solver="covariance_eigh", random_state=seed)))
    steps.append((step_name(name), _classifier(name, seed, class_weight, params)))
    return Pipeline(steps)


def head_name(estimator: Pipeline) -> str:
    """The head a pipeline made by :func:`make_head` is (its last step's name, ``rbf_svm`` -> ``rbf-svm``)."""
    step = estimator.steps[-1][0]
    return step.replace("_", "-") if step.replace("_", "-") in HEADS else step


def _clf_prefix(name: str) -> str:
    """Where the classifier's own parameters live inside the head's last step."""
    return "estimator__" if name in _CALIBRATED else ""


_PCA_FORMS = (
    "auto, none, a number of components (an integer, at least 1) or a fraction of the variance to keep in (0, 1)"
)


def check_pca(
    pca: int | float | str | None, rows: int | None = None, dim: int | None = None
) -> int | float | str | None:
    """The one rule for ``pca`` (``--pca``): ``"auto"``, ``None`` / ``"none"``, an integer number of components
    (an int or a string of digits, at least 1 and, given ``rows`` and ``dim``, at most ``min(rows, dim)``), or a
    fraction of the variance to keep, strictly between 0 and 1. Nothing else: not ``1.0`` (scikit-learn's "all
    the variance", which ``int()`` would make 1 component), not ``2.7``, not 0.

    Parameters
    ----------
    pca : int, float, str or None
        As given (the CLI passes its string).
    rows, dim : int, optional
        Rows the PCA will be fitted on (the smallest training fold) and their dimensions.

    Returns
    -------
    int, float, "auto" or None
        The setting, parsed.

    Raises
    ------
    ValueError
        Anything else, with the two forms named; components above ``min(rows, dim)``, with the limit.
    """
    value: int | float | str | None = pca
    if isinstance(pca, str):
        text = pca.strip().lower()
        if text in ("auto", "none"):
            return None if text == "none" else "auto"
        if text.isdigit():
            value = int(text)
        else:
            try:
                value = float(text)
            except ValueError:
                value = pca
            if isinstance(value, float) and not ("." in text and "e" not in text and 0 < value < 1):
                value = pca  # only a decimal fraction: "1e-1", "1.0", "2.7", "nan" are neither form
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1:
        limit = min(rows, dim) if rows is not None and dim is not None else None
        if limit is not None and value > limit:
            raise InputError(
                f"pca {value} is more components than the data has: a number of components can be at most {limit} "
                f"here (min(rows, dimensions) = min({rows}, {dim}) of the rows it is fitted on), or give a fraction "
                f"of the variance to keep in (0, 1)"
            )
        return int(value)
    if isinstance(value, (float, np.floating)) and 0 < value < 1:
        return float(value)
    raise InputError(f"pca must be {_PCA_FORMS}, not {pca!r}")


def pca_components(estimator: Pipeline) -> int | None:
    """The dimensions a fitted head's PCA kept (None: the head has no PCA)."""
    step = dict(estimator.steps).get("pca")
    return int(step.n_components_) if step is not None and hasattr(step, "n_components_") else None


def kept_dimensions(name: str, pca: int | float | None, X: np.ndarray, seed: int = 0) -> int | None:
    """The dimensions ``PCA(pca)`` keeps on ``X`` after head ``name``'s preprocessing (None without PCA); a
    fraction is fitted to tell (the preprocessing only, no classifier)."""
    if pca is None:
        return None
    if not isinstance(pca, float):
        return int(pca)
    head = make_head(name, seed=seed, pca=pca)
    Pipeline(head.steps[:-1]).fit(X)
    return pca_components(head)


def resolve_pca(name: str, pca: int | float | str | None, shape: tuple[int, int]) -> int | float | None:
    """The ``pca`` setting for ``make_head``, checked by :func:`check_pca`: ``"auto"`` means :data:`AUTO_PCA`
    where the data has more dimensions than that and enough rows per CV fold, else none; anything else is kept as
    it is."""
    pca = check_pca(pca)
    if pca != "auto":
        if isinstance(pca, str):
            raise InputError(f"pca is a number of components, a variance share, None or 'auto', not {pca!r}")
        return pca
    k = AUTO_PCA.get(name)
    return k if k is not None and shape[1] > k and shape[0] >= 4 * k else None


def search_space(name: str) -> dict[str, list]:
    """The small grid that ``search=True`` explores for a head (classifier parameter -> values)."""
    _check_name(name)
    grids: dict[str, dict[str, list]] = {
        "logreg": {"C": [0.001, 0.01, 0.1, 1.0]},
        "svm": {"C": [0.0001, 0.001, 0.01]},
        # gamma stays "scale" (1 / (dims * variance)): an absolute gamma means something else after each
        # preprocessing, the data-scaled one does not.
        "rbf-svm": {"C": [1.0, 10.0, 100.0], "gamma": ["scale"]},
        "mlp": {"alpha": [1e-4, 1e-2], "hidden_layer_sizes": [(128,), (512,)]},
    }
    return grids[name]


def grid_points(name: str, grid: dict[str, list] | None = None) -> list[dict]:
    """Every combination of ``grid`` (default :func:`search_space`), in an order that suits warm starts
    (increasing C: each logistic regression starts from the more regularised solution before it)."""
    grid = search_space(name) if grid is None else grid
    keys = sorted(grid)
    return [dict(zip(keys, values)) for values in product(*(grid[k] for k in keys))]


def fit(
    estimator: Pipeline,
    X: np.ndarray,
    y: np.ndarray,
    class_weight: dict | str | None = None,
    groups: np.ndarray | None = None,
) -> Pipeline:
    """Fit a head; for the MLP, ``class_weight`` becomes sample weights (other heads carry their own).
    ``groups`` (image id per row, with augmented views): the logreg head's internal C folds keep groups whole."""
    name = head_name(estimator)
    if groups is not None and isinstance(estimator[-1], LogisticRegressionCV):
        return estimator.fit(X, y, **{f"{estimator.steps[-1][0]}__groups": groups})
    if name == "mlp" and class_weight is not None:
        return estimator.fit(
            X, y, **{f"{estimator.steps[-1][0]}__sample_weight": compute_sample_weight(class_weight, y)}
        )
    return estimator.fit(X, y)


@dataclass
class FoldScore:
    """One grid point of one head scored on one CV fold."""

    head: str
    params: dict
    fold: int
    accuracy: float
    macro_f1: float
    log_loss: float
    fit_s: float
    predict_s: float
    test_idx: np.ndarray
    pred: np.ndarray  # predicted labels of the rows test_idx
    proba: np.ndarray | None = None  # (len(test_idx), n_labels) float64 class probabilities, label order


def add_views(
    X: np.ndarray, y: np.ndarray, train: np.ndarray, views=None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The training rows ``X[train], y[train]`` plus the augmented views of exactly those images.

    Parameters
    ----------
    X : (N, D) float32 embeddings of the original images; y : (N,) labels; train : (T,) int positions in X.
    views : tlpipe.features.cache.Views or (X_views (M, D), owner (M,)), optional
        Augmented views; ``owner`` is each view's image as a position in ``X``. A view is added only when
        its owner is in ``train`` (it takes the owner's label): views of evaluation or hold-out images are
        never trained on, and evaluation rows stay the originals.

    Returns
    -------
    X_fit : (T + M', D), y_fit : (T + M',), the originals first; groups : (T + M',) int, the image (position in
    ``X``) of each row, for folds inside the fit that must keep an image and its views together (None
    without views).
    """
    if views is None:
        return X[train], y[train], None
    X_views, owner = (views.X, views.owner) if hasattr(views, "owner") else views
    take = np.isin(owner, train)
    return (
        np.concatenate([X[train], X_views[take]]),
        np.concatenate([y[train], y[owner[take]]]),
        np.concatenate([np.asarray(train), owner[take]]),
    )


def views_within(views, rows: np.ndarray):
    """Augmented views whose image is among ``rows`` (positions in the feature set), re-indexed to positions in
    ``X[rows]``: ``(X_views, owner)`` for :func:`add_views` on the subset; None stays None."""
    if views is None:
        return None
    X_views, owner = (views.X, views.owner) if hasattr(views, "owner") else views
    rows = np.asarray(rows)
    order = np.argsort(rows, kind="stable")
    at = np.minimum(np.searchsorted(rows[order], owner), max(len(rows) - 1, 0))
    inside = (rows[order][at] == owner) if len(rows) else np.zeros(len(owner), dtype=bool)
    return X_views[inside], order[at[inside]]


def _score_fold(X, y, train, test, name, points, fold, labels, seed, class_weight, pca, views=None) -> list[FoldScore]:
    """Fit the preprocessing once on this fold's training rows (and their views), then each grid point's classifier."""
    first = points[0] if name == "logreg" else {}  # a logreg grid point fixes C: plain LogisticRegression
    head = make_head(name, seed=seed, class_weight=None if name == "mlp" else class_weight, pca=pca, **first)
    prep, clf = head[:-1], head[-1]
    X_fit, y_fit, groups = add_views(X, y, train, views)
    started = perf_counter()
    X_train = prep.fit_transform(X_fit)
    prep_fit = perf_counter() - started
    started = perf_counter()
    X_test = prep.transform(X[test])
    prep_predict = perf_counter() - started
    if name == "logreg" and len(points) > 1:
        clf.set_params(warm_start=True)
    fit_params = (
        {"sample_weight": compute_sample_weight(class_weight, y_fit)}
        if (name == "mlp" and class_weight is not None)
        else {}
    )
    if groups is not None and isinstance(clf, LogisticRegressionCV):
        fit_params["groups"] = groups
    prefix = _clf_prefix(name)
    scored = np.unique(y[test])  # classes too small for the folds are never in a test fold
    scores = []
    for params in points:
        clf.set_params(**{prefix + k: v for k, v in params.items()})
        started = perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # MLPHead's tiny-data note, once per fold otherwise
            clf.fit(X_train, y_fit, **fit_params)
        fit_s = perf_counter() - started + prep_fit
        started = perf_counter()
        proba = np.zeros((len(test), len(labels)))
        proba[:, np.searchsorted(labels, clf.classes_)] = clf.predict_proba(X_test)
        proba /= proba.sum(axis=1, keepdims=True)  # float32 heads sum to 1 only to float32 precision
        predict_s = perf_counter() - started + prep_predict
        pred = labels[proba.argmax(axis=1)]
        scores.append(
            FoldScore(
                head=name,
                params=params,
                fold=fold,
                accuracy=accuracy_score(y[test], pred),
                macro_f1=f1_score(y[test], pred, average="macro", labels=scored, zero_division=0),
                log_loss=log_loss(y[test], proba, labels=labels),
                fit_s=fit_s,
                predict_s=predict_s,
                test_idx=test,
                pred=pred,
                proba=proba,
            )
        )
    return scores


def _class_name(label, class_names) -> str:
    """A label as people know it: its class name when known (``'cat' (label 0)``), else the label."""
    if class_names is not None and isinstance(label, (int, np.integer)) and 0 <= int(label) < len(class_names):
        return repr(class_names[int(label)])
    return repr(label.item() if isinstance(label, np.generic) else label)


def check_rows(
    y: np.ndarray, names: tuple[str, ...] | list[str], cv: int | None = None, class_names: list[str] | None = None
) -> None:
    """Raise ValueError unless every head can be trained on ``y`` (in a ``cv``-fold CV, if given).

    Needs two classes, enough rows per class for the SVMs' calibration folds and, for ``cv``, two classes
    with at least ``cv`` rows (smaller classes stay in every training fold, see :func:`cv_folds`).
    Errors name the class (``class_names[label]`` when given).
    """
    labels, counts = np.unique(y, return_counts=True)
    if len(labels) < 2:
        raise InputError(
            f"training needs at least two classes; the labelled rows have {len(labels)}"
            + (f" ({_class_name(labels[0], class_names)})" if len(labels) else "")
        )
    if cv is not None and np.sum(counts >= cv) < 2:
        raise InputError(
            f"{cv}-fold cross-validation needs at least two classes with {cv} rows each; rows per class: "
            + ", ".join(f"{_class_name(lab, class_names)} {c}" for lab, c in zip(labels, counts))
            + " (lower cv)"
        )
    # A class smaller than the folds is in every CV training fold, so it keeps all of its rows there.
    share = 1.0 if cv is None else (cv - 1) / cv
    kept = np.where(counts >= (cv or 0), np.floor(counts * share + 1e-9), counts)
    calibrated = [n for n in names if n in _CALIBRATED]
    if calibrated and kept.min() < CALIBRATION_FOLDS:
        i = int(kept.argmin())
        raise InputError(
            f"class {_class_name(labels[i], class_names)} has only {int(counts[i])} labelled rows: "
            f"{', '.join(calibrated)} calibrate(s) probabilities on {CALIBRATION_FOLDS} folds of the training "
            f"rows and need at least {CALIBRATION_FOLDS} of every class there (leave them out, or add images)"
        )


def cv_folds(
    y: np.ndarray,
    cv: int,
    seed: int = 0,
    class_names: list[str] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified ``cv``-fold splits (shuffled with ``seed``) as (train, test) row indices.

    A class with fewer than ``cv`` rows cannot appear in every test fold: its rows go into every training
    fold and are never scored, with a warning that names the class (never dropped silently).
    """
    labels, counts = np.unique(y, return_counts=True)
    small = labels[counts < cv]
    in_small = np.isin(y, small)
    regular = np.flatnonzero(~in_small)
    always = np.flatnonzero(in_small)
    if len(small):
        warnings.warn(
            "class(es) "
            + ", ".join(f"{_class_name(lab, class_names)} ({int(c)} rows)" for lab, c in zip(labels, counts) if c < cv)
            + f" have fewer rows than the {cv} folds: they stay in every training fold and are not scored",
            UserWarning,
            stacklevel=3,
        )
    folds = StratifiedKFold(cv, shuffle=True, random_state=seed).split(regular, y[regular])
    return [(np.sort(np.concatenate([regular[tr], always])), regular[te]) for tr, te in folds]


def fit_logreg_head(
    X: np.ndarray,
    y: np.ndarray,
    *,
    seed: int = 0,
    class_weight: dict | str | None = None,
    views=None,
    pca: int | float | None = None,
) -> Pipeline:
    """The default logreg head fitted on all of ``X, y`` (and ``views``, :func:`add_views`), exactly as ``fit-head``
    fits it: the preprocessing (with ``PCA(pca)`` when given), then C picked from :data:`LOGREG_CS` by its internal
    :data:`LOGREG_CV_FOLDS`-fold CV (:class:`LogisticRegressionCVHead`) and refitted on every row."""
    X_fit, y_fit, groups = add_views(X, y, np.arange(len(X)), views)
    head = make_head("logreg", seed=seed, class_weight=class_weight, pca=pca)
    with warnings.catch_warnings():
        # scikit-learn's note on a class smaller than the internal folds (cv_folds warns by name); the fixed-C
        # note of LogisticRegressionCVHead stays
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return fit(head, X_fit, y_fit, class_weight, groups)


def choose_logreg_c(
    X: np.ndarray, y: np.ndarray, *, seed: int = 0, class_weight: dict | str | None = None, views=None
) -> float:
    """The C the default logreg head picks on ``X, y`` (:func:`fit_logreg_head`)."""
    head = fit_logreg_head(X, y, seed=seed, class_weight=class_weight, views=views)
    return float(np.ravel(head[-1].C_)[0])


def cross_validate(
    X: np.ndarray,
    y: np.ndarray,
    names: tuple[str, ...] | list[str],
    *,
    cv: int = 5,
    seed: int = 0,
    search: bool = False,
    class_weight: dict | str | None = None,
    n_jobs: int | None = None,
    pca: int | float | str | None = "auto",
    class_names: list[str] | None = None,
    views=None,
    fitted: dict | None = None,
) -> list[FoldScore]:
    """Score heads with stratified ``cv``-fold CV (shuffled with ``seed``), in parallel over (head, fold).

    ``views`` (augmented views of the rows of ``X``, :func:`add_views`): each fold trains on its training
    images and their views, and is scored on its test images' originals only; folds are made over the
    images, so an image and its views are always on the same side.

    ``search=True`` scores every point of each head's :func:`search_space`, otherwise the defaults only.
    Within a fold the preprocessing is fitted once and shared by all grid points (it does not depend on
    them); logistic regression warm-starts along its C path. ``pca`` as in :func:`resolve_pca`;
    ``n_jobs=None`` uses every core. Classes smaller than ``cv`` stay in training (:func:`cv_folds`);
    ``class_names`` name classes in warnings and errors.

    The default logreg head (no ``search``) picks C by an internal CV (:func:`fit_logreg_head`). Here C is
    picked **once**, on all of ``X, y``, by fitting the head ``fit-head`` would save, and every fold
    is then scored at that C (its scores carry ``params={"C": C}``): so CV measures the very head
    ``fit-head`` / ``compare --save-best`` build, at about a fifth of the cost of repeating the search
    in every fold (nested CV). The price: the rows of each test fold took part in choosing C, so the
    logreg CV figures are slightly optimistic, like ``GridSearchCV.best_score_`` over 8 values of one
    parameter (far less than one standard error on the data sets measured); the held-out score of
    ``compare`` is not affected (C never sees the held-out rows). ``fitted`` (a dict, optional) receives that
    head, fitted on all of ``X, y`` (on class names when ``class_names`` are given), under ``"logreg"``.
    """
    for name in names:
        _check_name(name)
    check_rows(y, names, cv, class_names)
    labels = np.unique(y)
    folds = cv_folds(y, cv, seed, class_names)
    check_pca(pca, min(len(train) for train, _ in folds), X.shape[1])  # the smallest fold's PCA must fit
    points = {name: grid_points(name) if search else [{}] for name in names}
    late = "logreg" in names and not search  # its folds are scored once C is chosen, in one job
    jobs = sorted(
        ((name, i) for name in names if not (late and name == "logreg") for i in range(cv)),
        key=lambda job: _COST_ORDER[job[0]],
    )
    calls = (
        [
            delayed(_score_logreg_folds)(
                X, y, folds, labels, seed, class_weight, resolve_pca("logreg", pca, X.shape), views, class_names
            )
        ]
        if late
        else []
    )
    calls += [
        delayed(_score_fold)(
            X, y, *folds[i], name, points[name], i, labels, seed, class_weight, resolve_pca(name, pca, X.shape), views
        )
        for name, i in jobs
    ]
    # The logreg job (C, then its folds: the longest job) goes first, so no job waits for C to be chosen.
    results = Parallel(n_jobs=-1 if n_jobs is None else n_jobs)(calls)
    if late:
        head, logreg_scores = results[0]
        results[0] = logreg_scores
        if fitted is not None:
            fitted["logreg"] = head
    return [score for scores in results for score in scores]


def _score_logreg_folds(
    X, y, folds, labels, seed, class_weight, pca, views, class_names
) -> tuple[Pipeline, list[FoldScore]]:
    """The default logreg head's CV: the head fitted on all of ``X, y`` (:func:`fit_logreg_head`; on class
    names when known, as ``fit-head`` fits it) gives C, then every fold is scored at that C
    (``params={"C": C}``). Returns the head and the fold scores."""
    names = name_labels(y, class_names) if class_names is not None else y
    head = fit_logreg_head(X, names, seed=seed, class_weight=class_weight, views=views, pca=pca)  # the folds' pca
    points = [{"C": float(np.ravel(head[-1].C_)[0])}]
    # Each fold's fit starts from zero: a start from the all-rows solution would carry the test fold's rows
    # into it wherever lbfgs stops short of the optimum (measured: half the log-loss at C = 1 on cats_vs_dogs).
    return head, [
        score
        for i, (train, test) in enumerate(folds)
        for score in _score_fold(X, y, train, test, "logreg", points, i, labels, seed, class_weight, pca, views)
    ]


def summarize(scores: list[FoldScore]) -> list[dict]:
    """Mean and standard deviation over folds for each (head, grid point), best first per head."""
    groups: dict[tuple, list[FoldScore]] = {}
    for s in scores:
        groups.setdefault((s.head, repr(sorted(s.params.items()))), []).append(s)
    rows = []
    for group in groups.values():
        row = {"head": group[0].head, "params": group[0].params, "folds": len(group)}
        for metric in ("accuracy", "macro_f1", "log_loss", "fit_s", "predict_s"):
            values = np.array([getattr(s, metric) for s in group])
            row[metric], row[metric + "_std"] = float(values.mean()), float(values.std())
        rows.append(row)
    return sorted(rows, key=lambda r: (r["head"], -r["accuracy"], -r["macro_f1"]))


def fit_head(
    X: np.ndarray,
    y: np.ndarray,
    name: str,
    *,
    search: bool = False,
    cv: int = 5,
    seed: int = 0,
    class_weight: dict | str | None = None,
    n_jobs: int | None = None,
    pca: int | float | str | None = "auto",
    params: dict | None = None,
    class_names: list[str] | None = None,
    views=None,
) -> tuple[Pipeline, dict]:
    """Fit head ``name`` on all of ``X, y``; with ``search`` pick its parameters by CV first.

    The defaults are the library's (``pca="auto"``, :func:`make_head`'s classifier settings), the same
    ones ``compare`` scores and the CLI uses. ``n_jobs`` (None: every core) runs the search CV and the SVM
    heads' calibration folds in parallel. ``params`` fixes classifier parameters instead of
    searching (``compare --save-best`` passes the ones compare chose). ``class_names`` name classes in
    errors and warnings.

    Returns the fitted pipeline and an info dict: ``head``, ``params`` (classifier parameters used),
    ``search``, ``seed``, ``class_weight``, ``pca`` (as resolved by :func:`resolve_pca`), ``augmented_views``
    (``views``: augmented views of rows of ``X`` trained on as extra rows, see :func:`add_views`) and, when
    searched, ``cv``, ``cv_accuracy``, ``cv_accuracy_std``, ``cv_macro_f1`` and ``cv_results`` (every
    grid point, best first); for the mlp, ``early_stopping``: the rows its early stopping held out of the
    training rows (``validation_rows``, ``training_rows``, ``note``: in words). The default logreg head's
    ``params`` say how C was chosen (``C_chosen_by``: its internal CV, or the fixed C when a class has fewer
    rows than those folds, see :class:`LogisticRegressionCVHead`).
    """
    _check_name(name)
    check_pca(pca, *X.shape)
    check_rows(y, [name], cv if search else None, class_names)
    pca = resolve_pca(name, pca, X.shape)
    info: dict = {"head": name, "search": search, "seed": seed, "class_weight": class_weight, "pca": pca}
    params = dict(params or {})
    if search:
        rows = summarize(
            cross_validate(
                X,
                y,
                [name],
                cv=cv,
                seed=seed,
                search=True,
                class_weight=class_weight,
                n_jobs=n_jobs,
                pca=pca,
                class_names=class_names,
                views=views,
            )
        )
        params = rows[0]["params"]
        info |= {
            "cv": cv,
            "cv_accuracy": rows[0]["accuracy"],
            "cv_accuracy_std": rows[0]["accuracy_std"],
            "cv_macro_f1": rows[0]["macro_f1"],
            "cv_results": rows,
        }
    estimator = make_head(name, seed=seed, class_weight=None if name == "mlp" else class_weight, pca=pca, **params)
    X_fit, y_fit, groups = add_views(X, y, np.arange(len(X)), views)
    if name in _CALIBRATED and n_jobs != 1:
        # the calibration folds' SVMs fit in parallel (the saved head keeps n_jobs=None: it is not a setting of it)
        estimator[-1].set_params(n_jobs=-1 if n_jobs is None else n_jobs)
    try:
        fit(estimator, X_fit, y_fit, class_weight, groups)
    finally:
        if name in _CALIBRATED:
            estimator[-1].set_params(n_jobs=None)
    info["params"] = used_params(estimator, extra=params)
    info["augmented_views"] = len(X_fit) - len(X)
    info["dimensions"] = {"input": int(X.shape[1]), "kept": pca_components(estimator) or int(X.shape[1])}

    if isinstance(estimator[-1], MLPHead):
        info["early_stopping"] = {
            "validation_rows": int(estimator[-1].validation_rows_),
            "training_rows": len(X_fit),
            "note": estimator[-1].early_stopping_note_,
        }
    return estimator, info


def used_params(estimator: Pipeline, extra: dict | None = None) -> dict:
    """The classifier parameters a fitted head used, for the keys of its :func:`search_space` and of
    ``extra`` (parameters set explicitly); for a logreg head that chose C by its internal CV, the chosen
    ``C`` and the grid ``Cs`` it chose from."""
    name = head_name(estimator)
    clf = estimator[-1]
    if isinstance(clf, LogisticRegressionCV):
        reason = getattr(clf, "fixed_c_reason_", None)
        folds = clf.cv if isinstance(clf.cv, int) else getattr(clf.cv, "n_splits", "?")
        chosen_by = f"fixed: {reason}" if reason else f"internal {folds}-fold CV (log-loss)"
        return {"C": float(np.ravel(clf.C_)[0]), "Cs": [float(c) for c in clf.Cs_], "C_chosen_by": chosen_by}
    used = clf.get_params()
    return {k: used[_clf_prefix(name) + k] for k in sorted(set(search_space(name)) | set(extra or {}))}


def nonfinite_rows(X: np.ndarray, block_rows: int = 65536) -> np.ndarray:
    """Indices of the rows of ``X`` (N, D) holding a NaN or an infinity (checked ``block_rows`` at a time)."""
    bad = [
        start + np.flatnonzero(~np.isfinite(X[start : start + block_rows]).all(axis=1))
        for start in range(0, len(X), block_rows)
    ]
    return np.concatenate(bad) if bad else np.array([], dtype=np.intp)


def nonfinite_note(count: int) -> str:
    """How a run says it left such rows out (fit-head, compare, audit)."""
    return f"{count} row{'s' if count != 1 else ''} with a non-finite embedding (NaN or inf) left out"


def finite_only(X: np.ndarray, *rows: np.ndarray) -> tuple[list[np.ndarray], str]:
    """Each index array of ``rows`` without the rows of ``X`` that are not finite (a head cannot train on them),
    order kept; and a note counting the feature set's non-finite rows ("" when there are none)."""
    bad = nonfinite_rows(X)
    if not len(bad):
        return list(rows), ""
    return [r[~np.isin(r, bad)] for r in rows], nonfinite_note(len(bad))


def select_split(fs: FeatureSet, *, test_size: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """Training and evaluation rows of a feature set, with a sentence saying how they were chosen.

    The cache's split column (split names as :func:`tlpipe.features.names.normalize_split` maps them, the
    names ``extract`` recognises) wins when it has labelled ``train`` rows and ``test`` (or, lacking test,
    ``val``) rows; otherwise a stratified ``test_size`` hold-out of the labelled rows (seeded), in
    which a class with fewer than 2 rows stays in training whole (warned by name: it is then never
    evaluated). Unlabelled rows (``y == -1``) are never used. Rows marked ``test`` or ``val`` with no ``train``
    rows are refused rather than split anew: that would train on the images kept for evaluation.

    The cache's split column wins when it has labelled ``train`` rows and ``test`` (or, lacking test,
    ``val``) rows; otherwise a stratified hold-out of ``ceil(test_size * rows)`` labelled rows (seeded), in
    which a class with fewer than 2 rows stays in training whole (warned by name: it is then never
    evaluated). When that hold-out would be too small to hold a row of every class (2 labelled photos per
    class, the first round of ``tlpipe suggest``'s loop), nothing is held out: ``test`` is empty and the
    sentence says so; the head's figures then come from cross-validation or not at all, never from its
    training rows. The sizes in the sentence are the sizes used. Unlabelled rows (``y == -1``) are never used.

    Raises
    ------
    ValueError
        When a class has evaluation rows but no training rows (named), the split column has evaluation rows
        but no training rows (the splits named), or there is nothing to split.
    """
    labelled = fs.y >= 0
    notes = [f"{int((~labelled).sum())} unlabelled rows excluded"] if not labelled.all() else []
    present = {s: np.flatnonzero(labelled & (fs.split == s)) for s in ("train", "val", "test")}
    evaluate_on = "test" if len(present["test"]) else "val" if len(present["val"]) else None
    if evaluate_on and not len(present["train"]):
        from tlpipe.features.names import SPLIT_ALIASES

        names, counts = np.unique(fs.split[labelled], return_counts=True)
        found = ", ".join(f"{n or '(none)'} {c}" for n, c in zip(names.tolist(), counts.tolist()))
        known = ", ".join(a for a, s in SPLIT_ALIASES.items() if s == "train")
        raise InputError(
            f"feature set {fs.key}: the split column has '{evaluate_on}' rows but no 'train' rows (labelled rows "
            f"per split: {found}); a hold-out drawn from them would train on images kept for evaluation: name the "
            f"training split one of {known} (folder or manifest split column) and run extract again"
        )
    if len(present["train"]) and evaluate_on:
        train, test = present["train"], present[evaluate_on]
        description = (
            f"cache split column: train on 'train' ({len(train)} rows), evaluate on '{evaluate_on}' ({len(test)} rows)"
        )
        if evaluate_on == "val":
            notes.append("the cache has no 'test' split, so 'val' is the evaluation split")
        unused = int(labelled.sum()) - len(train) - len(test)
        if unused:
            notes.append(f"{unused} labelled rows in other splits not used")
        untrained = sorted(set(fs.y[test].tolist()) - set(fs.y[train].tolist()))
        if untrained:
            raise InputError(
                f"feature set {fs.key}: class(es) {', '.join(repr(fs.class_names[c]) for c in untrained)} "
                f"have '{evaluate_on}' rows but no 'train' rows: a head cannot learn them; add training "
                f"images of them or leave them out"
            )
    else:
        rows = np.flatnonzero(labelled)
        if len(rows) < 2:
            raise InputError(f"feature set {fs.key} has {len(rows)} labelled rows: nothing to train and evaluate on")
        counts = np.bincount(fs.y[rows], minlength=len(fs.class_names))
        tiny = np.flatnonzero((counts > 0) & (counts < 2))
        keep = rows[np.isin(fs.y[rows], tiny)]
        rest = rows[~np.isin(fs.y[rows], tiny)]
        if len(tiny):
            named = ", ".join(f"{fs.class_names[c]!r} ({counts[c]} row)" for c in tiny)
            message = f"class(es) {named} too small for the hold-out: kept in training, never evaluated"
            warnings.warn(message, UserWarning, stacklevel=2)
            notes.append(message)
        if len(rest) < 2:
            raise InputError(f"feature set {fs.key}: no class has 2 labelled rows; nothing to evaluate on")

        n_classes = len(np.unique(fs.y[rest]))
        n_test = math.ceil(test_size * len(rest) - 1e-9)  # (0.2 * 35 is 7.000000000000001 in floating point)
        if n_classes < 2 or n_test < n_classes:
            # Too little to hold out: a hold-out without a row of every class, or larger than test_size, would
            # give figures on some classes only or take more than asked. Train on every labelled row instead.
            needed = int(np.floor((max(n_classes, 2) - 1) / test_size + 1e-9)) + 1
            train, test = np.sort(rows), np.array([], dtype=rows.dtype)
            description = (
                f"no hold-out: {len(rows)} labelled rows of {len(np.unique(fs.y[rows]))} classes are too few for a "
                f"{test_size:g} stratified hold-out with a row of every class (it needs {needed} rows), so the head "
                f"is trained on all of them; no held-out figures (cross-validation gives figures: --search, or "
                f"tlpipe compare, once each class has enough rows)"
            )
        else:
            stratify = fs.y[rest] if len(rest) - n_test >= n_classes else None
            train, test = train_test_split(rest, test_size=n_test, random_state=seed, stratify=stratify)
            train, test = np.sort(np.concatenate([train, keep])), np.sort(test)
            description = (
                f"{'stratified' if stratify is not None else 'random'} hold-out "
                f"of the labelled rows (no usable split column): {len(train)} train, {len(test)} evaluation "
                f"({round(100 * len(test) / len(rows))} % of {len(rows)} labelled rows; test_size {test_size:g}, "
                f"seed {seed})"
            )
    return train, test, "; ".join([description, *notes])


def name_labels(y: np.ndarray, class_names: list[str] | tuple[str, ...]) -> np.ndarray:
    """Label indices as class names: ``y`` (N,) int indices into ``class_names`` -> (N,) str array.

    A head fitted on these knows its classes by name: ``classes_`` holds the names and ``predict``
    returns them (``fit-head`` and ``compare --save-best`` fit this way).
    """
    y = np.asarray(y)
    if len(y) and (y.min() < 0 or y.max() >= len(class_names)):
        raise InputError(f"label indices outside 0..{len(class_names) - 1} (unlabelled rows?) cannot be named")
    return np.asarray(list(class_names), dtype=str)[y] if len(y) else np.array([], dtype=str)


def class_balance(y: np.ndarray, class_names: list[str]) -> dict:
    """Rows per class, the unlabelled count and the imbalance ratio (largest class / smallest class)."""
    labelled = y[y >= 0]
    counts = {name: int(np.sum(labelled == i)) for i, name in enumerate(class_names)}
    present = {k: v for k, v in counts.items() if v}
    return {
        "counts": counts,
        "labelled": int(len(labelled)),
        "unlabelled": int(np.sum(y < 0)),
        "majority": max(present, key=present.__getitem__) if present else None,
        "minority": min(present, key=present.__getitem__) if present else None,
        "imbalance_ratio": max(present.values()) / min(present.values()) if present else None,
    }
