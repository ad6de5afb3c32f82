"""Face anti-spoofing metrics on the host: HTER, EER, AUC, TPR@FPR, APCER/BPCER/ACER, video scores.

Convention everywhere: label 1 = live (bona fide), 0 = spoof (attack); score higher = more live;
a sample is accepted as live when score ≥ threshold. numpy + sklearn only, never jax.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from sklearn import metrics as skm

THRESHOLD_MODES = ("source_val", "test_eer", "fixed")
LIVE, SPOOF = 1, 0


class VideoScores(NamedTuple):
    """Per-video arrays, one entry per distinct video id, in np.unique (sorted) order."""

    video_ids: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    num_frames: np.ndarray


# ----------------------------------------------------------------------------- input checks


def _as_1d(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name}: expected at least one entry, got an empty array")
    return array


def _checked_labels(labels, name: str = "labels") -> np.ndarray:
    """labels as int64 0/1; anything else (2, -1, 0.5, "live") is an error naming the values."""
    array = _as_1d(labels, name)
    if array.dtype == bool:
        return array.astype(np.int64)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(
            f"{name}: expected 0 (spoof) / 1 (live) numbers or booleans, got dtype {array.dtype}"
        )
    bad = ~np.isin(array, (SPOOF, LIVE))
    if bad.any():
        shown = np.unique(array[bad])[:5].tolist()
        raise ValueError(
            f"{name}: expected only 0 (spoof) and 1 (live); {int(bad.sum())} entries are not, "
            f"e.g. {shown}"
        )
    return array.astype(np.int64)


def _checked_scores(scores, name: str = "scores") -> np.ndarray:
    """scores as float64; NaN or ±inf is an error that counts them (a NaN has no rank on a ROC)."""
    array = _as_1d(scores, name)
    try:
        array = array.astype(np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: expected numbers, got dtype {array.dtype} ({err})") from None
    n_nan = int(np.isnan(array).sum())
    n_inf = int(np.isinf(array).sum())
    if n_nan or n_inf:
        raise ValueError(
            f"{name}: {n_nan} NaN and {n_inf} infinite values among {array.size} scores; "
            "every score must be finite (a NaN score usually means the model diverged)"
        )
    return array


def _checked_pair(labels, scores, prefix: str = "") -> tuple[np.ndarray, np.ndarray]:
    labels = _checked_labels(labels, f"{prefix}labels")
    scores = _checked_scores(scores, f"{prefix}scores")
    if labels.shape != scores.shape:
        raise ValueError(
            f"{prefix}labels and {prefix}scores differ in length: "
            f"{labels.size} labels vs {scores.size} scores"
        )
    return labels, scores


def _require_both_classes(labels: np.ndarray, what: str, prefix: str = "") -> None:
    n_live = int((labels == LIVE).sum())
    n_spoof = labels.size - n_live
    missing = [
        f"no {name} ({value}) samples"
        for name, value, count in (("live", LIVE, n_live), ("spoof", SPOOF, n_spoof))
        if count == 0
    ]
    if missing:
        raise ValueError(
            f"{prefix}labels contain {' and '.join(missing)} among {labels.size}; "
            f"{what} is undefined unless both live (1) and spoof (0) are present"
        )


def _checked_threshold(threshold) -> float:
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold: expected a finite number, got {threshold!r}") from None
    if not np.isfinite(value):
        raise ValueError(f"threshold: expected a finite number, got {value}")
    return value


def _same_length(reference: np.ndarray, other: np.ndarray, ref_name: str, name: str) -> None:
    if other.shape[0] != reference.shape[0]:
        raise ValueError(
            f"{name} and {ref_name} differ in length: {other.shape[0]} vs {reference.shape[0]}"
        )


# ----------------------------------------------------------------------------- ROC quantities


def _roc(labels: np.ndarray, scores: np.ndarray):
    # drop_intermediate=False keeps every attainable threshold, so the EER threshold below is an
    # operating point one can actually run at, not one sklearn pruned as collinear.
    return skm.roc_curve(labels, scores, pos_label=LIVE, drop_intermediate=False)


def eer(labels, scores) -> tuple[float, float]:
    """(EER, threshold): the rate where FAR (= FPR) equals FRR (= 1 − TPR) on the ROC.

    EER is *interpolated*: linearly between the two ROC points whose FRR − FAR changes sign (the
    usual `brentq(1 − x − interp(fpr, tpr)(x))` definition, exact whenever a ROC point sits on the
    crossing). The threshold is that of the crossing segment's end nearer to FAR = FRR (ties → the
    lower, finite threshold), i.e. an attainable operating point; with few samples HTER at that
    threshold can therefore differ from the interpolated EER.
    """
    labels, scores = _checked_pair(labels, scores)
    _require_both_classes(labels, "EER")
    fpr, tpr, thresholds = _roc(labels, scores)
    fnr = 1.0 - tpr
    gap = fnr - fpr  # starts at +1 (threshold inf: everything rejected), ends at −1
    after = int(np.argmax(gap <= 0.0))  # first ROC point at or past the crossing; ≥ 1
    before = after - 1
    # On the segment from `before` to `after`, FAR and FRR are linear in t ∈ [0, 1]; gap hits 0 at:
    t = gap[before] / (gap[before] - gap[after])
    rate = fpr[before] + t * (fpr[after] - fpr[before])
    nearer = before if abs(gap[before]) < abs(gap[after]) else after
    return float(rate), float(thresholds[nearer])


def far_frr(labels, scores, threshold) -> tuple[float, float]:
    """(FAR, FRR) at `threshold`: spoof accepted as live (score ≥ threshold), live rejected."""
    labels, scores = _checked_pair(labels, scores)
    _require_both_classes(labels, "FAR/FRR")
    threshold = _checked_threshold(threshold)
    accepted = scores >= threshold
    far = accepted[labels == SPOOF].mean()
    frr = (~accepted[labels == LIVE]).mean()
    return float(far), float(frr)


def hter(labels, scores, threshold) -> float:
    """Half total error rate (FAR + FRR) / 2 at `threshold`."""
    far, frr = far_frr(labels, scores, threshold)
    return (far + frr) / 2.0


def auc(labels, scores) -> float:
    """Area under the ROC curve (live positive): 1 perfect, 0.5 chance, 0 perfectly inverted."""
    labels, scores = _checked_pair(labels, scores)
    _require_both_classes(labels, "AUC")
    return float(skm.roc_auc_score(labels, scores))


def tpr_at_fpr(labels, scores, max_fpr: float = 0.01) -> float:
    """The largest TPR among ROC points with FPR ≤ max_fpr (no interpolation).

    Conservative and attainable: it is the best true-live rate of a real threshold that keeps the
    spoof acceptance within budget. With fewer than 1/max_fpr spoof samples only FPR = 0 fits.
    """
    labels, scores = _checked_pair(labels, scores)
    _require_both_classes(labels, "TPR@FPR")
    fpr, tpr, _ = _roc(labels, scores)
    # The small tolerance keeps an FPR of exactly max_fpr (e.g. 1/100) inside despite rounding.
    return float(tpr[fpr <= max_fpr + 1e-12].max())


def iso_errors(labels, scores, threshold, attack_types=None) -> dict[str, Any]:
    """ISO/IEC 30107-3 APCER, BPCER, ACER at `threshold`.

    APCER = attacks classified as bona fide; with `attack_types` (one entry per sample, entries of
    live samples are not used) it is the maximum of the per-type APCERs, which are also returned
    under `apcer_per_type`. BPCER = bona fide rejected. ACER = (APCER + BPCER) / 2.
    """
    labels, scores = _checked_pair(labels, scores)
    _require_both_classes(labels, "APCER/BPCER")
    threshold = _checked_threshold(threshold)
    accepted = scores >= threshold
    spoof = labels == SPOOF
    bpcer = float((~accepted[labels == LIVE]).mean())
    result: dict[str, Any] = {}
    if attack_types is None:
        apcer = float(accepted[spoof].mean())
    else:
        types = _as_1d(attack_types, "attack_types")
        _same_length(labels, types, "labels", "attack_types")
        spoof_types = types[spoof]
        try:
            kinds = np.unique(spoof_types)
        except TypeError:
            raise ValueError(
                "attack_types: the spoof samples' attack types must be mutually comparable "
                f"(e.g. all strings), got {sorted({repr(t) for t in spoof_types})[:5]}"
            ) from None
        per_type = {
            str(kind): float(accepted[spoof][spoof_types == kind].mean())
            for kind in kinds
        }
        apcer = max(per_type.values())
        result["apcer_per_type"] = per_type
    return {"apcer": apcer, "bpcer": bpcer, "acer": (apcer + bpcer) / 2.0, **result}


# ----------------------------------------------------------------------------- videos


class _Videos(NamedTuple):
    unique_ids: np.ndarray  # sorted distinct ids
    first: np.ndarray  # index of each video's first frame
    inverse: np.ndarray  # video index of each frame
    counts: np.ndarray  # frames per video


def _per_video_constant(videos: _Videos, values: np.ndarray, name: str) -> np.ndarray:
    """values[i] for each video, erroring (naming the video) where a video's frames disagree."""
    unique_ids, inverse = videos.unique_ids, videos.inverse
    per_video = values[videos.first]
    differs = values != per_video[inverse]
    if differs.any():
        group = inverse[int(np.argmax(differs))]
        found = sorted({str(v) for v in values[inverse == group]})
        raise ValueError(
            f"video {unique_ids[group].tolist()!r} has frames with mixed {name} {found}; "
            f"every frame of a video must share its {name}"
        )
    return per_video


