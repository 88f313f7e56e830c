"""Which unlabelled rows to label next, from embeddings and (optionally) a head's probabilities: the compute of
``tlpipe suggest``, on arrays (:func:`select`); reading the cache and the head is :mod:`.core`'s.

Strategies (``strategy``):

- ``margin``: the smallest gap between the head's two most probable classes first (uncertainty sampling by
  margin; Scheffer et al. 2001).
- ``entropy``: the highest entropy of the head's probabilities first (normalised by ``log K``).
- ``diverse``: representative and diverse, without looking at the head (typiclust-like; Hacohen et al., "Active
  learning on a budget", ICML 2022): k-means on the embeddings into ``labelled + n`` clusters (at most
  :data:`MAX_CLUSTERS`), the clusters with the fewest labelled photos first (the largest first among equals),
  and from each the most *typical* unlabelled photo (the inverse mean distance to its
  :data:`TYPICAL_NEIGHBOURS` nearest members of the cluster). This is the cold start: without a head every
  strategy but ``margin`` and ``entropy`` (which need one and refuse) makes this pick.
- ``hybrid`` (the default): uncertainty mixed with diversity (Zhdanov, "Diverse mini-batch active learning",
  2019): the :data:`HYBRID_POOL` x ``n`` rows of smallest margin are clustered into ``n`` clusters by k-means
  weighted by their uncertainty (1 - margin), and the row nearest each cluster's centre is picked; so a batch is
  not ``n`` near-copies of one confusing photo.

For every strategy: a row whose embedding is a near duplicate of a labelled row's (cosine of the L2-normalised
embeddings >= ``threshold``, default the audit's measured :data:`~tlpipe.pipeline.audit.checks.NEAR_DUPLICATE_COSINE`,
found with the audit's neighbour search and its backends) is never suggested, and no two picks of a batch are
near duplicates of each other.

Clustering works on the L2-normalised embeddings projected on their first :data:`CLUSTER_DIMS` principal
components (the PCA fitted on at most :data:`PCA_SAMPLE` rows).

**Memory** for N rows x D dimensions, U of them unlabelled, K classes: the embeddings (N·D·4 bytes, normalised in
place when ``copy=False``), the head's probabilities :data:`CHUNK_ROWS` rows at a time (CHUNK_ROWS·K·8 bytes),
O(U) scores, the neighbour search's working set (see :func:`~tlpipe.pipeline.audit.checks.nearest_among`), and for
``diverse`` / ``hybrid`` the projection (N·64·4 bytes) and k-means on it (MiniBatchKMeans above
:data:`EXACT_KMEANS_ROWS` rows). No N x N matrix anywhere.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tlpipe.errors import InputError
from tlpipe.pipeline.audit.checks import NEAR_DUPLICATE_COSINE, nearest_among, normalise_rows

__all__ = [
    "CHUNK_ROWS",
    "CLUSTER_DIMS",
    "EXACT_KMEANS_ROWS",
    "FAR_QUANTILE",
    "HYBRID_POOL",
    "KMEANS_ITERATIONS",
    "MAX_CLUSTERS",
    "PCA_SAMPLE",
    "STRATEGIES",
    "Selection",
    "TYPICAL_NEIGHBOURS",
    "TYPICAL_SAMPLE",
    "project",
    "select",
    "uncertainty",
]

STRATEGIES = ("hybrid", "margin", "entropy", "diverse")
CHUNK_ROWS = 8192  # unlabelled rows scored by the head at a time
CLUSTER_DIMS = 64  # principal components the clustering works on
PCA_SAMPLE = 20_000  # rows the projection is fitted on
EXACT_KMEANS_ROWS = 50_000  # KMeans (Lloyd) up to this many rows, MiniBatchKMeans above
KMEANS_ITERATIONS = 100  # k-means iterations at most (the picks need a partition, not its last decimal)
MAX_CLUSTERS = 500  # diverse: at most this many clusters (typiclust's cap)
TYPICAL_NEIGHBOURS = 20  # typicality: inverse mean distance to this many nearest members of the cluster
TYPICAL_SAMPLE = 2000  # typicality is computed among at most this many members of a cluster (seeded sample)
HYBRID_POOL = 10  # hybrid clusters the HYBRID_POOL * n most uncertain rows
# A pick is "far from every labelled photo" when its nearest labelled photo is less similar than this share of all
# unlabelled photos' nearest labelled photos are (the lowest quarter): Selection.far_cosine.
FAR_QUANTILE = 0.25


@dataclass
class Selection:
    """The rows to label next, best first, and why (numbers; :mod:`.core` words them).

    All per-pick arrays have one entry per pick, in rank order. Class columns are columns of the head's
    ``predict_proba`` (-1 and NaN without a head).
    """

    rows: np.ndarray  # (n,) int64 positions in X
    strategy: str  # the strategy used ("diverse" for a cold start)
    score: np.ndarray  # (n,) float64: margin (margin, hybrid), normalised entropy (entropy), typicality (diverse)
    top: np.ndarray  # (n, 2) int64: the head's two most probable classes (columns)
    top_p: np.ndarray  # (n, 2) float64: their probabilities
    margin: np.ndarray  # (n,) float64: top_p[:, 0] - top_p[:, 1]
    entropy: np.ndarray  # (n,) float64: entropy / log K, in [0, 1]
    nearest_labelled: np.ndarray  # (n,) float64: cosine to the most similar labelled row (-inf: none labelled)
    cluster: np.ndarray  # (n,) int64: the pick's cluster (diverse, hybrid), else -1
    cluster_size: np.ndarray  # (n,) int64: rows in that cluster (0 without)
    cluster_labelled: np.ndarray  # (n,) int64: labelled rows in that cluster (diverse), else 0
    unlabelled: int  # unlabelled rows considered
    duplicates: int  # of them, near duplicates of a labelled row (never suggested)
    batch_duplicates: int  # candidates skipped as near duplicates of an earlier pick of this batch
    backend: str  # the neighbour search's backend ("" when nothing is labelled)
    threshold: float
    far_cosine: float  # the FAR_QUANTILE quantile of the unlabelled rows' nearest_labelled (-inf: none labelled)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)


def uncertainty(
    X: np.ndarray, rows: np.ndarray, predict_proba: Callable[[np.ndarray], np.ndarray], chunk_rows: int = CHUNK_ROWS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The head's two most probable classes, their probabilities, margin and normalised entropy for ``X[rows]``,
    scored ``chunk_rows`` rows at a time (the probabilities of all rows are never held at once).

    Parameters
    ----------
    X : ndarray of shape (N, D)
        Embeddings as the head expects them (not normalised).
    rows : ndarray of shape (U,), int
        The rows to score.
    predict_proba : callable
        (m, D) -> (m, K) class probabilities (a head's ``predict_proba``), K >= 2.
    chunk_rows : int
        Rows per call.

    Returns
    -------
    top : (U, 2) int64 columns of the two most probable classes; top_p : (U, 2) float64 their probabilities;
    margin : (U,) float64; entropy : (U,) float64, divided by log K (1: uniform).
    """
    U = len(rows)
    top, top_p = np.zeros((U, 2), np.int64), np.zeros((U, 2), np.float64)
    entropy = np.zeros(U, np.float64)
    for start in range(0, U, chunk_rows):
        chunk = rows[start : start + chunk_rows]
        P = np.asarray(predict_proba(X[chunk]), dtype=np.float64)
        if P.ndim != 2 or P.shape[1] < 2:
            raise InputError(f"the head's predict_proba gave shape {P.shape}; it must give (rows, classes >= 2)")
        two = np.argpartition(-P, 1, axis=1)[:, :2]
        p = np.take_along_axis(P, two, axis=1)
        swap = p[:, 1] > p[:, 0]
        two[swap], p[swap] = two[swap][:, ::-1], p[swap][:, ::-1]
        top[start : start + len(chunk)], top_p[start : start + len(chunk)] = two, p
        logs = np.log(np.clip(P, 1e-300, None))
        entropy[start : start + len(chunk)] = -(P * logs).sum(axis=1) / np.log(P.shape[1])
    return top, top_p, top_p[:, 0] - top_p[:, 1], entropy


