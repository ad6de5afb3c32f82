"""Tests for d2am_jax.metrics against hand-computed cases (label 1 = live, score ≥ t → live)."""

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.interpolate import interp1d
from scipy.optimize import brentq
from sklearn.metrics import roc_curve

from d2am_jax import metrics

# Case A — live: .9 .8 .6 .3, spoof: .7 .4 .2 .1.
# AUC: live-over-spoof pairs: .9 → 4, .8 → 4, .6 → 3 (.4 .2 .1), .3 → 2 (.2 .1) = 13 / 16.
# ROC (threshold: FAR, FRR): .9: 0, 3/4 · .8: 0, 1/2 · .7: 1/4, 1/2 · .6: 1/4, 1/4 ← FAR = FRR,
# so EER = 1/4 exactly at threshold .6. At FAR = 0 the best TPR is 1/2 (threshold .8).
A_LABELS = [1, 1, 1, 1, 0, 0, 0, 0]
A_SCORES = [0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1]

# Case B — live: .9 .8 .3, spoof: .6 .2. ROC (FAR, FRR): .8: (0, 1/3), .6: (1/2, 1/3).
# FRR − FAR changes sign between them: +1/3 → −1/6. On that segment FRR stays 1/3 while FAR runs
# 0 → 1/2, so the curves cross at FAR = FRR = 1/3 (interpolated EER). The nearer end is .6
# (|−1/6| < |1/3|); there FAR = 1/2, FRR = 1/3, HTER = 5/12. AUC: .9 → 2, .8 → 2, .3 → 1 = 5/6.
B_LABELS = [1, 1, 1, 0, 0]
B_SCORES = [0.9, 0.8, 0.3, 0.6, 0.2]


def test_case_a_by_hand():
    assert metrics.auc(A_LABELS, A_SCORES) == pytest.approx(13 / 16)
    rate, threshold = metrics.eer(A_LABELS, A_SCORES)
    assert rate == pytest.approx(0.25)
    assert threshold == pytest.approx(0.6)
    assert metrics.hter(A_LABELS, A_SCORES, 0.6) == pytest.approx(0.25)
    # t = .35: spoof ≥ .35 are .7 .4 → FAR 2/4; live < .35 is .3 → FRR 1/4; HTER 3/8.
    assert metrics.far_frr(A_LABELS, A_SCORES, 0.35) == pytest.approx((0.5, 0.25))
    assert metrics.hter(A_LABELS, A_SCORES, 0.35) == pytest.approx(0.375)
    # A threshold above every score rejects all: FAR 0, FRR 1.
    assert metrics.hter(A_LABELS, A_SCORES, 2.0) == pytest.approx(0.5)
    assert metrics.tpr_at_fpr(A_LABELS, A_SCORES, 0.01) == pytest.approx(0.5)


def test_case_b_eer_is_interpolated_and_threshold_is_nearer_end():
    rate, threshold = metrics.eer(B_LABELS, B_SCORES)
    assert rate == pytest.approx(1 / 3)
    assert threshold == pytest.approx(0.6)
    assert metrics.hter(B_LABELS, B_SCORES, threshold) == pytest.approx(5 / 12)
    assert metrics.auc(B_LABELS, B_SCORES) == pytest.approx(5 / 6)


def test_eer_matches_the_brentq_recipe_on_random_scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = rng.normal(size=300) + labels  # live shifted up by one σ
    fpr, tpr, _ = roc_curve(labels, scores)
    reference = brentq(lambda x: 1.0 - x - interp1d(fpr, tpr)(x), 0.0, 1.0)
    assert metrics.eer(labels, scores)[0] == pytest.approx(reference, abs=1e-9)


def test_all_scores_tied_gives_eer_half():
    # ROC is (FAR, FRR) = (0, 1) → (1, 0); the diagonal meets FAR = FRR at 1/2.
    rate, threshold = metrics.eer([1, 0, 1, 0], [0.5] * 4)
    assert (rate, threshold) == (pytest.approx(0.5), pytest.approx(0.5))


def test_perfect_separation():
    labels, scores = [1, 1, 0, 0], [0.8, 0.9, 0.1, 0.2]
    result = metrics.evaluate(labels, scores, threshold_mode="test_eer")
    assert result["auc"] == 1.0
    assert result["eer"] == 0.0
    assert result["hter"] == 0.0
    assert result["acer"] == 0.0
    assert result["tpr_at_fpr_1pct"] == 1.0
    assert result["threshold"] == pytest.approx(0.8)  # lowest live score: all live accepted


