"""`tlpipe audit`: what is wrong with the photos before any head is trained, from the cached embeddings alone.

Four lists, each with a contact sheet, written like ``compare``'s report (Markdown + CSV + JSON + PNG):

1. **Duplicates**, grouped into clusters (connected components of the "is a duplicate of" graph):
   *exact* copies (the same sha256 under several paths) and *near* duplicates (re-encoded, resized or
   slightly cropped copies: cosine similarity of the L2-normalised embeddings at or above
   :data:`NEAR_DUPLICATE_COSINE`). Clusters spanning ``train`` and ``val``/``test`` (**split leaks**) come
   first, then clusters with more than one label (**label conflicts**), then the rest.
2. **Likely label errors**: out-of-fold predicted probabilities of a fast head (the project's ``logreg``
   head, stratified K-fold), ranked by cleanlab's label quality score (self-confidence, Northcutt et al.,
   "Confident Learning", JAIR 2021); cleanlab's ``find_label_issues`` decides which are flagged. Each entry
   has the given and the suggested label.
3. **Outliers**: images far from every other image: the mean cosine distance to their
   :data:`NEIGHBOURS` nearest neighbours (the feature-space score cleanlab's ``OutOfDistribution`` uses
   before its exponential transform; Kuan & Mueller 2022), ranked.
4. **Contact sheets** (PNG) of the top entries of each list, drawn from the image files.

Nothing here needs TensorFlow or ONNX Runtime, and nothing is ever deleted: ``exclude_file`` writes the
flagged rows' sha256 to a list that ``compare``, ``fit-head`` and ``evaluate`` accept as ``--exclude``.

**Where exact duplicates come from.** The cache keeps one row per unique content (sha256), and records
the other paths of a content only when they carry another label (its label conflicts, with every path,
label and split). Copies under the same label are dropped by extraction after counting them. The audit
therefore uses the recorded conflicts and also lists the sources recorded in the cache again, compares
file sizes, and hashes only files whose size another file shares (a byte-identical copy always does). A
source that can no longer be read is named in the report's notes; the near-duplicate search still covers
every cached row.

**The near-duplicate threshold** (``benchmarks/bench_audit.py``, ``benchmarks/results/audit.json``):
MobileNetV2 1.0 at 224 px with ImageNet weights, 100 cats_vs_dogs training photos (~480x375) each copied
11 ways. Cosine of the copy to its original: JPEG quality 90 or 50, PNG, 1.5x upscaling: >= 0.93 for
every copy; 50 % downscaling: median 0.97, 5th percentile 0.86; a 5 % crop off each side: median 0.94,
5th percentile 0.90; harsher edits (JPEG quality 25, 25 % downscaling, 10-15 % crops) fall to 0.5-0.9.
Distinct photos: the most similar of all 499,500 pairs of the 1,000 cats_vs_dogs photos is 0.83 (two
German shepherds in the same pose). At 0.88, 98.5 % of the mild copies are found and no distinct pair is
reported. The threshold depends on the backbone and on the photos: flowers5_128px (128 px thumbnails,
upscaled to 224) has 772 of its 9.3 M pairs above 0.88, many of them distinct tulips; the report's
``similarity.png`` shows each row's nearest-neighbour cosine against the threshold, and ``threshold``
changes it.

**Memory** for N rows x D dimensions: the feature set as float32 (N·D·4 bytes: 5.1 GB at 1 M x 1280,
normalised in place), the neighbour search's working set (scikit-learn's ``working_memory`` chunks, 1 GiB
by default, or a usearch index of N·D·2 bytes in float16 plus its graph), above :data:`PCA_SAMPLE` rows the
head's input projected blockwise on :data:`HEAD_PCA` principal components (N·256·4 bytes, and about three
times that while a fold is fitted), and O(N·k) neighbour lists: linear in N, with no N x N matrix anywhere.
At 1 M x 1280: about 5.1 + 2.6 (usearch) + 3 GB.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING

import numpy as np

from tlpipe.errors import TlpipeError
from tlpipe.features.cache import FeatureSet, read_feature_set, source_root

if TYPE_CHECKING:
    from tlpipe.features.sources import ImageRecord

__all__ = [
    "AuditError",
    "AuditResult",
    "BLOCK_ROWS",
    "Cluster",
    "Copy",
    "EXACT_SEARCH_ROWS",
    "HEAD_PCA",
    "LabelIssue",
    "Member",
    "NEAR_DUPLICATE_COSINE",
    "NEIGHBOURS",
    "OUTLIER_MADS",
    "Outlier",
    "PCA_SAMPLE",
    "audit",
    "choose_backend",
    "find_exact_copies",
    "nearest_neighbours",
    "normalise_rows",
    "write_exclude_file",
]

NEAR_DUPLICATE_COSINE = 0.88  # measured: see the module docstring and benchmarks/bench_audit.py
# k of the k-nearest-neighbour graph: duplicate candidates and the outlier score. 20 rather than 10: a few foreign
# images of one kind (three screenshots of one app) are each other's nearest neighbours, and with k = 10
# two of them fell to ranks 40-53 of 1,030 in the benchmark; with k = 20 to 13-60 (bench_audit.py).
NEIGHBOURS = 20
EXACT_SEARCH_ROWS = 50_000  # backend "auto": exact scikit-learn search up to this many rows, usearch above
HEAD_PCA = 256  # above PCA_SAMPLE rows the label-error head sees this many principal components
PCA_SAMPLE = 20_000  # rows the PCA is fitted on
BLOCK_ROWS = 8192  # rows normalised / searched / added at a time
# An outlier is flagged (for the exclude list) when its score is this many robust standard deviations
# (1.4826 x MAD) above the median. In the benchmark the 10 planted foreign images scored 2.2-5.5 and the
# 1,020 photos at most 2.8: 3 flags 5 of the 10 foreign images and no photo. The ranking is for a person to
# review; the flag is deliberately conservative.
OUTLIER_MADS = 3.0
_EVALUATION_SPLITS = ("val", "test")


class AuditError(TlpipeError, ValueError):
    """The audit cannot run as asked (missing extra, nothing to audit...)."""


def _need_cleanlab():
    try:
        import cleanlab.filter
        import cleanlab.rank
    except ImportError:
        raise AuditError("cleanlab is not installed: pip install 'tlpipe[audit]'") from None
    return cleanlab


# -- nearest neighbours ------------------------------------------------------------------------------
def normalise_rows(X: np.ndarray, block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """L2-normalise the rows of a float32 array in place, ``block_rows`` at a time (all-zero rows stay zero).

    Parameters
    ----------
    X : ndarray of shape (N, D), float32
        Embeddings; changed in place.
    block_rows : int
        Rows per block (bounds the temporary memory to ``block_rows * D * 4`` bytes).

    Returns
    -------
    ndarray
        ``X`` itself.
    """
    for start in range(0, len(X), block_rows):
        block = X[start : start + block_rows]
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        block /= np.where(norms > 0, norms, 1)
    return X


def choose_backend(rows: int, backend: str = "auto") -> str:
    """``"sklearn"`` (exact) or ``"usearch"`` (approximate HNSW) for ``rows`` rows; ``"auto"`` picks
    scikit-learn up to :data:`EXACT_SEARCH_ROWS` rows and usearch above when it is installed."""
    if backend not in ("auto", "sklearn", "usearch"):
        raise AuditError(f"--neighbours must be auto, sklearn or usearch, not {backend!r}")
    if backend == "auto":
        if rows <= EXACT_SEARCH_ROWS:
            return "sklearn"
        try:
            import usearch.index  # noqa: F401
        except ImportError:
            return "sklearn"
        return "usearch"
    if backend == "usearch":
        try:
            import usearch.index  # noqa: F401
        except ImportError:
            raise AuditError("usearch is not installed: pip install 'tlpipe[audit]'") from None
    return backend


def _searcher(X: np.ndarray, k: int, backend: str, block_rows: int, threads: int):
    """``found(queries) -> (distances, keys)`` of the ``k`` nearest rows of ``X`` (L2-normalised) by ``backend``
    (``"sklearn"`` or ``"usearch"``, see :func:`nearest_neighbours`), and the function turning its distances
    into cosine similarities."""
    if backend == "sklearn":
        from sklearn.neighbors import NearestNeighbors

        search = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="euclidean").fit(X)
        return (lambda block: search.kneighbors(block)), (lambda d: 1.0 - d.astype(np.float64) ** 2 / 2)
    from usearch.index import Index

    index = Index(ndim=X.shape[1], metric="cos", dtype="f16")
    for start in range(0, len(X), block_rows):
        stop = min(len(X), start + block_rows)
        index.add(np.arange(start, stop, dtype=np.uint64), X[start:stop], threads=threads)

    def found(block):
        matches = index.search(block, count=k, threads=threads)
        return matches.distances, matches.keys.astype(np.int64)

    return found, (lambda d: 1.0 - d.astype(np.float64))


def nearest_among(
    X: np.ndarray,
    queries: np.ndarray,
    k: int = 1,
    *,
    backend: str = "auto",
    block_rows: int = BLOCK_ROWS,
    threads: int = 0,
) -> tuple[np.ndarray, np.ndarray, str]:
    """The ``k`` rows of ``X`` most similar (cosine) to each row of ``queries``: another set searched, as
    ``tlpipe suggest`` searches the labelled photos for near duplicates of unlabelled ones.

    Parameters
    ----------
    X : ndarray of shape (N, D), float32
        L2-normalised rows searched (see :func:`normalise_rows`).
    queries : ndarray of shape (M, D), float32
        L2-normalised query rows, ``block_rows`` at a time.
    k : int
        Neighbours per query (capped at N).
    backend : {"auto", "sklearn", "usearch"}
        As :func:`nearest_neighbours`; ``"auto"`` decides on ``N + M`` rows.
    block_rows, threads : int
        As :func:`nearest_neighbours`.

    Returns
    -------
    indices : ndarray of shape (M, k), int64
        Rows of ``X``, most similar first; -1 where fewer were found (or ``X`` is empty).
    cosines : ndarray of shape (M, k), float32
        Their cosine similarities (-inf where no neighbour).
    backend : str
        The backend used.
    """
    m, k = len(queries), max(0, min(k, len(X)))
    backend = choose_backend(len(X) + m, backend)
    indices = np.full((m, k), -1, dtype=np.int64)
    cosines = np.full((m, k), -np.inf, dtype=np.float32)
    if k == 0 or m == 0:
        return indices, cosines, backend
    found, to_cosine = _searcher(X, k, backend, block_rows, threads)
    for start in range(0, m, block_rows):
        stop = min(m, start + block_rows)
        distances, neighbours = found(queries[start:stop])
        cos = to_cosine(np.asarray(distances)).reshape(stop - start, k)
        neighbours = np.asarray(neighbours, dtype=np.int64).reshape(stop - start, k)
        missing = (neighbours < 0) | (neighbours >= len(X))  # usearch fills keys past those found with a sentinel
        neighbours[missing], cos[missing] = -1, -np.inf
        indices[start:stop], cosines[start:stop] = neighbours, cos
    return indices, cosines, backend


def nearest_neighbours(
    X: np.ndarray, k: int = NEIGHBOURS, *, backend: str = "auto", block_rows: int = BLOCK_ROWS, threads: int = 0
) -> tuple[np.ndarray, np.ndarray, str]:
    """The ``k`` nearest other rows of every row by cosine similarity.

    Parameters
    ----------
    X : ndarray of shape (N, D), float32
        L2-normalised rows (see :func:`normalise_rows`).
    k : int
        Neighbours per row (capped at N - 1).
    backend : {"auto", "sklearn", "usearch"}
        ``sklearn``: exact, :class:`sklearn.neighbors.NearestNeighbors` with brute-force Euclidean distance
        on the unit vectors (``cos = 1 - d**2 / 2``), queried ``block_rows`` at a time; scikit-learn chunks
        each query to its ``working_memory`` (1 GiB by default). ``usearch``: approximate, an HNSW index
        (cosine metric, float16 vectors: N·D·2 bytes), built and queried ``block_rows`` at a time.
    block_rows : int
        Rows per query / insertion block.
    threads : int
        usearch threads (0: all cores).

    Returns
    -------
    indices : ndarray of shape (N, k), int64
        Row numbers of the neighbours, most similar first; -1 where fewer were found.
    cosines : ndarray of shape (N, k), float32
        Their cosine similarities (-inf where no neighbour).
    backend : str
        The backend used.
    """
    n = len(X)
    k = max(0, min(k, n - 1))
    backend = choose_backend(n, backend)
    indices = np.full((n, k), -1, dtype=np.int64)
    cosines = np.full((n, k), -np.inf, dtype=np.float32)
    if k == 0:
        return indices, cosines, backend
    found, to_cosine = _searcher(X, k + 1, backend, block_rows, threads)
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        distances, neighbours = found(X[start:stop])
        cos = to_cosine(np.asarray(distances))
        neighbours = np.asarray(neighbours, dtype=np.int64)
        if backend == "usearch":  # keys past the number found are filled with a sentinel
            missing = (neighbours < 0) | (neighbours >= n)
            neighbours[missing], cos[missing] = -1, -np.inf
        rows = np.arange(start, stop)[:, None]
        # drop each row itself (identical vectors can tie with it, so drop by index, else the last column)
        is_self = neighbours == rows
        drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
        keep = np.ones_like(is_self)
        keep[np.arange(len(keep)), drop] = False
        indices[start:stop] = neighbours[keep].reshape(len(keep), k)
        cosines[start:stop] = cos[keep].reshape(len(keep), k)
    return indices, cosines, backend


# -- exact duplicates from the recorded sources --------------------------------------------------------
@dataclass
class Copy:
    """A file holding the same bytes as a cached row, found in one of the cache's sources."""

    path: str
    label: str | None
    split: str | None
    source: str


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_exact_copies(
    sources: list[str], sha256: np.ndarray, paths: np.ndarray
) -> tuple[dict[int, list[Copy]], list[str]]:
    """Files in ``sources`` with the same bytes as a cached row, other than the row's own path.

    Parameters
    ----------
    sources : list of str
        The cache's recorded sources (folders or CSV manifests, as ``extract`` was given them).
    sha256, paths : ndarray of shape (N,), str
        The cached rows' content hashes and relative paths.

    Returns
    -------
    copies : dict
        Row number -> the other files holding its bytes (path relative to its source, label, split).
    notes : list of str
        Sources that could not be listed, files that could not be read.
    """
    from tlpipe.features.sources import discover, display_name

    notes: list[str] = []
    files: list[tuple[str, ImageRecord, str]] = []  # (abspath, record, source)
    for source in sources:
        try:
            found = discover(source, allow_outside_root=True)
        except (OSError, ValueError) as exc:
            notes.append(f"source {source} could not be listed ({exc}); exact copies in it are not known")
            continue
        files.extend((r.abspath, r, source) for r in found.records)
    by_size: dict[int, list[int]] = defaultdict(list)
    unreadable = 0
    for i, (abspath, _, _) in enumerate(files):
        try:
            by_size[os.stat(abspath).st_size].append(i)
        except OSError:
            unreadable += 1
    row_of = {s: i for i, s in enumerate(sha256.tolist())}
    by_row: dict[int, list[int]] = defaultdict(list)
    for group in by_size.values():
        if len(group) < 2:
            continue
        for i in group:
            try:
                digest = _sha256(files[i][0])
            except OSError:
                unreadable += 1
                continue
            if digest in row_of:
                by_row[row_of[digest]].append(i)
    if unreadable:
        notes.append(f"{unreadable} files of the sources could not be read; exact copies among them are not known")
    copies: dict[int, list[Copy]] = {}
    for row, members in by_row.items():
        if len(members) < 2:
            continue
        own = str(paths[row])
        others = [files[i] for i in members]
        # the cached row is one of these files: the first with the row's path (same source order as extract)
        # (paths as the cache shows them: names that are not UTF-8 with backslash escapes)
        mine = next((j for j, (_, r, _) in enumerate(others) if display_name(r.relpath) == own), None)
        copies[row] = [
            Copy(display_name(r.relpath), r.label, r.split, source)
            for j, (_, r, source) in enumerate(others)
            if j != mine
        ]
    return copies, notes


