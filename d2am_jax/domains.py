"""Pseudo-domain discovery on the host: df(x) from DRLM statistics, per-class k-means aligned across
epochs with Kuhn–Munkres, the pseudo/true/random label switch and NMI/MMD diagnostics (no jax).

Paper: "Clustering with Discriminative Domain Representation" and Algorithm 1 lines 2–8. The jitted
stats pass produces, per DRLM, the channel attention a (Eq. 4) and the instance statistics μ, σ
(Eq. 2–3) of F⁻ (Eq. 6) as numpy arrays; everything here works on those arrays and on the bank.

One epoch (``assign``):
  1. standardize the bank (zero mean, unit variance per feature over the whole bank, both classes);
  2. k-means on the live rows and, separately, on the spoof rows (sklearn KMeans, or MiniBatchKMeans
     for very large classes);
  3. give each class's clusters the identity of the previous epoch's labels with Kuhn–Munkres
     (``scipy.optimize.linear_sum_assignment`` maximizing the overlap between new clusters and
     previous labels of the same class), so that live cluster k and spoof cluster k form pseudo
     domain k and labels do not shift more than the data demands.
Epoch 1 (``initial_assignment``): one joint k-means of ImageNet-CNN features fixes the labels and
hence the live/spoof pairing for the later epochs; only where a joint cluster lacks a class are
the per-class clusters aligned to it used instead (with a warning). Every assignment reports the
pseudo domains whose live or spoof part is below ``min_class_size`` ('degenerate_domains').

Label identity never depends on the arbitrary numbering k-means returns: every partition is first
renumbered canonically (larger clusters first, ties by their first member's row), then aligned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import normalized_mutual_info_score, pairwise_distances, silhouette_score
from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

log = logging.getLogger(__name__)

SELECT_MODES = ("dataset", "sample", "none")
ALGORITHMS = ("auto", "full", "minibatch")
LABEL_MODES = ("pseudo", "true", "random")
STATS_KEYS = ("attention", "mean", "std")

# 'auto' switches to MiniBatchKMeans when one class holds more than this many values (rows ×
# features). Measured here: full KMeans (n_init=3) on 100,000 × 384 takes ~5 s per class, so the
# switch only matters well beyond the paper's data sizes (see experiments/bench/clustering.py).
MINIBATCH_ABOVE = 100_000_000
# 4096 rows per step: on 100k × 384 as fast as full KMeans and NMI ≥ 0.999 against it; sklearn's
# default of 1024 took ~3× longer for the same result.
MINIBATCH_BATCH_SIZE = 4096
# Full Lloyd iterations that refine MiniBatchKMeans' centres (they converge in ~3 on the bench).
POLISH_ITERATIONS = 20
# Below this many values (rows × features) k-means runs on one thread (see _threads_for).
SINGLE_THREAD_BELOW = 1_000_000
# Epoch 1: the live/spoof pairing is called weak when, in either class, fewer than this share of
# samples keep their joint-cluster label under the per-class clustering aligned to it (chance is
# about 1/K); epoch 2 clusters per class and aligns to epoch 1, so a weak pairing there is lost.
WEAK_PAIRING_BELOW = 0.5


@dataclasses.dataclass(frozen=True)
class AssignResult:
    """labels: int32 [n], the pseudo domain of every sample; diagnostics: JSON-ready, for logs."""

    labels: np.ndarray
    diagnostics: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class KChoice:
    """The chosen number of domains and the silhouette score of every K tried."""

    k: int
    scores: dict[int, float]


# ----------------------------------------------------------------------------- domain features


def select_channels(attention, mode: str = "dataset", fraction: float = 0.5) -> np.ndarray:
    """Channel indices of F⁻ that form F_d⁻: the ``fraction`` of channels with the lowest attention.

    attention: [n, C] per-sample DRLM attention a (Eq. 4). The paper sorts a ascending and keeps the
    first C/2 channels; its wording fits one set for the whole data or one set per sample, so:
      'dataset' → int [m]: the m channels of lowest MEAN attention over all samples (default), in
                  ascending order of mean attention;
      'sample'  → int [n, m]: each sample's own m lowest-attention channels, in ascending order of
                  that sample's attention. Different samples then keep different channels, so the
                  features built from them are compared by attention RANK (position p = the
                  sample's p-th least-attended channel), not by channel identity;
      'none'    → int [C]: every channel, in channel order (the paper's "w/o select" ablation;
                  ``fraction`` is ignored).
    m = floor(C · fraction), at least 1.
    """
    a = np.asarray(attention)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"attention: expected a non-empty [n, C] array, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"attention: expected numbers, got dtype {a.dtype}")
    _check_finite(a, "attention")
    if mode not in SELECT_MODES:
        raise ValueError(f"mode: expected one of {SELECT_MODES}, got {mode!r}")
    num_channels = a.shape[1]
    if mode == "none":
        return np.arange(num_channels)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction: expected a value in (0, 1], got {fraction}")
    keep = int(num_channels * fraction)
    if keep < 1:
        raise ValueError(
            f"fraction: {fraction} of {num_channels} channels keeps none; expected at least one"
        )
    if mode == "dataset":
        return np.argsort(a.mean(axis=0), kind="stable")[:keep]
    return np.argsort(a, axis=1, kind="stable")[:, :keep]


def domain_features(
    drlm_stats: Sequence[Mapping[str, Any]], mode: str = "dataset", fraction: float = 0.5
) -> np.ndarray:
    """The bank [n, d] float32 of df(x) = {μ(F_d,1⁻), σ(F_d,1⁻), …, μ(F_d,M⁻), σ(F_d,M⁻)}.

    drlm_stats: one dict per DRLM with 'attention', 'mean', 'std', each [n, C_j] (the stats pass's
    output). The channels of every DRLM are chosen by ``select_channels(attention, mode,
    fraction)``; d = Σ_j 2·m_j.
    """
    if isinstance(drlm_stats, Mapping) or len(drlm_stats) == 0:
        raise ValueError("drlm_stats: expected a non-empty list with one dict per DRLM")
    parts, num_samples = [], None
    for j, stats in enumerate(drlm_stats):
        attention, mean, std = _checked_drlm_arrays(stats, j)
        if num_samples is not None and attention.shape[0] != num_samples:
            raise ValueError(
                f"drlm_stats[{j}]: {attention.shape[0]} samples, "
                f"but drlm_stats[0] has {num_samples}"
            )
        num_samples = attention.shape[0]
        try:
            channels = select_channels(attention, mode, fraction)
        except ValueError as err:
            raise ValueError(f"drlm_stats[{j}]: {err}") from err
        parts += [_gathered(mean, channels), _gathered(std, channels)]
    return np.concatenate(parts, axis=1).astype(np.float32)


def _checked_drlm_arrays(stats, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not isinstance(stats, Mapping):
        raise ValueError(
            f"drlm_stats[{j}]: expected a dict with keys {STATS_KEYS}, got {type(stats)}"
        )
    missing = [key for key in STATS_KEYS if key not in stats]
    if missing:
        raise ValueError(f"drlm_stats[{j}]: missing keys {missing}; expected {STATS_KEYS}")
    arrays = tuple(np.asarray(stats[key]) for key in STATS_KEYS)
    shapes = {key: array.shape for key, array in zip(STATS_KEYS, arrays)}
    if len(set(shapes.values())) != 1 or arrays[0].ndim != 2:
        raise ValueError(
            f"drlm_stats[{j}]: expected three equal [n, C] arrays, got shapes {shapes}"
        )
    return arrays


def _gathered(values: np.ndarray, channels: np.ndarray) -> np.ndarray:
    if channels.ndim == 1:
        return values[:, channels]
    return np.take_along_axis(values, channels, axis=1)


# ----------------------------------------------------------------------------- input checks


def _check_finite(array: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(array)
    if bad.any():
        rows = np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))
        raise ValueError(
            f"{name}: {int(bad.sum())} non-finite values (NaN/inf) in {rows.size} rows; "
            f"first at row {int(rows[0])}. Expected finite numbers"
        )


def standardized(bank) -> np.ndarray:
    """The bank as a new float64 array with zero mean and unit variance per feature (fit on itself).

    float64 on purpose: sklearn's k-means++ seeding on float32 goes through a slow chunked upcast
    (2.5 s vs 0.2 s on 100k × 384). Plain numpy rather than StandardScaler: same result, in place,
    1.5 s instead of 4 s on 200k × 384. A feature that is constant up to rounding becomes exactly 0
    (as StandardScaler leaves it) instead of amplified rounding noise.
    """
    x = np.array(bank, dtype=np.float64) if _is_numeric(bank) else None
    if x is None or x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        shape = np.shape(bank) if x is None else x.shape
        raise ValueError(f"bank: expected a non-empty numeric [n, d] array, got shape {shape}")
    _check_finite(x, "bank")
    mean = x.mean(axis=0)
    x -= mean
    scale = np.sqrt(np.einsum("ij,ij->j", x, x) / x.shape[0])
    constant = scale <= 1e-12 * np.maximum(1.0, np.abs(mean))
    scale[constant] = 1.0
    x[:, constant] = 0.0
    x /= scale
    return x


def _is_numeric(values) -> bool:
    kind = np.asarray(values).dtype.kind
    return kind in "biuf"


def _checked_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k: expected an integer number of domains ≥ 2, got {k!r}")
    if k < 2:
        raise ValueError(f"k: expected at least 2 domains (K−1 meta-train + 1 meta-test), got {k}")
    return int(k)


def _checked_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def _checked_nonnegative_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
    return int(value)


def _num_samples(is_live) -> int:
    array = np.asarray(is_live)
    if array.ndim != 1:
        raise ValueError(f"is_live: expected a 1-D array (one entry per sample), got {array.shape}")
    return array.shape[0]


def _checked_is_live(is_live, n: int) -> np.ndarray:
    array = np.asarray(is_live)
    if array.ndim != 1 or array.shape[0] != n:
        raise ValueError(
            f"is_live: expected {n} entries (one per bank row), got shape {array.shape}"
        )
    if array.dtype == bool:
        return array
    if array.dtype.kind not in "iuf" or not np.isin(array, (0, 1)).all():
        raise ValueError("is_live: expected booleans or 0 (spoof) / 1 (live)")
    return array.astype(bool)


def _checked_labels(labels, n: int, k: int, name: str) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or array.shape[0] != n:
        raise ValueError(
            f"{name}: expected {n} entries (one per bank row), got shape {array.shape}"
        )
    if array.dtype.kind not in "iu":
        raise ValueError(f"{name}: expected integer domain labels, got dtype {array.dtype}")
    bad = (array < 0) | (array >= k)
    if bad.any():
        raise ValueError(
            f"{name}: expected labels in 0..{k - 1}; {int(bad.sum())} are not, "
            f"first at row {int(np.flatnonzero(bad)[0])} (value {int(array[bad][0])})"
        )
    return array.astype(np.int64)


def _checked_class_sizes(is_live: np.ndarray, k: int) -> None:
    for name, count in (("live", int(is_live.sum())), ("spoof", int((~is_live).sum()))):
        if count < k:
            raise ValueError(
                f"is_live: the {name} class has {count} samples, fewer than K={k}; every pseudo "
                f"domain needs live and spoof samples"
            )


def _true_domain_codes(true_domain, n: int) -> tuple[np.ndarray, list]:
    """True domain labels → (codes 0..T−1 in sorted-name order, names). Missing: None, '' or NaN."""
    array = np.asarray(true_domain)
    if array.ndim != 1 or array.shape[0] != n:
        raise ValueError(
            f"true_domain: expected {n} entries (one per bank row), got shape {array.shape}"
        )
    missing = _missing_mask(array)
    if missing.any():
        raise ValueError(
            f"true_domain: {int(missing.sum())} of {n} samples have no domain label; first at row "
            f"{int(np.flatnonzero(missing)[0])}. Expected a domain for every sample"
        )
    if array.dtype == object:
        array = array.astype(str)
    names, codes = np.unique(array, return_inverse=True)
    return codes.astype(np.int64), names.tolist()


def _missing_mask(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind == "f":
        return np.isnan(array)
    if array.dtype.kind in "OUS":
        return np.array([_is_missing(value) for value in array.tolist()], dtype=bool)
    return np.zeros(array.shape, dtype=bool)


def _is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return bool(np.isnan(value))
    if isinstance(value, (str, bytes)):
        return not value.strip()
    return False


def _seed_for(seed: int, *keys: int) -> int:
    """A sklearn random_state derived from (seed, keys): one independent stream per use."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint32)[0])


# ----------------------------------------------------------------------------- k-means


def _resolved_algorithm(algorithm: str, num_values: int) -> str:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm == "auto":
        return "minibatch" if num_values > MINIBATCH_ABOVE else "full"
    return algorithm


def _kmeans_labels(x: np.ndarray, k: int, *, seed: int, n_init: int, algorithm: str) -> np.ndarray:
    """sklearn's raw k-means partition of x (numbering arbitrary; a cluster may be empty)."""
    # copy_x=False: sklearn centres x in place and restores it; every x here is a private copy,
    # and skipping sklearn's own copy saves ~1 s per class at 100k × 384.
    with warnings.catch_warnings(), _threads_for(x):
        # "Number of distinct clusters found smaller than n_clusters": _filled_empty_clusters
        # repairs that case or raises a clear error, so sklearn's warning adds nothing.
        warnings.simplefilter("ignore", ConvergenceWarning)
        if algorithm == "full":
            model = KMeans(n_clusters=k, n_init=n_init, random_state=seed, copy_x=False)
            return model.fit(x).labels_.astype(np.int64)
        centres = MiniBatchKMeans(
            n_clusters=k, n_init=n_init, random_state=seed, batch_size=MINIBATCH_BATCH_SIZE,
            compute_labels=False,
        ).fit(x).cluster_centers_
        # Mini-batch centres are noisy; a few full Lloyd passes from them reach the partition full
        # KMeans finds (NMI vs full 0.988 → 0.998 on the bench data) for a few passes over x.
        polish = KMeans(n_clusters=k, init=centres, n_init=1, max_iter=POLISH_ITERATIONS,
                        copy_x=False)
        return polish.fit(x).labels_.astype(np.int64)


def _threads_for(x: np.ndarray):
    """One OpenMP thread for small inputs, sklearn's default otherwise.

    sklearn's Lloyd loop synchronizes its threads every iteration; on small data that costs more
    than it saves, and on a loaded machine far more (600 × 16: 0.13 s with one thread, 1.5 s with
    two on a busy 2-core host).
    """
    if x.size < SINGLE_THREAD_BELOW:
        return threadpool_limits(limits=1, user_api="openmp")
    return contextlib.nullcontext()


def _clusters(
    x: np.ndarray, k: int, *, seed: int, n_init: int, algorithm: str, name: str
) -> tuple[np.ndarray, int]:
    """k non-empty clusters of x in canonical numbering, and how many empty clusters were split."""
    raw = _kmeans_labels(x, k, seed=seed, n_init=n_init, algorithm=algorithm)
    filled, splits = _filled_empty_clusters(x, raw, k, seed=seed, name=name)
    return _canonical(filled, k), splits


def _filled_empty_clusters(
    x: np.ndarray, labels: np.ndarray, k: int, *, seed: int, name: str
) -> tuple[np.ndarray, int]:
    """labels with no empty cluster: each empty one takes half of the largest splittable cluster.

    k-means can leave a cluster empty (MiniBatchKMeans, or rows that repeat), yet every pseudo
    domain needs samples of both classes. The largest cluster whose rows are not all identical is
    split by 2-means (seeded) and one half becomes the empty cluster. If no cluster can be split,
    the rows hold fewer than k distinct points and no k-way partition exists: ValueError.
    """
    labels = labels.copy()
    splits = 0
    while True:
        counts = np.bincount(labels, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if empty.size == 0:
            return labels, splits
        donor = _splittable_cluster(x, labels, counts)
        if donor is None:
            distinct = np.unique(x, axis=0).shape[0]
            raise ValueError(
                f"bank: the {name} samples have only {distinct} distinct feature rows, fewer than "
                f"K={k}; k-means cannot form {k} non-empty clusters"
            )
        members = np.flatnonzero(labels == donor)
        labels[members[_split_half(x[members], seed)]] = empty[0]
        splits += 1


def _splittable_cluster(x: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> int | None:
    for cluster in np.argsort(-counts, kind="stable"):
        if counts[cluster] >= 2 and np.ptp(x[labels == cluster], axis=0).max() > 0:
            return int(cluster)
    return None


def _split_half(rows: np.ndarray, seed: int) -> np.ndarray:
    """Boolean mask of one side of a 2-means split of rows (which are not all identical)."""
    with warnings.catch_warnings(), _threads_for(rows):
        warnings.simplefilter("ignore", ConvergenceWarning)
        side = KMeans(n_clusters=2, n_init=1, random_state=seed).fit(rows).labels_ == 1
    if side.all() or not side.any():  # degenerate split: peel off the row farthest from the mean
        side = np.zeros(rows.shape[0], dtype=bool)
        side[np.argmax(((rows - rows.mean(axis=0)) ** 2).sum(axis=1))] = True
    return side


def _canonical(labels: np.ndarray, k: int) -> np.ndarray:
    """The same partition renumbered independently of k-means: larger first, ties by first row."""
    counts = np.bincount(labels, minlength=k)
    _, first_rows = np.unique(labels, return_index=True)
    order = np.lexsort((first_rows, -counts))  # order[i] = old cluster that becomes cluster i
    new_of_old = np.empty(k, dtype=np.int64)
    new_of_old[order] = np.arange(k)
    return new_of_old[labels]


def _aligned_to_previous(clusters: np.ndarray, previous: np.ndarray, k: int) -> np.ndarray:
    """Kuhn–Munkres: cluster c takes the previous label it shares most samples with (in total)."""
    overlap = np.bincount(clusters * k + previous, minlength=k * k).reshape(k, k)
    rows, cols = linear_sum_assignment(overlap, maximize=True)
    mapping = np.empty(k, dtype=np.int64)
    mapping[rows] = cols
    return mapping[clusters]


def _centroids(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    return np.stack([x[labels == cluster].mean(axis=0) for cluster in range(k)])


def _aligned_to_centroids(
    x: np.ndarray, clusters: np.ndarray, reference_centroids: np.ndarray, k: int
) -> np.ndarray:
    """Kuhn–Munkres on squared centroid distances: cluster c takes the nearest reference domain."""
    cost = pairwise_distances(_centroids(x, clusters, k), reference_centroids, metric="sqeuclidean")
    rows, cols = linear_sum_assignment(cost)
    mapping = np.empty(k, dtype=np.int64)
    mapping[rows] = cols
    return mapping[clusters]


# ----------------------------------------------------------------------------- assignment


def assign(
    bank,
    is_live,
    k: int,
    *,
    prev_labels=None,
    seed: int,
    n_init: int = 10,  # configs/default.py: domains.n_init (why 10)
    algorithm: str = "auto",
    true_domain=None,
    mmd_sample_size: int = 2000,
    min_class_size: int = 1,
) -> AssignResult:
    """Pseudo domains for one epoch (Algorithm 1 line 7): per-class k-means, Kuhn–Munkres aligned.

    bank: [n, d] df(x) of every source sample; is_live: [n] bool (or 0/1, 1 = live); k: K ≥ 2;
    prev_labels: [n] last epoch's pseudo domains in 0..K−1 (from ``initial_assignment`` in epoch
    2). Without prev_labels there is nothing to keep labels stable against: live clusters are
    numbered canonically and each spoof cluster is paired with the live cluster whose centroid is
    nearest (Kuhn–Munkres on centroid distances); diagnostics['alignment'] says which was used.
    algorithm: 'full' (KMeans), 'minibatch' (MiniBatchKMeans, its centres then refined by at most
    POLISH_ITERATIONS full Lloyd passes) or 'auto' (minibatch only when a class exceeds
    MINIBATCH_ABOVE values). true_domain: optional [n] dataset/domain names, for
    diagnostics only. min_class_size: see ``assignment_diagnostics``. The result depends only on
    the inputs and seed.
    """
    x = standardized(bank)
    n = x.shape[0]
    k = _checked_k(k)
    live = _checked_is_live(is_live, n)
    previous = None if prev_labels is None else _checked_labels(prev_labels, n, k, "prev_labels")
    true_codes = None if true_domain is None else _true_domain_codes(true_domain, n)[0]
    seed = _checked_nonnegative_int(seed, "seed")
    n_init = _checked_positive_int(n_init, "n_init")
    _checked_class_sizes(live, k)
    algorithm = _resolved_algorithm(algorithm, max(live.sum(), (~live).sum()) * x.shape[1])
    labels, splits = _per_class_labels(x, live, k, previous, seed, n_init, algorithm)
    diagnostics = assignment_diagnostics(
        x, labels, k, is_live=live, prev_labels=previous, true_domain=true_codes, seed=seed,
        mmd_sample_size=mmd_sample_size, min_class_size=min_class_size,
    )
    diagnostics.update(
        mode="pseudo",
        algorithm=algorithm,
        alignment="previous_labels" if previous is not None else "live_spoof_centroids",
        empty_cluster_splits=splits,
    )
    if previous is None:
        diagnostics["alignment_note"] = (
            "no previous labels: spoof clusters were paired with live clusters by nearest "
            "centroids; normally epoch 1's initial_assignment provides prev_labels"
        )
    return AssignResult(labels.astype(np.int32), diagnostics)


def _per_class_labels(
    x: np.ndarray,
    live: np.ndarray,
    k: int,
    previous: np.ndarray | None,
    seed: int,
    n_init: int,
    algorithm: str,
) -> tuple[np.ndarray, dict[str, int]]:
    labels = np.empty(x.shape[0], dtype=np.int64)
    splits, clustered = {}, {}
    for class_id, (name, mask) in enumerate((("live", live), ("spoof", ~live))):
        rows = np.flatnonzero(mask)
        clusters, splits[name] = _clusters(
            x[rows], k, seed=_seed_for(seed, class_id), n_init=n_init, algorithm=algorithm,
            name=name,
        )
        clustered[name] = (rows, clusters)
    if previous is not None:
        for rows, clusters in clustered.values():
            labels[rows] = _aligned_to_previous(clusters, previous[rows], k)
        return labels, splits
    live_rows, live_clusters = clustered["live"]
    spoof_rows, spoof_clusters = clustered["spoof"]
    labels[live_rows] = live_clusters
    labels[spoof_rows] = _aligned_to_centroids(
        x[spoof_rows], spoof_clusters, _centroids(x[live_rows], live_clusters, k), k
    )
    return labels, splits


def initial_assignment(
    imagenet_bank,
    k: int,
    *,
    seed: int,
    n_init: int = 10,
    algorithm: str = "auto",
    is_live=None,
    per_class: bool | str = "auto",
    true_domain=None,
    mmd_sample_size: int = 2000,
    min_class_size: int = 1,
) -> AssignResult:
    """Epoch-1 pseudo domains: one JOINT k-means of ImageNet-CNN features (live and spoof together).

    The paper clusters all samples jointly in the first epoch "for correct positive and negative
    domain matching" (Algorithm 1 line 5); these labels are the prev_labels of epoch 2. Domains are
    numbered canonically (largest first). With is_live given, a joint cluster that holds no live
    or no spoof sample cannot feed balanced meta-batches; per_class says what then:
      'auto' (default) — the joint clusters as they are when every one holds both classes;
                 otherwise each class is clustered separately and aligned to the joint clusters
                 with Kuhn–Munkres (as ``assign`` does with prev_labels), with a warning that
                 names the joint cluster sizes;
      False    — the joint clusters or a ValueError;  True — the per-class alignment always.
    With is_live the record also says how well the two agree ('pairing_agreement': per class, the
    share of samples whose per-class label equals the joint one; 'pairing_weak' below
    WEAK_PAIRING_BELOW), i.e. how much of the joint pairing per-class clustering keeps; its
    nmi_previous / agreement_previous compare the labels used with the joint clustering (1.0 when
    they are the joint clusters).
    """
    x = standardized(imagenet_bank)
    n = x.shape[0]
    k = _checked_k(k)
    seed = _checked_nonnegative_int(seed, "seed")
    n_init = _checked_positive_int(n_init, "n_init")
    live = None if is_live is None else _checked_is_live(is_live, n)
    true_codes = None if true_domain is None else _true_domain_codes(true_domain, n)[0]
    if per_class not in (True, False, "auto"):
        raise ValueError(f"per_class: expected True, False or 'auto', got {per_class!r}")
    if per_class is True and live is None:
        raise ValueError("per_class=True needs is_live to cluster each class separately")
    if n < k:
        raise ValueError(f"imagenet_bank: {n} samples, fewer than K={k}")
    algorithm = _resolved_algorithm(algorithm, x.size)
    joint, joint_splits = _clusters(
        x, k, seed=_seed_for(seed, 2), n_init=n_init, algorithm=algorithm, name="all"
    )
    labels, splits, alignment, pairing = joint, {"all": joint_splits}, "joint", {}
    if live is not None:
        lacking = _domains_lacking_a_class(joint, live, k)
        if lacking and per_class is False:
            _check_every_domain_has_both_classes(joint, live, k, "the joint ImageNet clustering")
        _checked_class_sizes(live, k)
        aligned, class_splits = _per_class_labels(x, live, k, joint, seed, n_init, algorithm)
        splits.update(class_splits)
        pairing = _pairing(aligned, joint, live)
        if pairing["pairing_weak"]:
            log.warning("epoch 1: %s", pairing["pairing_note"])
        if per_class is True or lacking:
            labels, alignment = aligned, "per_class_to_joint"
        if lacking and per_class == "auto":
            log.warning(
                "epoch 1: the joint ImageNet clustering gives domains %s no live or no spoof "
                "sample (sizes [live, spoof] per domain: %s); using per-class clusters aligned to "
                "it instead (agreement with the joint labels: live %.2f, spoof %.2f)", lacking,
                _cluster_sizes(joint, live, k), pairing["pairing_agreement"]["live"],
                pairing["pairing_agreement"]["spoof"])
    diagnostics = assignment_diagnostics(
        x, labels, k, is_live=live, prev_labels=None if live is None else joint,
        true_domain=true_codes, seed=seed, mmd_sample_size=mmd_sample_size,
        min_class_size=min_class_size,
    )
    diagnostics.update(
        mode="initial",
        algorithm=algorithm,
        alignment=alignment,
        empty_cluster_splits=splits,
        joint_cluster_sizes=None if live is None else _cluster_sizes(joint, live, k),
        **pairing,
    )
    return AssignResult(labels.astype(np.int32), diagnostics)


def _domains_lacking_a_class(labels: np.ndarray, live: np.ndarray, k: int) -> list[int]:
    return [d for d, (n_live, n_spoof) in enumerate(_cluster_sizes(labels, live, k))
            if n_live == 0 or n_spoof == 0]


def _pairing(aligned: np.ndarray, joint: np.ndarray, live: np.ndarray) -> dict[str, Any]:
    """How much of the joint clustering's live/spoof pairing the per-class clustering keeps."""
    agreement = {name: float(np.mean(aligned[mask] == joint[mask]))
                 for name, mask in (("live", live), ("spoof", ~live))}
    weak = min(agreement.values()) < WEAK_PAIRING_BELOW
    out: dict[str, Any] = {"pairing_agreement": agreement, "pairing_weak": bool(weak)}
    if weak:
        out["pairing_note"] = (
            f"weak live/spoof pairing: per-class clusters agree with the joint ImageNet clusters "
            f"on {agreement['live']:.2f} of live and {agreement['spoof']:.2f} of spoof samples "
            f"(below {WEAK_PAIRING_BELOW}); live domain j and spoof domain j may not share a scene"
        )
    return out


def _check_every_domain_has_both_classes(
    labels: np.ndarray, live: np.ndarray, k: int, source: str
) -> None:
    sizes = _cluster_sizes(labels, live, k)
    lacking = _domains_lacking_a_class(labels, live, k)
    if lacking:
        raise ValueError(
            f"{source} gives domains {lacking} no live or no spoof sample (sizes [live, spoof] "
            f"per domain: {sizes}); balanced meta-batches need both. For the initial assignment, "
            f"per_class='auto' or True clusters each class and aligns it to the joint clusters"
        )


def choose_k(
    bank,
    k_range: Sequence[int] = range(2, 7),
    *,
    seed: int,
    sample_size: int = 4000,
    n_init: int = 3,
) -> KChoice:
    """K by pre-clustering (Algorithm 1 line 2): the K with the best silhouette score.

    Uses a seeded subsample of ``sample_size`` standardized rows (k-means and the silhouette both
    run on it; the distance matrix is computed once for all K). Ties go to the smaller K.
    """
    x = standardized(bank)
    seed = _checked_nonnegative_int(seed, "seed")
    ks = [_checked_k(k) for k in k_range]
    if not ks:
        raise ValueError("k_range: expected at least one K to try")
    rng = np.random.default_rng((seed, 3))
    rows = np.sort(rng.choice(x.shape[0], min(x.shape[0], sample_size), replace=False))
    sample = x[rows]
    if max(ks) >= sample.shape[0]:
        raise ValueError(
            f"k_range: K={max(ks)} needs more than {max(ks)} samples for a silhouette score; "
            f"the subsample has {sample.shape[0]}"
        )
    distances = pairwise_distances(sample)
    np.fill_diagonal(distances, 0.0)
    scores = {}
    for k in ks:
        clusters, _ = _clusters(
            sample, k, seed=_seed_for(seed, 4, k), n_init=n_init, algorithm="full", name="all"
        )
        scores[k] = float(silhouette_score(distances, clusters, metric="precomputed"))
    best = max(ks, key=lambda k: (scores[k], -k))
    return KChoice(k=best, scores=scores)


def domain_labels(
    mode: str,
    *,
    is_live,
    seed: int,
    epoch: int,
    k: int | None = None,
    bank=None,
    prev_labels=None,
    true_domain=None,
    n_init: int = 3,
    algorithm: str = "auto",
    mmd_sample_size: int = 2000,
    min_class_size: int = 1,
) -> AssignResult:
    """Domain labels for one epoch under the ablation switch (paper Table 3).

    'pseudo' → D²AM: ``assign(bank, …)`` with a k-means seed derived from (seed, epoch);
    'true'   → "w/ d": the data's own domain labels (names sorted, mapped to 0..K−1); K is their
               count (k, if given, must match); every domain must hold live and spoof samples;
    'random' → "w/o d": each class dealt round-robin into K domains after a shuffle seeded by
               (seed, epoch), so every domain gets ⌊n_c/K⌋ or ⌈n_c/K⌉ samples of class c.
    Diagnostics have the same keys in every mode ('mmd2_pseudo' then describes the labels handed
    out); MMD entries are None when no bank is given.
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"domain_labels mode: expected one of {LABEL_MODES}, got {mode!r}")
    seed = _checked_nonnegative_int(seed, "seed")
    epoch = _checked_nonnegative_int(epoch, "epoch")
    epoch_seed = _seed_for(seed, 5, epoch)
    if mode == "pseudo":
        if bank is None or k is None:
            raise ValueError("domain_labels('pseudo') needs the bank of domain features and k")
        return assign(
            bank, is_live, k, prev_labels=prev_labels, seed=epoch_seed, n_init=n_init,
            algorithm=algorithm, true_domain=true_domain, mmd_sample_size=mmd_sample_size,
            min_class_size=min_class_size,
        )
    x = None if bank is None else standardized(bank)
    n = x.shape[0] if x is not None else _num_samples(is_live)
    live = _checked_is_live(is_live, n)
    true_codes, names = (None, None)
    if true_domain is not None:
        true_codes, names = _true_domain_codes(true_domain, n)
    if mode == "true":
        labels, k = _true_labels(true_codes, names, live, k)
    else:
        if k is None:
            raise ValueError("domain_labels('random') needs k")
        k = _checked_k(k)
        _checked_class_sizes(live, k)
        labels = _random_balanced_labels(live, k, np.random.default_rng((seed, epoch)))
    previous = None if prev_labels is None else _checked_labels(prev_labels, n, k, "prev_labels")
    diagnostics = assignment_diagnostics(
        x, labels, k, is_live=live, prev_labels=previous, true_domain=true_codes,
        seed=epoch_seed, mmd_sample_size=mmd_sample_size, min_class_size=min_class_size,
    )
    diagnostics.update(mode=mode, algorithm=None, alignment=None, empty_cluster_splits=None)
    if mode == "true":
        diagnostics["domain_names"] = names
    return AssignResult(labels.astype(np.int32), diagnostics)


def _true_labels(codes, names, live: np.ndarray, k: int | None) -> tuple[np.ndarray, int]:
    if codes is None:
        raise ValueError(
            "domain_labels('true') (the 'w/ d' ablation) needs true domain labels, but the data "
            "has none (e.g. the manifest has no 'domain' column)"
        )
    if len(names) < 2:
        raise ValueError(f"true_domain: expected at least 2 domains, got only {names}")
    if k is not None and _checked_k(k) != len(names):
        raise ValueError(f"k={k}, but the data has {len(names)} true domains {names}")
    _check_every_domain_has_both_classes(codes, live, len(names), f"true_domain {names}")
    return codes, len(names)


def _random_balanced_labels(live: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    labels = np.empty(live.shape[0], dtype=np.int64)
    for mask in (live, ~live):
        rows = rng.permutation(np.flatnonzero(mask))
        labels[rows] = np.arange(rows.size) % k
    return labels


# ----------------------------------------------------------------------------- diagnostics


def _cluster_sizes(labels: np.ndarray, live: np.ndarray, k: int) -> list[list[int]]:
    live_counts = np.bincount(labels[live], minlength=k)
    spoof_counts = np.bincount(labels[~live], minlength=k)
    return [[int(a), int(b)] for a, b in zip(live_counts, spoof_counts)]


def assignment_diagnostics(
    x: np.ndarray | None,
    labels: np.ndarray,
    k: int,
    *,
    is_live: np.ndarray | None,
    prev_labels: np.ndarray | None,
    true_domain: np.ndarray | None,
    seed: int,
    mmd_sample_size: int = 2000,
    min_class_size: int = 1,
) -> dict[str, Any]:
    """Per-epoch numbers for logging (paper Fig. 7), all JSON-ready.

    cluster_sizes: per domain [live, spoof] (None without is_live); domain_sizes: per domain;
    degenerate_domains: [{domain, live, spoof}] for each domain whose live or spoof part holds
    fewer than min_class_size samples (each logged as a warning: the sampler fills its half of a
    domain batch with repeats of those few); None without is_live;
    nmi_previous / agreement_previous: NMI and fraction of equal labels vs prev_labels;
    nmi_true_domain: NMI vs the true domains; mmd2_pseudo / mmd2_true: mean over domain pairs of
    the unbiased MMD² between domains (Gaussian kernel, median-heuristic bandwidth shared by both,
    on the standardized bank x; pairs matrices alongside). None where the input is missing.
    """
    diagnostics: dict[str, Any] = {
        "k": int(k),
        "domain_sizes": np.bincount(labels, minlength=k).tolist(),
        "cluster_sizes": None if is_live is None else _cluster_sizes(labels, is_live, k),
        "min_class_size": int(min_class_size),
        "degenerate_domains": None,
        "nmi_previous": None,
        "agreement_previous": None,
        "nmi_true_domain": None,
        "mmd2_pseudo": None,
        "mmd2_pseudo_pairs": None,
        "mmd2_true": None,
        "mmd2_true_pairs": None,
        "mmd_gamma": None,
    }
    if is_live is not None:
        diagnostics["degenerate_domains"] = _degenerate(diagnostics["cluster_sizes"],
                                                        min_class_size)
    if prev_labels is not None:
        diagnostics["nmi_previous"] = float(normalized_mutual_info_score(prev_labels, labels))
        diagnostics["agreement_previous"] = float(np.mean(prev_labels == labels))
    if true_domain is not None:
        diagnostics["nmi_true_domain"] = float(normalized_mutual_info_score(true_domain, labels))
    if x is None:
        return diagnostics
    gamma = median_heuristic_gamma(x, seed=seed)
    diagnostics["mmd_gamma"] = gamma
    mean, pairs = domain_mmd2(x, labels, gamma=gamma, sample_size=mmd_sample_size, seed=seed)
    diagnostics["mmd2_pseudo"], diagnostics["mmd2_pseudo_pairs"] = mean, pairs.tolist()
    if true_domain is not None:
        mean, pairs = domain_mmd2(x, true_domain, gamma=gamma, sample_size=mmd_sample_size,
                                  seed=seed)
        diagnostics["mmd2_true"], diagnostics["mmd2_true_pairs"] = mean, pairs.tolist()
    return diagnostics


def _degenerate(cluster_sizes: list[list[int]], min_class_size: int) -> list[dict[str, int]]:
    """The domains with fewer than min_class_size live or spoof samples, each warned about."""
    out = [{"domain": d, "live": n_live, "spoof": n_spoof}
           for d, (n_live, n_spoof) in enumerate(cluster_sizes)
           if min(n_live, n_spoof) < min_class_size]
    for entry in out:
        log.warning("pseudo domain %d has %d live and %d spoof samples, fewer than "
                    "min_class_size=%d in one class: its domain batches repeat those samples",
                    entry["domain"], entry["live"], entry["spoof"], min_class_size)
    return out


def median_heuristic_gamma(x: np.ndarray, *, seed: int, sample_size: int = 1000) -> float:
    """γ of k(u, v) = exp(−γ‖u − v‖²): 1 / median squared distance over a seeded row subsample.

    (1.0 when that median is 0, i.e. the sampled rows nearly all coincide.)
    """
    rng = np.random.default_rng((seed, 6))
    rows = rng.choice(x.shape[0], min(x.shape[0], sample_size), replace=False)
    squared = pairwise_distances(x[rows], metric="sqeuclidean")
    median = float(np.median(squared[np.triu_indices(rows.size, k=1)])) if rows.size > 1 else 0.0
    return 1.0 / median if median > 0 else 1.0


def domain_mmd2(
    x: np.ndarray, labels, *, gamma: float, sample_size: int = 2000, seed: int = 0
) -> tuple[float | None, np.ndarray]:
    """Mean unbiased MMD² over all pairs of domains, and the [T, T] matrix (0 on the diagonal).

    Each domain contributes up to ``sample_size // T`` seeded rows (at least 2), so large domains
    do not dominate and the cost stays O(sample_size²). A pair with a domain of fewer than 2 rows
    has no unbiased estimate: NaN in the matrix, left out of the mean (None if no pair remains).
    """
    sample_size = _checked_positive_int(sample_size, "mmd sample_size")
    labels = np.asarray(labels)
    domains = np.unique(labels)
    per_domain = max(2, sample_size // max(1, domains.size))
    rng = np.random.default_rng((seed, 7))
    groups = []
    for domain in domains:
        members = np.flatnonzero(labels == domain)
        groups.append(np.sort(rng.choice(members, min(members.size, per_domain), replace=False)))
    kernel = np.exp(-gamma * pairwise_distances(x[np.concatenate(groups)], metric="sqeuclidean"))
    bounds = np.cumsum([0] + [g.size for g in groups])
    blocks = [slice(bounds[i], bounds[i + 1]) for i in range(len(groups))]
    matrix = np.zeros((len(groups), len(groups)))
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            matrix[i, j] = matrix[j, i] = _unbiased_mmd2(kernel, blocks[i], blocks[j])
    upper = matrix[np.triu_indices(len(groups), k=1)]
    finite = upper[np.isfinite(upper)]
    return (float(finite.mean()) if finite.size else None), matrix


def _unbiased_mmd2(kernel: np.ndarray, a: slice, b: slice) -> float:
    """Gretton et al. (2012) MMD²_u from the kernel matrix blocks of samples a and b."""
    n_a, n_b = a.stop - a.start, b.stop - b.start
    if n_a < 2 or n_b < 2:
        return float("nan")
    k_aa, k_bb = kernel[a, a], kernel[b, b]
    within_a = (k_aa.sum() - np.trace(k_aa)) / (n_a * (n_a - 1))
    within_b = (k_bb.sum() - np.trace(k_bb)) / (n_b * (n_b - 1))
    return float(within_a + within_b - 2.0 * kernel[a, b].mean())