def test_inverted_scores():
    # (FAR, FRR) runs (0,1) → (1/2,1) → (1,1) → (1,1/2) → (1,0): FAR = FRR only at 1.
    labels, scores = [1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]
    assert metrics.auc(labels, scores) == 0.0
    assert metrics.eer(labels, scores)[0] == pytest.approx(1.0)
    assert metrics.tpr_at_fpr(labels, scores) == 0.0


def test_tpr_at_fpr_takes_largest_tpr_within_budget():
    # 200 spoof: .95 .85 .6 and 197 × .1; live: .99 .9 .9 .8 .5.
    # threshold .8 → FAR 2/200 = 1% (allowed), TPR 4/5; threshold .5 → FAR 3/200 (too many).
    labels = [1] * 5 + [0] * 200
    scores = [0.99, 0.9, 0.9, 0.8, 0.5, 0.95, 0.85, 0.6] + [0.1] * 197
    assert metrics.tpr_at_fpr(labels, scores, 0.01) == pytest.approx(0.8)
    assert metrics.tpr_at_fpr(labels, scores, 0.005) == pytest.approx(0.6)  # threshold .9


def test_apcer_is_max_over_attack_types():
    # t = .5. Live .9 .4 → BPCER 1/2. Print .6 .1 → 1/2 accepted; replay .7 .8 .2 → 2/3.
    # APCER = max = 2/3, ACER = (2/3 + 1/2)/2 = 7/12. Pooled FAR = 3/5 → HTER = 11/20.
    labels = [1, 1, 0, 0, 0, 0, 0]
    scores = [0.9, 0.4, 0.6, 0.1, 0.7, 0.8, 0.2]
    types = ["", "", "print", "print", "replay", "replay", "replay"]
    result = metrics.evaluate(
        labels, scores, threshold_mode="fixed", threshold=0.5, attack_types=types
    )
    assert result["apcer"] == pytest.approx(2 / 3)
    assert result["apcer_per_type"] == pytest.approx({"print": 0.5, "replay": 2 / 3})
    assert result["bpcer"] == pytest.approx(0.5)
    assert result["acer"] == pytest.approx(7 / 12)
    assert result["hter"] == pytest.approx(11 / 20)
    # Without attack types APCER is the pooled rate and ACER equals HTER.
    pooled = metrics.iso_errors(labels, scores, 0.5)
    assert pooled == pytest.approx({"apcer": 0.6, "bpcer": 0.5, "acer": 11 / 20})


def test_video_scores_average_frames():
    # Videos: a (live) .9 .7 → .8; b (live) .4 .6 → .5; c (spoof) .2; d (spoof) .6.
    ids = ["a", "a", "b", "b", "c", "d"]
    labels = [1, 1, 1, 1, 0, 0]
    scores = [0.9, 0.7, 0.4, 0.6, 0.2, 0.6]
    grouped = metrics.video_scores(ids, labels, scores)
    assert grouped.video_ids.tolist() == ["a", "b", "c", "d"]
    assert grouped.labels.tolist() == [1, 1, 0, 0]
    assert grouped.scores == pytest.approx([0.8, 0.5, 0.2, 0.6])
    assert grouped.num_frames.tolist() == [2, 2, 1, 1]
    # Per video AUC: .8 beats .2 .6, .5 beats .2 → 3/4. Per frame it would be 6.5/8 (.6 ties .6).
    assert metrics.auc(labels, scores) == pytest.approx(6.5 / 8)
    # Video ROC: .8: (FAR 0, FRR 1/2), .6: (1/2, 1/2) → EER 1/2 at .6; HTER at .6: d accepted,
    # b rejected → 1/2.
    result = metrics.evaluate(labels, scores, threshold_mode="test_eer", video_ids=ids)
    assert result["auc"] == pytest.approx(0.75)
    assert result["eer"] == pytest.approx(0.5)
    assert result["threshold"] == pytest.approx(0.6)
    assert result["hter"] == pytest.approx(0.5)
    assert (result["unit"], result["num_live"], result["num_spoof"]) == ("video", 2, 2)