def _video_groups(video_ids, n: int, name: str, labels_name: str) -> _Videos:
    ids = _as_1d(video_ids, name)
    if ids.shape[0] != n:
        raise ValueError(f"{name} and {labels_name} differ in length: {ids.shape[0]} vs {n}")
    unique_ids, first, inverse, counts = np.unique(
        ids, return_index=True, return_inverse=True, return_counts=True
    )
    return _Videos(unique_ids, first, inverse.reshape(-1), counts)


def video_scores(video_ids, labels, scores) -> VideoScores:
    """Frame scores averaged per video; a video whose frames carry different labels is an error."""
    return _video_scores(video_ids, labels, scores, "")


def _video_scores(video_ids, labels, scores, prefix: str) -> VideoScores:
    labels, scores = _checked_pair(labels, scores, prefix)
    videos = _video_groups(video_ids, labels.size, f"{prefix}video_ids", f"{prefix}labels")
    video_labels = _per_video_constant(videos, labels, "labels")
    mean_scores = np.bincount(videos.inverse, weights=scores) / videos.counts
    return VideoScores(videos.unique_ids, video_labels, mean_scores, videos.counts)


def _video_attack_types(video_ids, attack_types) -> np.ndarray:
    types = _as_1d(attack_types, "attack_types")
    videos = _video_groups(video_ids, types.shape[0], "video_ids", "attack_types")
    return _per_video_constant(videos, types, "attack_types")