# -- results -----------------------------------------------------------------------------------------
@dataclass
class Member:
    """One image of a duplicate cluster: a cached row, or an exact copy of one (``row`` then names the copy's row)."""

    row: int
    path: str
    sha256: str
    label: str | None
    split: str
    exact_copy: bool = False  # a file with the bytes of ``row``, not itself a cache row


@dataclass
class Cluster:
    """Images that are duplicates of each other (exact and/or near)."""

    id: int
    kind: str  # "exact" | "near" | "exact+near"
    leak: bool  # spans train and val/test
    conflict: bool  # more than one label
    labels: list[str]
    splits: list[str]
    min_cosine: float  # weakest near-duplicate link inside the cluster (1.0 for exact copies only)
    members: list[Member]


@dataclass
class LabelIssue:
    rank: int
    row: int
    path: str
    sha256: str
    split: str
    given: str
    suggested: str
    quality: float  # cleanlab's self-confidence: out-of-fold probability of the given label
    p_suggested: float
    flagged: bool  # cleanlab's find_label_issues says it is an issue


@dataclass
class Outlier:
    rank: int
    row: int
    path: str
    sha256: str
    label: str | None
    split: str
    score: float  # mean cosine distance to the NEIGHBOURS nearest rows
    nearest_cosine: float
    flagged: bool


