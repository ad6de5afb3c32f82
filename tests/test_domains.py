"""Tests for d2am_jax.domains: channel selection, pseudo-domain recovery on blobs with known
domains, label identity under k-means renumbering, stability, choose_k, diagnostics, bad input."""

import itertools
import logging
import math
import re

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score as nmi

from d2am_jax import domains as dm


def blobs(seed=0, n=900, k=3, d=12, domain_scale=3.0, class_scale=1.5, noise=0.5):
    """Mixture-domain toy bank: domain offsets shared by live and spoof, plus one class offset."""
    rng = np.random.default_rng(seed)
    domain_offsets = rng.normal(size=(k, d)) * domain_scale
    class_offset = rng.normal(size=d) * class_scale
    domain = rng.integers(0, k, n)
    live = rng.random(n) < 0.5
    bank = domain_offsets[domain] + live[:, None] * class_offset + rng.normal(size=(n, d)) * noise
    return bank.astype(np.float32), live, domain


def majority(values):
    return int(np.bincount(values).argmax())


def assert_pairs_match_true_domains(labels, live, domain, k):
    """Live cluster j and spoof cluster j hold the same true domain, a different one for each j."""
    live_majority = [majority(domain[live & (labels == j)]) for j in range(k)]
    spoof_majority = [majority(domain[~live & (labels == j)]) for j in range(k)]
    assert live_majority == spoof_majority
    assert sorted(live_majority) == list(range(k))


# ----------------------------------------------------------------------------- channel selection

ATTENTION = np.array([[0.1, 0.9, 0.5, 0.3], [0.3, 0.7, 0.1, 0.9]])
# Mean attention per channel: [.2, .8, .3, .6] → two lowest, ascending: channels 0 then 2.
# Sample 0 ascending: 0 (.1), 3 (.3); sample 1 ascending: 2 (.1), 0 (.3).


def test_select_channels_hand_computed():
    np.testing.assert_array_equal(dm.select_channels(ATTENTION, "dataset"), [0, 2])
    np.testing.assert_array_equal(dm.select_channels(ATTENTION, "sample"), [[0, 3], [2, 0]])
    np.testing.assert_array_equal(dm.select_channels(ATTENTION, "none"), [0, 1, 2, 3])
    # floor(C · fraction): 4 · 0.75 = 3 channels; odd C = 5 at 0.5 keeps 2.
    np.testing.assert_array_equal(dm.select_channels(ATTENTION, "dataset", 0.75), [0, 2, 3])
    assert dm.select_channels(np.ones((3, 5)), "dataset").shape == (2,)


def test_domain_features_layout_hand_computed():
    mean = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    std = mean + 10
    second = {"attention": np.array([[0.9, 0.1], [0.2, 0.8]]),
              "mean": np.array([[-1.0, -2.0], [-3.0, -4.0]]),
              "std": np.array([[-5.0, -6.0], [-7.0, -8.0]])}
    stats = [{"attention": ATTENTION, "mean": mean, "std": std}, second]
    # dataset: DRLM 1 keeps channels [0, 2]; DRLM 2 mean attention [.55, .45] keeps channel 1.
    np.testing.assert_array_equal(
        dm.domain_features(stats, "dataset"),
        [[1, 3, 11, 13, -2, -6], [5, 7, 15, 17, -4, -8]],
    )
    # sample: row 0 keeps [0, 3] and [1]; row 1 keeps [2, 0] (in that order) and [0].
    np.testing.assert_array_equal(
        dm.domain_features(stats, "sample"),
        [[1, 4, 11, 14, -2, -6], [7, 5, 17, 15, -3, -7]],
    )
    bank = dm.domain_features(stats, "none")
    assert bank.dtype == np.float32 and bank.shape == (2, 2 * 4 + 2 * 2)
    np.testing.assert_array_equal(bank[0], [1, 2, 3, 4, 11, 12, 13, 14, -1, -2, -5, -6])