# ----------------------------------------------------------------------------- evaluate


def _threshold_for(
    mode: str, labels, scores, threshold, val_labels, val_scores, val_video_ids
) -> float:
    """The decision threshold chosen by `mode`; inputs the mode does not use are an error."""
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"threshold_mode: expected one of {THRESHOLD_MODES}, got {mode!r}")
    has_val = val_labels is not None or val_scores is not None or val_video_ids is not None
    if mode != "fixed" and threshold is not None:
        raise ValueError(
            f"threshold={threshold!r} given with threshold_mode={mode!r}; it is only used with "
            "threshold_mode='fixed'"
        )
    if mode != "source_val" and has_val:
        raise ValueError(
            f"val_labels/val_scores/val_video_ids given with threshold_mode={mode!r}; they are "
            "only used with threshold_mode='source_val'"
        )
    if mode == "fixed":
        if threshold is None:
            raise ValueError("threshold_mode='fixed' needs threshold=<number>, got None")
        return _checked_threshold(threshold)
    if mode == "test_eer":
        return eer(labels, scores)[1]
    if val_labels is None or val_scores is None:
        raise ValueError(
            "threshold_mode='source_val' needs val_labels and val_scores (held-out source "
            "validation data) to set the EER threshold; missing: "
            + ", ".join(n for n, v in (("val_labels", val_labels), ("val_scores", val_scores))
                        if v is None)
        )
    val_labels, val_scores = _checked_pair(val_labels, val_scores, "val_")
    if val_video_ids is not None:
        grouped = _video_scores(val_video_ids, val_labels, val_scores, "val_")
        val_labels, val_scores = grouped.labels, grouped.scores
    _require_both_classes(val_labels, "the source_val EER threshold", "val_")
    return eer(val_labels, val_scores)[1]