@dataclass
class AuditResult:
    """What :func:`audit` found, and how."""

    cache: str
    feature_key: str
    backbone: dict
    cache_id: str
    rows: int
    excluded: int
    class_names: list[str]
    threshold: float
    neighbours: int
    backend: str
    clusters: list[Cluster]
    label_issues: list[LabelIssue]  # every labelled row that could be cross-validated, worst first
    outliers: list[Outlier]  # every row, most isolated first
    flagged: dict[str, list[str]]  # sha256 -> reasons
    notes: list[str]
    head: dict  # the label-error head: name, folds, pca, out-of-fold accuracy
    nearest_cosine: np.ndarray  # (N,) each row's most similar other row
    sources: list[str]
    seconds: float
    timings: dict = field(default_factory=dict)
    roots: list[str] = field(default_factory=list)
    excluded_missing: int = 0  # rows left out because their source file is gone or changed (keep_missing=False)
    nonfinite: list[str] = field(default_factory=list)  # paths of rows left out: their embedding has a NaN or inf

    @property
    def leaks(self) -> list[Cluster]:
        return [c for c in self.clusters if c.leak]

    @property
    def conflicts(self) -> list[Cluster]:
        return [c for c in self.clusters if c.conflict]

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k not in ("nearest_cosine",)}
        return data | {"summary": self.summary()}

    def summary(self) -> dict:
        return {
            "rows": self.rows,
            "excluded": self.excluded,
            "clusters": len(self.clusters),
            "exact_clusters": sum("exact" in c.kind for c in self.clusters),
            "near_clusters": sum("near" in c.kind for c in self.clusters),
            "split_leaks": len(self.leaks),
            "label_conflicts": len(self.conflicts),
            "label_issues_flagged": sum(i.flagged for i in self.label_issues),
            "outliers_flagged": sum(o.flagged for o in self.outliers),
            "flagged_rows": len(self.flagged),
            "nonfinite_rows": len(self.nonfinite),
        }