def project(Xn: np.ndarray, seed: int = 0, dims: int = CLUSTER_DIMS, block_rows: int = CHUNK_ROWS) -> np.ndarray:
    """Normalised embeddings (N, D) on their first ``dims`` principal components: (N, min(dims, D, N)) float32.
    The PCA is fitted on at most :data:`PCA_SAMPLE` rows (seeded sample) and applied ``block_rows`` at a time."""
    from sklearn.decomposition import PCA

    n, d = Xn.shape
    k = max(1, min(dims, d, n))
    sample = np.sort(np.random.default_rng(seed).choice(n, PCA_SAMPLE, replace=False)) if n > PCA_SAMPLE else None
    # randomized SVD (seeded): the first components of a 1280-d set in a fraction of a full SVD's time
    pca = PCA(k, svd_solver="randomized", random_state=seed).fit(Xn if sample is None else Xn[sample])
    Z = np.empty((n, k), np.float32)
    for start in range(0, n, block_rows):
        Z[start : start + block_rows] = pca.transform(Xn[start : start + block_rows])
    return Z


def _kmeans(Z: np.ndarray, k: int, seed: int, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """k-means labels and centres (KMeans up to EXACT_KMEANS_ROWS rows, MiniBatchKMeans above; seeded)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.exceptions import ConvergenceWarning

    k = max(1, min(k, len(Z)))
    if len(Z) <= EXACT_KMEANS_ROWS:
        model = KMeans(k, n_init=1, max_iter=KMEANS_ITERATIONS, random_state=seed)
    else:
        model = MiniBatchKMeans(k, n_init=1, max_iter=KMEANS_ITERATIONS, random_state=seed, batch_size=4096)
    with warnings.catch_warnings():
        # near-identical rows (copies of one photo) can leave fewer distinct clusters than asked: harmless here
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(Z, sample_weight=weights)
    return model.labels_.astype(np.int64), model.cluster_centers_


def _typicality(Z: np.ndarray, members: np.ndarray, candidates: np.ndarray, seed: int) -> np.ndarray:
    """Inverse mean distance of each candidate to its TYPICAL_NEIGHBOURS nearest members (itself excluded),
    among at most TYPICAL_SAMPLE members."""
    rng = np.random.default_rng(seed)
    reference = members if len(members) <= TYPICAL_SAMPLE else np.sort(rng.choice(members, TYPICAL_SAMPLE, False))
    R, C = Z[reference].astype(np.float64), Z[candidates].astype(np.float64)
    d2 = (C**2).sum(1)[:, None] + (R**2).sum(1)[None, :] - 2 * C @ R.T
    np.maximum(d2, 0, out=d2)
    d2[candidates[:, None] == reference[None, :]] = np.inf  # a candidate is not its own neighbour
    k = min(TYPICAL_NEIGHBOURS, len(reference) - 1)
    if k < 1:
        return np.ones(len(candidates))
    nearest = np.sqrt(np.partition(d2, k - 1, axis=1)[:, :k])
    mean = np.where(np.isfinite(nearest), nearest, np.nan)
    return 1.0 / (np.nanmean(mean, axis=1) + 1e-12)


class _Batch:
    """The picks of one batch, refusing a candidate that is a near duplicate of an earlier pick."""

    def __init__(self, Xn: np.ndarray, n: int, threshold: float):
        self.Xn, self.n, self.threshold = Xn, n, threshold
        self.rows: list[int] = []
        self.vectors = np.empty((n, Xn.shape[1]), np.float32)
        self.skipped = 0

    def full(self) -> bool:
        return len(self.rows) >= self.n

    def offer(self, row: int) -> bool:
        if self.full() or row in self.rows:
            return False
        if self.rows and float((self.vectors[: len(self.rows)] @ self.Xn[row]).max()) >= self.threshold:
            self.skipped += 1
            return False
        self.vectors[len(self.rows)] = self.Xn[row]
        self.rows.append(int(row))
        return True


def _typical_picks(Xn, Z, labelled_rows, eligible, n, seed, batch: _Batch) -> dict[int, tuple[int, int, int, float]]:
    """diverse: row -> (cluster, size, labelled in it, typicality), picks made through ``batch``."""
    k = min(len(labelled_rows) + n, MAX_CLUSTERS, len(Z))
    labels, _ = _kmeans(Z, k, seed)
    k = int(labels.max()) + 1
    size = np.bincount(labels, minlength=k)
    covered = np.bincount(labels[labelled_rows], minlength=k) if len(labelled_rows) else np.zeros(k, np.int64)
    grouped = eligible[np.argsort(labels[eligible], kind="stable")]
    clusters, starts = np.unique(labels[grouped], return_index=True)
    by_cluster = {int(c): part for c, part in zip(clusters, np.split(grouped, starts[1:]))}
    order: dict[int, list[tuple[int, float]]] = {}  # cluster -> candidates, most typical first (made on first visit)
    picked = np.zeros(k, np.int64)
    info: dict[int, tuple[int, int, int, float]] = {}
    open_clusters = set(by_cluster)
    while not batch.full() and open_clusters:
        # the least covered cluster (labelled rows + picks of this batch), the largest among equals
        c = min(open_clusters, key=lambda c: (covered[c] + picked[c], -size[c], c))
        if c not in order:
            members = np.flatnonzero(labels == c)
            candidates = by_cluster[c]
            if len(candidates) > TYPICAL_SAMPLE:
                candidates = np.sort(np.random.default_rng(seed + c).choice(candidates, TYPICAL_SAMPLE, False))
            typical = _typicality(Z, members, candidates, seed + c)
            ranked = np.lexsort((candidates, -typical))
            order[c] = [(int(candidates[i]), float(typical[i])) for i in ranked]
        while order[c]:
            row, typicality = order[c].pop(0)
            if batch.offer(row):
                info[row] = (c, int(size[c]), int(covered[c]), typicality)
                picked[c] += 1
                break
        if not order[c]:
            open_clusters.discard(c)
    return info


def _hybrid_picks(Xn, Z, eligible, margin_of, n, seed, batch: _Batch) -> dict[int, tuple[int, int]]:
    """hybrid: row -> (cluster, size): uncertainty-weighted k-means over the HYBRID_POOL * n smallest margins,
    the row nearest each centre; clusters left without a pick fall back to the next smallest margin."""
    rng = np.random.default_rng(seed)
    by_margin = eligible[np.lexsort((rng.random(len(eligible)), margin_of[eligible]))]
    pool = by_margin[: HYBRID_POOL * n]
    labels, centres = _kmeans(Z[pool], n, seed, weights=1.0 - margin_of[pool] + 1e-6)
    info: dict[int, tuple[int, int]] = {}
    size = np.bincount(labels, minlength=len(centres))
    # clusters in order of their most uncertain member, so a short batch keeps the most uncertain clusters
    first = {c: int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)}
    for c in sorted(first, key=lambda cluster: first[cluster]):
        members = np.flatnonzero(labels == c)
        distance = ((Z[pool[members]] - centres[c]) ** 2).sum(axis=1)
        for i in members[np.lexsort((members, distance))]:
            if batch.offer(int(pool[i])):
                info[int(pool[i])] = (int(c), int(size[c]))
                break
    for row in by_margin:  # clusters whose members were all near duplicates of earlier picks
        if batch.full():
            break
        if batch.offer(int(row)):
            info[int(row)] = (-1, 0)
    return info


def select(
    X: np.ndarray,
    labelled: np.ndarray,
    n: int,
    *,
    strategy: str = "hybrid",
    predict_proba: Callable[[np.ndarray], np.ndarray] | None = None,
    seed: int = 0,
    threshold: float = NEAR_DUPLICATE_COSINE,
    backend: str = "auto",
    chunk_rows: int = CHUNK_ROWS,
    copy: bool = True,
    projection: np.ndarray | None = None,
) -> Selection:
    """The ``n`` unlabelled rows of ``X`` to label next, best first (see the module for the strategies).

    Parameters
    ----------
    X : ndarray of shape (N, D), float32
        Embeddings of every row, labelled or not, as the head expects them.
    labelled : ndarray of shape (N,), bool
        Which rows carry a label; only the others are ever picked.
    n : int
        Rows to pick (fewer when fewer are eligible; the notes say so).
    strategy : {"hybrid", "margin", "entropy", "diverse"}
        See the module. Without ``predict_proba``, ``hybrid`` and ``diverse`` make the cold start (``diverse``).
    predict_proba : callable, optional
        The head's ``predict_proba``: (m, D) -> (m, K) probabilities. Called on the unlabelled rows,
        ``chunk_rows`` at a time.
    seed : int
        Seeds k-means, the PCA sample and ties: the same inputs and seed give the same picks.
    threshold : float
        Cosine similarity at or above which two photos are near duplicates.
    backend : {"auto", "sklearn", "usearch"}
        The neighbour search (:func:`~tlpipe.pipeline.audit.checks.nearest_among`).
    chunk_rows : int
        Rows scored by the head at a time.
    copy : bool
        False: ``X`` is L2-normalised in place once the head has scored it (saves N·D·4 bytes).
    projection : ndarray of shape (N, k), optional
        :func:`project` of the L2-normalised ``X`` with this ``seed``, when the caller already has it (it depends
        on the embeddings only: a loop over rounds computes it once); made here when needed otherwise.

    Returns
    -------
    Selection

    Raises
    ------
    ValueError
        An unknown strategy, ``n < 1``, shapes that do not match, no unlabelled row, or ``margin`` / ``entropy``
        without ``predict_proba``.
    """
    if strategy not in STRATEGIES:
        raise InputError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if n < 1:
        raise InputError(f"n must be at least 1, not {n}")
    labelled = np.asarray(labelled, dtype=bool)
    if X.ndim != 2 or labelled.shape != (len(X),):
        raise InputError(f"X must be (N, D) and labelled (N,); got {X.shape} and {labelled.shape}")
    unlabelled = np.flatnonzero(~labelled)
    labelled_rows = np.flatnonzero(labelled)
    if not len(unlabelled):
        raise InputError("every row is labelled: nothing to suggest")
    notes: list[str] = []
    used = strategy
    if predict_proba is None:
        if strategy in ("margin", "entropy"):
            raise InputError(
                f"strategy {strategy} ranks by a head's probabilities: give a head, or use diverse / hybrid "
                f"(without a head they make a cold start)"
            )
        used = "diverse"
        if strategy == "hybrid":
            notes.append("no head: a cold start, a diverse and representative batch (typiclust-like clustering)")
    U = len(unlabelled)
    margin_of = np.full(len(X), np.nan)
    entropy_of = np.full(len(X), np.nan)
    top_of = np.full((len(X), 2), -1, np.int64)
    top_p_of = np.full((len(X), 2), np.nan)
    if predict_proba is not None:
        top, top_p, margin, entropy = uncertainty(X, unlabelled, predict_proba, chunk_rows)
        margin_of[unlabelled], entropy_of[unlabelled] = margin, entropy
        top_of[unlabelled], top_p_of[unlabelled] = top, top_p
    Xn = normalise_rows(X.astype(np.float32, copy=copy))
    nearest_of = np.full(len(X), -np.inf)
    searched = ""
    if len(labelled_rows):
        _, cosines, searched = nearest_among(Xn[labelled_rows], Xn[unlabelled], 1, backend=backend)
        nearest_of[unlabelled] = cosines[:, 0]
    eligible = unlabelled[nearest_of[unlabelled] < threshold]
    far = float(np.quantile(nearest_of[unlabelled], FAR_QUANTILE)) if len(labelled_rows) else -np.inf
    duplicates = U - len(eligible)
    if duplicates:
        notes.append(
            f"{duplicates} unlabelled rows are near duplicates of labelled ones (cosine >= {threshold:g}): "
            f"not suggested"
        )
    batch = _Batch(Xn, min(n, len(eligible)), threshold)
    cluster_of: dict[int, tuple] = {}
    rng = np.random.default_rng(seed)
    if used in ("margin", "entropy") and len(eligible):
        key = margin_of[eligible] if used == "margin" else -entropy_of[eligible]
        for row in eligible[np.lexsort((rng.random(len(eligible)), key))]:
            if batch.full():
                break
            batch.offer(int(row))
    elif len(eligible):
        Z = project(Xn, seed) if projection is None else projection
        if len(Z) != len(X):
            raise InputError(f"projection has {len(Z)} rows, X {len(X)}")
        if used == "diverse":
            cluster_of = _typical_picks(Xn, Z, labelled_rows, eligible, batch.n, seed, batch)
        else:
            cluster_of = _hybrid_picks(Xn, Z, eligible, margin_of, batch.n, seed, batch)
    rows = np.asarray(batch.rows, dtype=np.int64)
    if used == "hybrid":  # most uncertain first
        rows = rows[np.lexsort((rows, margin_of[rows]))]
    if len(rows) < n:
        notes.append(f"only {len(rows)} rows could be suggested (of {U} unlabelled, {len(eligible)} eligible)")
    if batch.skipped:
        notes.append(f"{batch.skipped} candidates skipped as near duplicates of an earlier pick of this batch")
    info = [cluster_of.get(int(r), (-1, 0, 0, np.nan)) for r in rows]
    if used == "diverse":
        score = np.array([i[3] for i in info], dtype=np.float64)
    elif used == "entropy":
        score = entropy_of[rows]
    else:
        score = margin_of[rows]
    return Selection(
        rows=rows,
        strategy=used,
        score=score,
        top=top_of[rows],
        top_p=top_p_of[rows],
        margin=margin_of[rows],
        entropy=entropy_of[rows],
        nearest_labelled=nearest_of[rows],
        cluster=np.array([i[0] for i in info], dtype=np.int64),
        cluster_size=np.array([i[1] for i in info], dtype=np.int64),
        cluster_labelled=np.array([i[2] if len(i) > 2 else 0 for i in info], dtype=np.int64),
        unlabelled=U,
        duplicates=int(duplicates),
        batch_duplicates=batch.skipped,
        backend=searched,
        threshold=threshold,
        far_cosine=far,
        notes=notes,
    )