def evaluate(
    labels,
    scores,
    *,
    threshold_mode: str = "source_val",
    threshold=None,
    val_labels=None,
    val_scores=None,
    video_ids=None,
    val_video_ids=None,
    attack_types=None,
) -> dict[str, Any]:
    """Every FAS metric of one test set, as plain Python values (JSON-ready).

    threshold_mode: 'source_val' — EER threshold of the held-out *source* validation scores (the
    honest default: nothing about the target is used); 'test_eer' — threshold at the target's own
    EER (what SSDG-style code reports; optimistic, for comparison with published tables);
    'fixed' — `threshold`. With `video_ids` (resp. `val_video_ids`) frame scores are first
    averaged per video, and the metrics count videos. `attack_types` (per frame) makes APCER the
    maximum over attack types. hter and acer coincide unless attack types are given. Whatever the
    mode, `hter_test_eer` is HTER at the target's own EER threshold.
    """
    labels, scores = _checked_pair(labels, scores)
    types = attack_types
    if attack_types is not None:
        _same_length(labels, _as_1d(attack_types, "attack_types"), "labels", "attack_types")
    unit = "frame"
    if video_ids is not None:
        grouped = video_scores(video_ids, labels, scores)
        labels, scores, unit = grouped.labels, grouped.scores, "video"
        if attack_types is not None:
            types = _video_attack_types(video_ids, attack_types)
    _require_both_classes(labels, "evaluation (AUC, EER, HTER)")
    chosen = _threshold_for(
        threshold_mode, labels, scores, threshold, val_labels, val_scores, val_video_ids
    )
    far, frr = far_frr(labels, scores, chosen)
    test_eer, test_eer_threshold = eer(labels, scores)
    return {
        "hter": (far + frr) / 2.0,
        # HTER at the target's own EER threshold: what published tables report (optimistic,
        # it looks at the target's labels), kept beside the honest `hter` in every record.
        "hter_test_eer": hter(labels, scores, test_eer_threshold),
        "far": far,
        "frr": frr,
        "auc": auc(labels, scores),
        "eer": test_eer,
        "tpr_at_fpr_1pct": tpr_at_fpr(labels, scores, 0.01),
        "tpr_at_fpr_5pct": tpr_at_fpr(labels, scores, 0.05),
        **iso_errors(labels, scores, chosen, types),
        "threshold": chosen,
        "threshold_mode": threshold_mode,
        "unit": unit,
        "num_live": int((labels == LIVE).sum()),
        "num_spoof": int((labels == SPOOF).sum()),
    }