def test_domain_features_bad_input_is_named():
    good = {"attention": ATTENTION, "mean": ATTENTION, "std": ATTENTION}
    with pytest.raises(ValueError, match=r"drlm_stats\[1\]: missing keys \['std'\]"):
        dm.domain_features([good, {"attention": ATTENTION, "mean": ATTENTION}])
    with pytest.raises(ValueError, match=r"drlm_stats\[1\]: 3 samples, but drlm_stats\[0\] has 2"):
        dm.domain_features([good, {key: np.ones((3, 4)) for key in dm.STATS_KEYS}])
    with pytest.raises(ValueError, match=r"drlm_stats\[0\]: expected three equal \[n, C\]"):
        dm.domain_features([{"attention": ATTENTION, "mean": ATTENTION, "std": np.ones((2, 3))}])
    bad_attention = ATTENTION.copy()
    bad_attention[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"drlm_stats\[0\]: attention: 1 non-finite .* row 1"):
        dm.domain_features([{"attention": bad_attention, "mean": ATTENTION, "std": ATTENTION}])
    with pytest.raises(ValueError, match="non-empty list"):
        dm.domain_features([])
    with pytest.raises(ValueError, match="mode: expected one of"):
        dm.select_channels(ATTENTION, "lowest")
    with pytest.raises(ValueError, match="keeps none"):
        dm.select_channels(ATTENTION, "dataset", 0.1)


# ----------------------------------------------------------------------------- recovery on blobs


def test_blobs_recovered_and_paired_without_previous_labels():
    bank, live, domain = blobs()
    result = dm.assign(bank, live, 3, seed=0, true_domain=domain)
    assert result.labels.dtype == np.int32 and result.labels.shape == (bank.shape[0],)
    assert nmi(domain, result.labels) > 0.95
    assert_pairs_match_true_domains(result.labels, live, domain, 3)
    assert result.diagnostics["alignment"] == "live_spoof_centroids"
    assert "nearest centroids" in result.diagnostics["alignment_note"]
    assert result.diagnostics["nmi_true_domain"] > 0.95


def test_epoch_one_joint_clustering_then_aligned_epochs():
    bank, live, domain = blobs(seed=1)
    first = dm.initial_assignment(bank, 3, seed=0, is_live=live)
    assert nmi(domain, first.labels) > 0.95
    assert_pairs_match_true_domains(first.labels, live, domain, 3)
    second = dm.assign(bank, live, 3, prev_labels=first.labels, seed=5)
    assert second.diagnostics["alignment"] == "previous_labels"
    assert nmi(domain, second.labels) > 0.95
    assert np.mean(second.labels == first.labels) > 0.95


def test_alignment_follows_previous_label_identity():
    # prev = the true domains renamed by π with 15 % of labels scrambled: the new labels must carry
    # π's names, i.e. agree with π[domain], not with whatever numbering k-means produces.
    bank, live, domain = blobs(seed=2)
    rng = np.random.default_rng(0)
    renamed = np.array([2, 0, 1])[domain]
    previous = renamed.copy()
    scrambled = rng.random(previous.size) < 0.15
    previous[scrambled] = rng.integers(0, 3, scrambled.sum())
    result = dm.assign(bank, live, 3, prev_labels=previous, seed=0)
    assert np.mean(result.labels == renamed) > 0.97
    assert result.diagnostics["nmi_previous"] == pytest.approx(nmi(previous, result.labels))