def test_source_val_threshold_comes_from_validation_scores():
    # Validation = case A → threshold .6. Test: live .65 .62 .5, spoof .3 .61.
    # At .6: spoof .61 accepted → FAR 1/2; live .5 rejected → FRR 1/3; HTER 5/12.
    labels, scores = [1, 1, 1, 0, 0], [0.65, 0.62, 0.5, 0.3, 0.61]
    result = metrics.evaluate(labels, scores, val_labels=A_LABELS, val_scores=A_SCORES)
    assert result["threshold_mode"] == "source_val"
    assert result["threshold"] == pytest.approx(0.6)
    assert result["hter"] == pytest.approx(5 / 12)
    # Per-video validation: each case-A frame is its own video except .6 and .8 (both live) which
    # share one: video scores live .9 .7 .3, spoof .7 .4 .2 .1. ROC: .9 (0, 2/3), .7 (1/4, 1/3),
    # .4 (1/2, 1/3): FRR − FAR goes 1/12 → −1/6, so the nearer end is .7.
    val_ids = ["l1", "l2", "l2", "l4", "s1", "s2", "s3", "s4"]
    result = metrics.evaluate(
        labels, scores, val_labels=A_LABELS, val_scores=A_SCORES, val_video_ids=val_ids
    )
    assert result["threshold"] == pytest.approx(0.7)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: metrics.eer([1, 0, 1], [0.1, 0.2]), "3 labels vs 2 scores"),
        (lambda: metrics.auc([1, 1, 1], [0.1, 0.2, 0.3]), "no spoof (0) samples"),
        (lambda: metrics.eer([0, 0], [0.1, 0.2]), "no live (1) samples"),
        (lambda: metrics.hter([1, 0, 1, 0], [0.1, np.nan, np.nan, 0.3], 0.5),
         "scores: 2 NaN and 0 infinite values among 4"),
        (lambda: metrics.evaluate(A_LABELS, A_SCORES, val_labels=[1, 0],
                                  val_scores=[0.3, np.nan]),
         "val_scores: 1 NaN and 0 infinite values among 2"),
        (lambda: metrics.hter([1, 2, 0], [0.1, 0.2, 0.3], 0.5), "e.g. [2]"),
        (lambda: metrics.hter([1, 0], [0.1, 0.2], float("nan")), "threshold: expected a finite"),
        (lambda: metrics.evaluate(A_LABELS, A_SCORES, threshold_mode="fixed"),
         "threshold_mode='fixed' needs threshold"),
        (lambda: metrics.evaluate(A_LABELS, A_SCORES), "missing: val_labels, val_scores"),
        (lambda: metrics.evaluate(A_LABELS, A_SCORES, val_labels=[1, 0]),
         "missing: val_scores"),
        (lambda: metrics.evaluate(A_LABELS, A_SCORES, val_labels=[1, 1], val_scores=[0.1, 0.2]),
         "val_labels contain no spoof"),
        (lambda: metrics.evaluate(A_LABELS, A_SCORES, threshold_mode="eer"),
         "threshold_mode: expected one of"),
        (lambda: metrics.evaluate(A_LABELS, A_SCORES, threshold_mode="test_eer", threshold=0.5),
         "only used with threshold_mode='fixed'"),
        (lambda: metrics.evaluate(A_LABELS, A_SCORES, threshold_mode="fixed", threshold=0.5,
                                  val_labels=A_LABELS, val_scores=A_SCORES),
         "only used with threshold_mode='source_val'"),
        (lambda: metrics.video_scores(["a", "a", "b"], [1, 0, 1], [0.1, 0.2, 0.3]),
         "video 'a' has frames with mixed labels"),
        (lambda: metrics.video_scores(["a", "b"], [1, 0, 1], [0.1, 0.2, 0.3]),
         "video_ids and labels differ in length: 2 vs 3"),
        (lambda: metrics.evaluate([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2], threshold_mode="test_eer",
                                  video_ids=["a", "b", "c", "c"],
                                  attack_types=["", "", "print", "replay"]),
         "video 'c' has frames with mixed attack_types"),
        (lambda: metrics.iso_errors([1, 0], [0.9, 0.1], 0.5, attack_types=["print"]),
         "attack_types and labels differ in length"),
    ],
)
def test_bad_input_raises_a_clear_error(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_results_are_plain_python_values():
    result = metrics.evaluate(A_LABELS, A_SCORES, threshold_mode="test_eer")
    for key in ("hter", "auc", "eer", "tpr_at_fpr_1pct", "apcer", "bpcer", "acer", "threshold"):
        assert type(result[key]) is float, key
    assert json.loads(json.dumps(result)) == result


def test_boolean_labels_and_integer_video_ids_are_accepted():
    as_bool = metrics.evaluate(np.array(A_LABELS, bool), A_SCORES, threshold_mode="test_eer",
                               video_ids=np.arange(8))
    as_int = metrics.evaluate(A_LABELS, A_SCORES, threshold_mode="test_eer")
    assert as_bool["hter"] == as_int["hter"] == pytest.approx(0.25)
    assert as_bool["unit"] == "video" and as_int["unit"] == "frame"


def test_metrics_module_imports_no_device_library():
    # Host code must not pull in jax; reading the imports is exact and avoids a slow subprocess.
    tree = ast.parse(Path(metrics.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported == {"__future__", "typing", "numpy", "sklearn"}