# -- the audit -----------------------------------------------------------------------------------------
def _clusters(
    fs: FeatureSet, indices: np.ndarray, cosines: np.ndarray, threshold: float, copies: dict[int, list[Copy]]
) -> list[Cluster]:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(fs)
    rows, cols = np.nonzero(cosines >= threshold)
    targets = indices[rows, cols]
    weights = cosines[rows, cols]
    graph = coo_matrix((np.ones(len(rows)), (rows, targets)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    weakest: dict[int, float] = {}
    for r, w in zip(rows.tolist(), weights.tolist()):
        c = component[r]
        weakest[c] = min(weakest.get(c, 1.0), w)
    groups: dict[int, list[int]] = defaultdict(list)
    linked = set(rows.tolist()) | set(targets.tolist())
    for r in sorted(linked | set(copies)):
        groups[component[r]].append(r)
    label = lambda y: fs.class_names[y] if y >= 0 else None  # noqa: E731
    clusters = []
    for c, members_rows in groups.items():
        members = []
        for r in members_rows:
            members.append(Member(r, str(fs.paths[r]), str(fs.sha256[r]), label(int(fs.y[r])), str(fs.split[r])))
            members += [
                Member(r, cp.path, str(fs.sha256[r]), cp.label, cp.split or "", exact_copy=True)
                for cp in copies.get(r, [])
            ]
        near = len(members_rows) > 1
        exact = any(m.exact_copy for m in members)
        splits = sorted({m.split for m in members})
        labels = sorted({m.label for m in members if m.label is not None})
        clusters.append(
            Cluster(
                id=0,
                kind="exact+near" if exact and near else "exact" if exact else "near",
                leak="train" in splits and any(s in splits for s in _EVALUATION_SPLITS),
                conflict=len(labels) > 1,
                labels=labels,
                splits=splits,
                min_cosine=float(weakest.get(c, 1.0)),
                members=members,
            )
        )
    clusters.sort(key=lambda c: (not c.leak, not c.conflict, c.min_cosine * -1, c.members[0].path))
    for i, cluster in enumerate(clusters):
        cluster.id = i + 1
    return clusters


def _reduce(X: np.ndarray, seed: int, block_rows: int = BLOCK_ROWS) -> tuple[np.ndarray, int | None]:
    """``X`` projected on its first :data:`HEAD_PCA` principal components (fitted on at most
    :data:`PCA_SAMPLE` rows, applied ``block_rows`` at a time) when it has more dimensions and more than
    :data:`PCA_SAMPLE` rows; else ``X`` itself. Keeps the head's fold copies at N·256·4 bytes."""
    if X.shape[1] <= HEAD_PCA or len(X) <= PCA_SAMPLE:
        return X, None
    from sklearn.decomposition import PCA

    sample = np.random.default_rng(seed).choice(len(X), PCA_SAMPLE, replace=False)
    pca = PCA(HEAD_PCA, svd_solver="covariance_eigh", random_state=seed).fit(X[np.sort(sample)])
    Z = np.empty((len(X), HEAD_PCA), dtype=np.float32)
    for start in range(0, len(X), block_rows):
        Z[start : start + block_rows] = pca.transform(X[start : start + block_rows])
    return Z, HEAD_PCA


def _out_of_fold(X: np.ndarray, y: np.ndarray, cv: int, seed: int, n_jobs: int | None) -> tuple[np.ndarray, dict]:
    """Out-of-fold class probabilities of the ``logreg`` head (stratified ``cv``-fold, shuffled with ``seed``)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from tlpipe.pipeline.heads.estimators import make_head

    Z, pca = _reduce(X, seed)
    folds = StratifiedKFold(cv, shuffle=True, random_state=seed)
    proba = cross_val_predict(make_head("logreg", seed=seed), Z, y, cv=folds, method="predict_proba", n_jobs=n_jobs)
    accuracy = float(np.mean(proba.argmax(axis=1) == y))
    return proba, {
        "head": "logreg",
        "folds": cv,
        "pca": pca,
        "seed": seed,
        "rows": int(len(y)),
        "out_of_fold_accuracy": accuracy,
    }


def _label_issues(
    fs: FeatureSet, cv: int, seed: int, n_jobs: int | None, notes: list[str]
) -> tuple[list[LabelIssue], dict]:
    cleanlab = _need_cleanlab()
    labelled = np.flatnonzero(fs.y >= 0)
    classes, counts = np.unique(fs.y[labelled], return_counts=True)
    small = classes[counts < cv]
    if len(small):
        notes.append(
            f"label errors: classes with fewer than {cv} rows cannot be cross-validated and are left out: "
            + ", ".join(f"{fs.class_names[c]} ({n})" for c, n in zip(classes, counts) if c in small)
        )
    rows = labelled[~np.isin(fs.y[labelled], small)]
    kept = np.setdiff1d(classes, small)
    if len(kept) < 2:
        notes.append("label errors: fewer than two classes with enough labelled rows; not searched")
        return [], {}
    y = np.searchsorted(kept, fs.y[rows])  # cleanlab wants labels 0..K-1
    proba, head = _out_of_fold(fs.X[rows], y, cv, seed, n_jobs)
    quality = cleanlab.rank.get_label_quality_scores(y, proba, method="self_confidence")
    flagged = np.zeros(len(rows), dtype=bool)
    flagged[cleanlab.filter.find_label_issues(y, proba, n_jobs=1)] = True
    order = np.lexsort((np.arange(len(rows)), quality))
    suggested = proba.argmax(axis=1)
    issues = [
        LabelIssue(
            rank=rank + 1,
            row=int(rows[i]),
            path=str(fs.paths[rows[i]]),
            sha256=str(fs.sha256[rows[i]]),
            split=str(fs.split[rows[i]]),
            given=fs.class_names[kept[y[i]]],
            suggested=fs.class_names[kept[suggested[i]]],
            quality=float(quality[i]),
            p_suggested=float(proba[i, suggested[i]]),
            flagged=bool(flagged[i]),
        )
        for rank, i in enumerate(order)
    ]
    return issues, head


def _outliers(fs: FeatureSet, indices: np.ndarray, cosines: np.ndarray) -> list[Outlier]:
    valid = np.isfinite(cosines)
    distance = np.where(valid, 1.0 - cosines, np.nan)
    score = np.nanmean(distance, axis=1) if distance.shape[1] else np.zeros(len(fs))
    score = np.nan_to_num(score, nan=0.0)
    median = float(np.median(score)) if len(score) else 0.0
    mad = float(np.median(np.abs(score - median)) * 1.4826) if len(score) else 0.0
    cut = median + OUTLIER_MADS * mad if mad > 0 else np.inf
    order = np.lexsort((np.arange(len(score)), -score))
    nearest = cosines[:, 0] if cosines.shape[1] else np.full(len(fs), -np.inf)
    return [
        Outlier(
            rank=rank + 1,
            row=int(i),
            path=str(fs.paths[i]),
            sha256=str(fs.sha256[i]),
            label=fs.class_names[fs.y[i]] if fs.y[i] >= 0 else None,
            split=str(fs.split[i]),
            score=float(score[i]),
            nearest_cosine=float(nearest[i]),
            flagged=bool(score[i] > cut),
        )
        for rank, i in enumerate(order)
    ]


def _flag(result_clusters: list[Cluster], issues: list[LabelIssue], outliers: list[Outlier]) -> dict[str, list[str]]:
    """sha256 -> reasons: every label-conflict cluster whole; in other clusters all rows but one (an
    evaluation-split row is kept first, so the evaluation set stays and the leak goes); cleanlab's label
    issues; outliers past the robust cut."""
    flagged: dict[str, list[str]] = defaultdict(list)
    priority = {"test": 0, "val": 1, "train": 2}
    for c in result_clusters:
        rows = {m.row: m for m in c.members if not m.exact_copy}
        if c.conflict:
            for m in rows.values():
                flagged[m.sha256].append(f"label conflict in duplicate cluster {c.id} ({', '.join(c.labels)})")
            continue
        keep = min(rows.values(), key=lambda m: (priority.get(m.split, 3), m.row))
        for m in rows.values():
            if m.row != keep.row:
                flagged[m.sha256].append(
                    f"duplicate of {keep.sha256[:12]} ({keep.path}), cluster {c.id}"
                    + (", split leak" if c.leak else "")
                )
    for i in issues:
        if i.flagged:
            flagged[i.sha256].append(
                f"likely label error: given {i.given}, suggested {i.suggested} (p={i.p_suggested:.2f})"
            )
    for o in outliers:
        if o.flagged:
            flagged[o.sha256].append(f"outlier (mean cosine distance {o.score:.3f} to its {NEIGHBOURS} nearest)")
    return dict(flagged)


def _read_sources(cache: str | os.PathLike) -> tuple[list[str], list[dict]]:
    """The cache's recorded sources (paths) and label conflicts (sha256 + every occurrence), tolerant of
    caches that record sources as plain paths and of caches without a conflict list."""
    from tlpipe.features.cache import describe

    info = describe(cache)
    sources = [s["path"] if isinstance(s, dict) else str(s) for s in info.get("sources") or []]
    return sources, list(info.get("label_conflicts") or [])


def _recorded_copies(fs: FeatureSet, conflicts: list[dict], copies: dict[int, list[Copy]]) -> None:
    """Add the occurrences the cache recorded for its label conflicts (same bytes under two labels) to
    ``copies``, unless the source scan found them already."""
    row_of = {s: i for i, s in enumerate(fs.sha256.tolist())}
    for conflict in conflicts:
        row = row_of.get(conflict.get("sha256"))
        if row is None:
            continue
        known = {(c.path, c.source) for c in copies.get(row, [])} | {(c.path, "") for c in copies.get(row, [])}
        for o in conflict.get("occurrences", []):
            path, source = str(o.get("path")), str(o.get("source") or "")
            if path == str(fs.paths[row]) or (path, source) in known or (path, "") in known:
                continue
            copies.setdefault(row, []).append(Copy(path, o.get("label"), o.get("split"), source))
            known.add((path, source))


def _keep_rows(fs: FeatureSet, rows: np.ndarray) -> FeatureSet:
    """``fs`` reduced to ``rows`` (every per-row array)."""
    import dataclasses

    n = len(fs)
    return dataclasses.replace(
        fs,
        **{
            f.name: getattr(fs, f.name)[rows]
            for f in dataclasses.fields(fs)
            if isinstance(getattr(fs, f.name), np.ndarray) and len(getattr(fs, f.name)) == n
        },
    )


def audit(
    cache: str | os.PathLike,
    features: str | None = None,
    *,
    report: str | os.PathLike | None = None,
    write_exclude: str | os.PathLike | None = None,
    exclude: str | os.PathLike | None = None,
    threshold: float = NEAR_DUPLICATE_COSINE,
    neighbours: int = NEIGHBOURS,
    backend: str = "auto",
    cv: int = 5,
    seed: int = 0,
    n_jobs: int | None = None,
    scan_sources: bool = True,
    sheets: bool = True,
    keep_missing: bool = False,
) -> AuditResult:
    """Find duplicates, split leaks, label conflicts, likely label errors and outliers in a feature set.

    Parameters
    ----------
    cache : path
        An HDF5 cache made by ``tlpipe extract``.
    features : str, optional
        Feature set key (or unique prefix); needed when the cache holds several.
    report : path, optional
        Folder to write the report into (see :func:`write_report`).
    write_exclude : path, optional
        Write the flagged rows' sha256 here (see :func:`write_exclude_file`).
    exclude : path, optional
        An exclude list (``--exclude``) whose rows are left out of this audit too.
    threshold : float
        Cosine similarity (of L2-normalised embeddings) at or above which two images are near duplicates, in
        (0, 1]; default :data:`NEAR_DUPLICATE_COSINE`, measured for MobileNetV2 on photographs (module docstring).
    neighbours : int
        k of the nearest-neighbour graph (duplicate candidates per row; the outlier score's k).
    backend : {"auto", "sklearn", "usearch"}
        Nearest-neighbour search (see :func:`nearest_neighbours`).
    cv : int
        Folds of the label-error head's out-of-fold predictions.
    seed : int
        Shuffles the folds; seeds the head.
    n_jobs : int, optional
        Parallel folds (joblib); None: one.
    scan_sources : bool
        Hash the cache's recorded sources for exact copies (see the module docstring).
    sheets : bool
        Draw contact sheets when writing a report.
    keep_missing : bool
        Audit the rows whose source file is gone or changed since extract too (left out by default, counted in
        ``excluded_missing`` and in a note; :func:`tlpipe.features.cache.read_feature_set`).

    Returns
    -------
    AuditResult

    Raises
    ------
    CacheError
        The cache or feature set cannot be read.
    AuditError
        cleanlab (or usearch, when asked for) is missing, the feature set is empty, or ``threshold`` is not in
        (0, 1].

    Rows whose embedding holds a NaN or an infinity are left out of every finding, named in ``notes`` and
    ``nonfinite``.
    """
    if not 0 < threshold <= 1:  # NaN too
        raise AuditError(
            f"--threshold (threshold) is a cosine similarity of two embeddings: it must be in (0, 1], not {threshold}"
        )
    started = perf_counter()
    _need_cleanlab()
    timings: dict[str, float] = {}
    t = perf_counter()
    try:  # every row, those in a recorded label conflict too: the audit lists them
        fs = read_feature_set(cache, features, exclude=exclude, exclude_conflicts=False, keep_missing=keep_missing)
    except TypeError:  # a cache module without recorded conflicts
        fs = read_feature_set(cache, features, exclude=exclude)
    if len(fs) == 0:
        raise AuditError(f"{cache}: feature set {fs.key} has no rows to audit")
    sources, recorded_conflicts = _read_sources(cache)
    timings["read_s"] = perf_counter() - t
    notes: list[str] = []
    if fs.excluded_missing:
        from tlpipe.features.cache import missing_note

        notes.append(missing_note(fs.excluded_missing))
    from tlpipe.pipeline.heads.estimators import nonfinite_note, nonfinite_rows

    bad = nonfinite_rows(fs.X)
    nonfinite = [str(p) for p in fs.paths[bad]]
    if len(bad):  # no neighbour, cosine or head is defined for them: reported, and left out of the rest
        notes.append(f"{nonfinite_note(len(bad))} (extract them again): " + ", ".join(nonfinite))
        fs = _keep_rows(fs, np.setdiff1d(np.arange(len(fs)), bad))
        if len(fs) == 0:
            raise AuditError(f"{cache}: feature set {fs.key} has no rows with a finite embedding to audit")
    t = perf_counter()
    normalise_rows(fs.X)
    indices, cosines, used = nearest_neighbours(fs.X, neighbours, backend=backend)
    timings["neighbours_s"] = perf_counter() - t
    t = perf_counter()
    copies: dict[int, list[Copy]] = {}
    if scan_sources and sources:
        copies, more = find_exact_copies(sources, fs.sha256, fs.paths)
        notes += more
    elif not sources:
        notes.append("the cache records no sources, so exact copies (which the cache stores once) are not known")
    else:
        notes.append("sources not scanned (scan_sources=False): exact copies are not known")
    _recorded_copies(fs, recorded_conflicts, copies)
    timings["exact_s"] = perf_counter() - t
    t = perf_counter()
    clusters = _clusters(fs, indices, cosines, threshold, copies)
    timings["clusters_s"] = perf_counter() - t
    t = perf_counter()
    issues, head = _label_issues(fs, cv, seed, n_jobs, notes)
    timings["label_issues_s"] = perf_counter() - t
    outliers = _outliers(fs, indices, cosines)
    if used == "usearch":
        notes.append("nearest neighbours by usearch (approximate HNSW search)")
    result = AuditResult(
        cache=str(cache),
        feature_key=fs.key,
        backbone=dict(fs.metadata),
        cache_id=fs.cache_id,
        rows=len(fs),
        excluded=fs.excluded,
        class_names=list(fs.class_names),
        threshold=threshold,
        neighbours=neighbours,
        backend=used,
        clusters=clusters,
        label_issues=issues,
        outliers=outliers,
        flagged=_flag(clusters, issues, outliers),
        notes=notes,
        head=head,
        nearest_cosine=cosines[:, 0] if cosines.shape[1] else np.full(len(fs), -np.inf),
        sources=sources,
        seconds=0.0,
        timings=timings,
        roots=[source_root(s) for s in sources],
        excluded_missing=fs.excluded_missing,
        nonfinite=nonfinite,
    )
    if report is not None:
        from tlpipe.pipeline.reports.audit import write_report  # rendering, only when a report is asked for

        t = perf_counter()
        write_report(result, report, sheets=sheets)
        timings["report_s"] = perf_counter() - t
    if write_exclude is not None:
        write_exclude_file(result, write_exclude)
    result.seconds = perf_counter() - started
    return result


# -- the exclude list --------------------------------------------------------------------------------
def write_exclude_file(result: AuditResult, path: str | os.PathLike) -> Path:
    """Write the flagged rows as an exclude list: one sha256 per line, ``#`` comments (a header saying
    what wrote it, and each row's reasons). ``compare``, ``fit-head`` and ``evaluate`` take it as
    ``--exclude``; it deletes nothing. Returns the path."""
    path = Path(path)
    lines = [
        "# tlpipe exclude list: one sha256 per line; '#' starts a comment",
        f"# written by tlpipe audit {datetime.now(timezone.utc).isoformat(timespec='seconds')} from {result.cache}",
        f"# feature set {result.feature_key}, cache {result.cache_id}: "
        f"{len(result.flagged)} of {result.rows} rows flagged",
        "# use: tlpipe compare CACHE --exclude THIS_FILE (also fit-head, evaluate); nothing is deleted",
    ]
    for sha, reasons in result.flagged.items():
        lines.append(f"{sha}  # {'; '.join(reasons)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def source_roots(cache: str | os.PathLike) -> tuple[list[str], list[str]]:
    """The sources a cache records (folders or manifests, in the order of the rows' ``source`` index) and the
    folder each one's image paths are relative to (:func:`tlpipe.features.cache.source_root`)."""
    sources, _ = _read_sources(cache)
    return sources, [source_root(s) for s in sources]