def test_initial_assignment_falls_back_to_per_class_only_where_a_joint_cluster_lacks_a_class(
        caplog):
    # Live and spoof far apart, domains close: the joint clustering splits by class first.
    bank, live, domain = blobs(seed=3, domain_scale=0.3, class_scale=6.0)
    with pytest.raises(ValueError, match=r"no live or no spoof sample .* per_class='auto'"):
        dm.initial_assignment(bank, 3, seed=0, is_live=live, per_class=False)
    with caplog.at_level(logging.WARNING, logger="d2am_jax.domains"):
        fallback = dm.initial_assignment(bank, 3, seed=0, is_live=live)
    d = fallback.diagnostics
    assert all(a > 0 and b > 0 for a, b in d["cluster_sizes"])
    assert d["alignment"] == "per_class_to_joint"
    assert any(a == 0 or b == 0 for a, b in d["joint_cluster_sizes"])
    # The warning names the joint clustering's sizes.
    assert any(str(d["joint_cluster_sizes"]) in r.getMessage() for r in caplog.records)
    # A joint clustering split by class leaves no live/spoof pairing to keep: said in the record.
    assert d["pairing_weak"] is True and "weak live/spoof pairing" in d["pairing_note"]
    assert min(d["pairing_agreement"].values()) < dm.WEAK_PAIRING_BELOW


def test_joint_clusters_holding_both_classes_are_used_as_they_are(caplog):
    # Overlapping blobs: the per-class clusters aligned to the joint ones differ from them on a
    # few samples, so the labels show which of the two epoch 1 used.
    bank, live, domain = blobs(seed=1, noise=2.5)
    joint = dm.initial_assignment(bank, 3, seed=0, is_live=live, per_class=False)
    aligned = dm.initial_assignment(bank, 3, seed=0, is_live=live, per_class=True)
    assert not np.array_equal(joint.labels, aligned.labels)
    with caplog.at_level(logging.WARNING, logger="d2am_jax.domains"):
        auto = dm.initial_assignment(bank, 3, seed=0, is_live=live)
    np.testing.assert_array_equal(auto.labels, joint.labels)
    assert auto.diagnostics["alignment"] == "joint" and not caplog.records
    assert auto.diagnostics["agreement_previous"] == 1.0  # the labels vs the joint clustering
    assert auto.diagnostics["pairing_weak"] is False
    assert min(auto.diagnostics["pairing_agreement"].values()) > 0.9


def test_domain_with_a_class_below_the_minimum_is_reported(caplog):
    live = np.array([1, 0] * 6 + [1, 1, 1, 0], bool)
    true_domain = np.array(["a"] * 6 + ["b"] * 6 + ["c"] * 4)  # c: 3 live, 1 spoof
    with caplog.at_level(logging.WARNING, logger="d2am_jax.domains"):
        result = dm.domain_labels("true", is_live=live, seed=0, epoch=0, true_domain=true_domain,
                                  min_class_size=2)
    assert result.diagnostics["min_class_size"] == 2
    assert result.diagnostics["degenerate_domains"] == [{"domain": 2, "live": 3, "spoof": 1}]
    assert any("pseudo domain 2 has 3 live and 1 spoof" in r.getMessage()
               for r in caplog.records)
    quiet = dm.domain_labels("true", is_live=live, seed=0, epoch=0, true_domain=true_domain)
    assert quiet.diagnostics["degenerate_domains"] == []  # the default minimum is 1


# ----------------------------------------------------------------------------- label identity


@pytest.mark.parametrize("with_previous", [True, False])
def test_labels_do_not_depend_on_kmeans_numbering(monkeypatch, with_previous):
    bank, live, domain = blobs(seed=4, n=450)
    previous = dm.initial_assignment(bank, 3, seed=1).labels if with_previous else None
    baseline = dm.assign(bank, live, 3, prev_labels=previous, seed=0).labels
    raw = dm._kmeans_labels
    perms = list(itertools.permutations(range(3)))
    for live_perm, spoof_perm in itertools.product(perms, perms):
        calls = iter([np.array(live_perm), np.array(spoof_perm)])
        monkeypatch.setattr(dm, "_kmeans_labels",
                            lambda *args, **kw: next(calls)[raw(*args, **kw)])
        relabeled = dm.assign(bank, live, 3, prev_labels=previous, seed=0).labels
        np.testing.assert_array_equal(relabeled, baseline)


def test_renaming_previous_labels_renames_the_result():
    bank, live, domain = blobs(seed=5)
    previous = dm.initial_assignment(bank, 3, seed=0).labels
    baseline = dm.assign(bank, live, 3, prev_labels=previous, seed=0).labels
    for perm in map(np.array, itertools.permutations(range(3))):
        renamed = dm.assign(bank, live, 3, prev_labels=perm[previous], seed=0).labels
        np.testing.assert_array_equal(renamed, perm[baseline])


