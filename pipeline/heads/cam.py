"""Exact class activation maps of linear heads on average-pooled features (Zhou et al., CVPR 2016).

A head whose preprocessing is affine (standardisation, PCA) and whose classifier is a logistic regression
is one affine function of the pooled embedding: ``score_k(f) = f @ A[:, k] + c[k]``. With ``f`` the spatial
mean of the backbone's last map ``S`` (H, W, C), the map ``M_k = S @ A[:, k]`` is exact: its mean *is* the
class score minus the folded intercept ``c[k]``. Heads where no such map exists are refused, naming why.
"""

from __future__ import annotations

import numpy as np

from tlpipe.errors import InputError, TlpipeError

__all__ = ["NoExactMap", "class_activation_maps", "linear_form"]


class NoExactMap(TlpipeError, ValueError):
    """The head has no exact class activation map (not linear in the pooled features)."""


def linear_form(estimator) -> tuple[np.ndarray, np.ndarray, list]:
    """The head as one affine function of the pooled embedding: ``scores = f @ A + c``.

    Parameters
    ----------
    estimator : sklearn.pipeline.Pipeline
        A fitted head (:func:`tlpipe.pipeline.heads.estimators.make_head`): StandardScaler and optionally PCA,
        then a logistic regression.

    Returns
    -------
    A : (D, K) float64 ndarray
        The weights with the preprocessing folded in.
    c : (K,) float64 ndarray
        The folded intercepts.
    classes : list
        The class of each column. A binary head has K = 2: column 1 is sklearn's decision function (the
        score of ``classes[1]``), column 0 its negation.

    Raises
    ------
    NoExactMap
        A step that is not affine (L2 normalisation), or a classifier whose scores are not linear (RBF-SVM,
        MLP, a calibrated SVM's averaged probabilities).
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    steps = list(getattr(estimator, "steps", [("head", estimator)]))
    *pre, (name, clf) = steps
    for step, transform in pre:
        if not isinstance(transform, StandardScaler | PCA):
            raise NoExactMap(
                f"no exact class activation map: step {step!r} ({type(transform).__name__}) is not affine in the features"
            )
    if not isinstance(clf, LogisticRegression):
        raise NoExactMap(
            f"no exact class activation map: the {name!r} head ({type(clf).__name__}) is not a linear function "
            "of the pooled features (only logistic-regression heads are)"
        )
    dim = int(clf.n_features_in_) if not pre else int(pre[0][1].n_features_in_)
    probe = np.vstack([np.zeros((1, dim)), np.eye(dim)])  # the affine preprocessing, evaluated exactly
    for _, transform in pre:
        probe = transform.transform(probe)
    scores = probe @ np.asarray(clf.coef_, dtype=np.float64).T + np.asarray(clf.intercept_, dtype=np.float64)
    if scores.shape[1] == 1:
        scores = np.hstack([-scores, scores])
    c = scores[0]
    return scores[1:] - c, c, list(clf.classes_)


def class_activation_maps(spatial: np.ndarray, estimator) -> tuple[np.ndarray, np.ndarray, list]:
    """Each class's exact activation map of a batch of backbone maps.

    Parameters
    ----------
    spatial : (N, H, W, D) float ndarray
        The backbone's last spatial map before average pooling (pooled: ``spatial.mean(axis=(1, 2))``).
    estimator : sklearn.pipeline.Pipeline
        A linear head (see :func:`linear_form`).

    Returns
    -------
    maps : (N, K, H, W) float32 ndarray
        ``maps[n, k].mean()`` equals the head's score of class k minus ``intercepts[k]``.
    intercepts : (K,) float64 ndarray
    classes : list

    Raises
    ------
    NoExactMap
        The head is not linear (see :func:`linear_form`).
    ValueError
        ``spatial`` is not 4-D or its depth is not the head's feature count.
    """
    A, c, classes = linear_form(estimator)
    spatial = np.asarray(spatial)
    if spatial.ndim != 4 or spatial.shape[-1] != A.shape[0]:
        raise InputError(f"spatial maps must be (N, H, W, {A.shape[0]}); got {spatial.shape}")
    maps = np.einsum("nhwd,dk->nkhw", spatial.astype(np.float64), A)
    return maps.astype(np.float32), c, classes
