"""Evaluation of a state on held-out data: live scores of every frame through the jitted
prediction, then the FAS metrics (metrics.py) at the threshold the config names.

The target's attack types go in, so APCER is the worst attack type's and ACER is ISO/IEC 30107-3's.
"""

from __future__ import annotations

import numpy as np

from d2am_jax import metrics, stats
from d2am_jax.data.dataset import FasData

RESULT_KEYS = ("epoch", "step", "hter", "hter_test_eer", "auc", "eer", "tpr_at_fpr_1pct",
               "tpr_at_fpr_5pct", "acer", "threshold", "threshold_mode")
# What a record with recomputed BatchNorm statistics also holds of the running averages' evaluation
# (eval.bn_statistics='recomputed'), as running_bn_<key>.
RUNNING_BN_KEYS = ("hter", "hter_test_eer", "auc", "tpr_at_fpr_1pct", "tpr_at_fpr_5pct", "val_eer",
                   "val_auc")
# The source-validation split's size per class (units: `unit`, and frames), so a record states the
# floor its threshold and best-checkpoint choice rest on.
_EXTRA_KEYS = ("val_eer", "val_auc", "unit", "num_live", "num_spoof", "apcer", "bpcer",
               "val_num_live", "val_num_spoof", "val_frames_live", "val_frames_spoof")


def scores(predict, state, data: FasData, batch_size: int, resolution: int,
           placement=None) -> np.ndarray:
    """Live probabilities of every frame of `data`, in fixed-size padded batches (one compile);
    over a sharded `placement` each process reads its rows and gets every score back."""
    out = []
    fetch = np.asarray if placement is None else placement.fetch
    for x, m in stats.device_batches(data.frames, batch_size, resolution, placement):
        out.append(np.asarray(fetch(predict(state.params, state.batch_stats, x)))[:m])
    return np.concatenate(out).astype(np.float64)


def evaluate(predict, state, target: FasData, val: FasData, config, placement=None) -> dict:
    """Target metrics (threshold by eval.threshold_mode; `hter_test_eer` at the target's own EER
    threshold whatever the mode) and the source-validation EER/AUC and size."""
    bs, r = int(config.eval.batch_size), int(config.data.resolution)
    val_scores = scores(predict, state, val, bs, r, placement)
    target_scores = scores(predict, state, target, bs, r, placement)
    per_video = bool(config.eval.per_video)
    mode = config.eval.threshold_mode
    kwargs = {}
    if mode == "source_val":
        kwargs = dict(val_labels=val.labels, val_scores=val_scores,
                      val_video_ids=val.video if per_video else None)
    elif mode == "fixed":
        kwargs = dict(threshold=float(config.eval.threshold))
    result = metrics.evaluate(target.labels, target_scores, threshold_mode=mode,
                              video_ids=target.video if per_video else None,
                              attack_types=target.attack, **kwargs)
    val_result = metrics.evaluate(val.labels, val_scores, threshold_mode="test_eer",
                                  video_ids=val.video if per_video else None)
    result["val_eer"] = val_result["eer"]
    result["val_auc"] = val_result["auc"]
    result["val_num_live"] = val_result["num_live"]
    result["val_num_spoof"] = val_result["num_spoof"]
    result["val_frames_live"] = int((val.labels == 1).sum())
    result["val_frames_spoof"] = int((val.labels == 0).sum())
    return result


def record(result: dict, epoch: int, step: int) -> dict:
    """One results.json record from `evaluate`'s output (RESULT_KEYS first); train adds
    `is_best` (this checkpoint is the best by source validation so far)."""
    keys = RESULT_KEYS[2:] + _EXTRA_KEYS
    return {"epoch": epoch, "step": step, **{key: result[key] for key in keys}}