def test_same_seed_same_labels_and_diagnostics():
    bank, live, domain = blobs(seed=6, domain_scale=0.8)  # overlapping: k-means depends on seed
    one = dm.assign(bank, live, 3, seed=11, n_init=1, true_domain=domain)
    two = dm.assign(bank, live, 3, seed=11, n_init=1, true_domain=domain)
    np.testing.assert_array_equal(one.labels, two.labels)
    assert one.diagnostics == two.diagnostics


def test_kuhn_munkres_keeps_labels_when_bank_barely_changes():
    bank, live, domain = blobs(seed=7)
    before = dm.assign(bank, live, 3, seed=0)
    nudged = bank + np.random.default_rng(1).normal(size=bank.shape).astype(np.float32) * 1e-3
    for seed in (0, 1, 2, 3):  # other seeds: other k-means numbering, same labels after alignment
        after = dm.assign(nudged, live, 3, prev_labels=before.labels, seed=seed)
        np.testing.assert_array_equal(after.labels, before.labels)
        assert after.diagnostics["nmi_previous"] == pytest.approx(1.0)
        assert after.diagnostics["agreement_previous"] == 1.0


def test_minibatch_agrees_with_full_kmeans():
    bank, live, domain = blobs(seed=8, n=3000)
    full = dm.assign(bank, live, 3, seed=0, algorithm="full")
    mini = dm.assign(bank, live, 3, seed=0, algorithm="minibatch")
    assert mini.diagnostics["algorithm"] == "minibatch"
    assert nmi(full.labels, mini.labels) >= 0.99


# ----------------------------------------------------------------------------- choosing K


@pytest.mark.parametrize("true_k", [3, 4])
def test_choose_k_finds_the_number_of_blobs(true_k):
    bank, live, domain = blobs(seed=9, n=800, k=true_k, domain_scale=3.0, class_scale=0.3)
    choice = dm.choose_k(bank, range(2, 7), seed=0, sample_size=600)
    assert choice.k == true_k
    assert sorted(choice.scores) == [2, 3, 4, 5, 6]
    assert choice.scores[true_k] == max(choice.scores.values())


# ----------------------------------------------------------------------------- diagnostics


def test_mmd2_hand_computed():
    # Two domains {0, 0} and {1, 1}, γ = 1: within-domain kernels are 1, across e^{-1}, so the
    # unbiased MMD² is 1 + 1 − 2e^{-1}. Squared distances of the 6 pairs: 0,1,1,1,1,0 → median 1.
    x = np.array([[0.0], [0.0], [1.0], [1.0]])
    assert dm.median_heuristic_gamma(x, seed=0) == 1.0
    mean, matrix = dm.domain_mmd2(x, [0, 0, 1, 1], gamma=1.0)
    assert mean == pytest.approx(2 - 2 * math.exp(-1))
    np.testing.assert_allclose(matrix, [[0, 2 - 2 * math.exp(-1)], [2 - 2 * math.exp(-1), 0]])
    mean, matrix = dm.domain_mmd2(x, [0, 0, 0, 1], gamma=1.0)  # domain 1 has one row: no estimate
    assert mean is None and np.isnan(matrix[0, 1])


def test_diagnostics_sizes_nmi_and_mmd():
    bank, live, domain = blobs(seed=10, n=1200)
    result = dm.assign(bank, live, 3, seed=0, true_domain=domain)
    d = result.diagnostics
    sizes = np.array(d["cluster_sizes"])
    assert sizes.shape == (3, 2)
    assert sizes[:, 0].sum() == live.sum() and sizes[:, 1].sum() == (~live).sum()
    np.testing.assert_array_equal(sizes[:, 0], np.bincount(result.labels[live], minlength=3))
    assert d["domain_sizes"] == sizes.sum(axis=1).tolist()
    assert d["nmi_previous"] is None and d["nmi_true_domain"] > 0.95
    assert d["mmd2_pseudo"] > 0.3 and d["mmd2_true"] > 0.3
    # Random domains hold the same mixture: their MMD² is near zero.
    shuffled = dm.domain_labels("random", is_live=live, k=3, seed=0, epoch=0, bank=bank)
    assert abs(shuffled.diagnostics["mmd2_pseudo"]) < 0.02 < d["mmd2_pseudo"]


# ----------------------------------------------------------------------------- ablation switch


def test_true_domain_labels_mapped_in_sorted_name_order():
    live = np.array([1, 0, 1, 0, 1, 0], dtype=bool)
    names = np.array(["oulu", "oulu", "casia", "casia", "msu", "msu"])
    result = dm.domain_labels("true", is_live=live, true_domain=names, seed=0, epoch=0)
    np.testing.assert_array_equal(result.labels, [2, 2, 0, 0, 1, 1])
    assert result.diagnostics["domain_names"] == ["casia", "msu", "oulu"]
    assert result.diagnostics["mmd2_pseudo"] is None  # no bank given
    with pytest.raises(ValueError, match="k=2, but the data has 3 true domains"):
        dm.domain_labels("true", is_live=live, true_domain=names, k=2, seed=0, epoch=0)
    with pytest.raises(ValueError, match="needs true domain labels, but the data has none"):
        dm.domain_labels("true", is_live=live, seed=0, epoch=0)
    missing = np.array(["oulu", None, "casia", "", "msu", "msu"], dtype=object)
    with pytest.raises(ValueError, match="true_domain: 2 of 6 samples have no domain .* row 1"):
        dm.domain_labels("true", is_live=live, true_domain=missing, seed=0, epoch=0)
    one_class = np.array(["a", "b", "a", "b", "a", "a"])  # domain 'b' holds only spoof rows
    with pytest.raises(ValueError, match=r"domains \[1\] no live or no spoof"):
        dm.domain_labels("true", is_live=live, true_domain=one_class, seed=0, epoch=0)


def test_random_domain_labels_balanced_and_seeded_per_epoch():
    live = np.arange(101) % 3 == 0  # 34 live, 67 spoof
    first = dm.domain_labels("random", is_live=live, k=3, seed=4, epoch=1).labels
    again = dm.domain_labels("random", is_live=live, k=3, seed=4, epoch=1).labels
    later = dm.domain_labels("random", is_live=live, k=3, seed=4, epoch=2).labels
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, later)
    for mask in (live, ~live):
        counts = np.bincount(first[mask], minlength=3)
        assert counts.max() - counts.min() <= 1


def test_pseudo_mode_is_assign_seeded_by_epoch():
    bank, live, domain = blobs(seed=11, domain_scale=0.8)
    one = dm.domain_labels("pseudo", is_live=live, k=3, seed=3, epoch=4, bank=bank)
    two = dm.domain_labels("pseudo", is_live=live, k=3, seed=3, epoch=4, bank=bank)
    np.testing.assert_array_equal(one.labels, two.labels)
    direct = dm.assign(bank, live, 3, seed=dm._seed_for(3, 5, 4))
    np.testing.assert_array_equal(one.labels, direct.labels)
    assert one.diagnostics["mode"] == "pseudo"


# ----------------------------------------------------------------------------- bad input


def test_empty_cluster_is_filled_by_splitting_the_largest():
    x = np.array([[0.0], [0.1], [0.2], [10.0], [10.1], [10.2], [5.0], [5.1]])
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])  # cluster 2 empty, cluster 0 holds two groups
    filled, splits = dm._filled_empty_clusters(x, labels, 3, seed=0, name="live")
    assert splits == 1
    groups = {tuple(np.flatnonzero(filled == c)) for c in range(3)}
    assert groups == {(0, 1, 2), (3, 4, 5), (6, 7)}


def test_assign_reports_repaired_empty_cluster(monkeypatch):
    bank, live, domain = blobs(seed=12, n=300)
    raw = dm._kmeans_labels

    def merged(*args, **kw):  # k-means that left cluster 2 empty (its rows went to cluster 0)
        labels = raw(*args, **kw)
        return np.where(labels == 2, 0, labels)

    monkeypatch.setattr(dm, "_kmeans_labels", merged)
    result = dm.assign(bank, live, 3, seed=0)
    assert result.diagnostics["empty_cluster_splits"] == {"live": 1, "spoof": 1}
    assert np.array(result.diagnostics["cluster_sizes"]).min() > 0


def test_too_few_distinct_rows_is_a_clear_error():
    bank = np.repeat(np.array([[0.0, 1.0], [2.0, 3.0]]), 5, axis=0)  # 2 distinct rows per class
    live = np.tile([True, False], 5)
    with pytest.raises(ValueError, match="live samples have only 2 distinct feature rows.*K=3"):
        dm.assign(bank, live, 3, seed=0)


def test_bad_input_errors():
    bank, live, domain = blobs(seed=13, n=60)
    few_live = np.zeros(60, dtype=bool)
    few_live[:2] = True
    with pytest.raises(ValueError, match="the live class has 2 samples, fewer than K=3"):
        dm.assign(bank, few_live, 3, seed=0)
    broken = bank.copy()
    broken[5, 1] = np.nan
    broken[9, 0] = np.inf
    with pytest.raises(ValueError, match=r"bank: 2 non-finite values \(NaN/inf\) in 2 rows; "
                                         r"first at row 5"):
        dm.assign(broken, live, 3, seed=0)
    for k in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match=re.escape("k: expected")):
            dm.assign(bank, live, k, seed=0)
    with pytest.raises(ValueError, match="is_live: expected 60 entries .* got shape \\(59,\\)"):
        dm.assign(bank, live[:-1], 3, seed=0)
    with pytest.raises(ValueError, match="prev_labels: expected 60 entries"):
        dm.assign(bank, live, 3, prev_labels=domain[:-3], seed=0)
    with pytest.raises(ValueError, match="true_domain: expected 60 entries"):
        dm.assign(bank, live, 3, true_domain=domain[:10], seed=0)
    with pytest.raises(ValueError, match=r"prev_labels: expected labels in 0..2; 1 are not, "
                                         r"first at row 0 \(value 7\)"):
        dm.assign(bank, live, 3, prev_labels=np.r_[7, domain[1:]], seed=0)
    with pytest.raises(ValueError, match="is_live: expected booleans or 0"):
        dm.assign(bank, np.full(60, 2), 3, seed=0)
    with pytest.raises(ValueError, match="algorithm: expected one of"):
        dm.assign(bank, live, 3, seed=0, algorithm="elkan")
    with pytest.raises(ValueError, match="bank: expected a non-empty numeric"):
        dm.assign(bank[:, 0], live, 3, seed=0)
    with pytest.raises(ValueError, match="domain_labels mode: expected one of"):
        dm.domain_labels("oracle", is_live=live, k=3, seed=0, epoch=0)
    with pytest.raises(ValueError, match="k_range: K=6 needs more than 6 samples"):
        dm.choose_k(bank[:6], range(2, 7), seed=0)


def test_standardized_keeps_constant_features_at_zero():
    rng = np.random.default_rng(0)
    bank = np.column_stack([rng.normal(3.0, 2.0, 50), np.full(50, 1e6 + 0.1), np.zeros(50)])
    bank = bank.astype(np.float32)
    x = dm.standardized(bank)
    assert x.dtype == np.float64
    np.testing.assert_allclose(x[:, 0].mean(), 0.0, atol=1e-12)
    np.testing.assert_allclose(x[:, 0].std(), 1.0)
    np.testing.assert_array_equal(x[:, 1:], 0.0)
    first = bank[:, 0].astype(np.float64)
    np.testing.assert_allclose(x[:, 0], (first - first.mean()) / first.std(), rtol=1e-10)
