"""The meta-batch sampler and frame stores: balance, domain purity, determinism, padding, errors."""

import logging

import numpy as np
import pytest

from d2am_jax.data.depth import face_depth_prior
from d2am_jax.data.sampler import CachedFrames, InMemoryFrames, MetaBatchSampler

N, RES, K, B, D = 60, 8, 3, 4, 2


def indexed_frames(n: int = N, res: int = RES) -> np.ndarray:
    """Frames whose red channel holds i % 256 and green i // 256, so a batch reveals its indices."""
    frames = np.zeros((n, res, res, 3), np.uint8)
    frames[..., 0] = (np.arange(n) % 256)[:, None, None]
    frames[..., 1] = (np.arange(n) // 256)[:, None, None]
    frames[..., 2] = 77
    return frames


def indices_of(x: np.ndarray) -> np.ndarray:
    rgb = x[..., 0, 0, :3].astype(int)
    return rgb[..., 0] + 256 * rgb[..., 1]


LABELS = np.arange(N) % 2  # odd = live
PSEUDO = (np.arange(N) // 2) % K  # each domain gets both classes


def make(frames=None, labels=LABELS, depth=None, **kw):
    args = dict(num_domains=K, per_domain_batch=B, depth_size=D, seed=0)
    args.update(kw)
    return MetaBatchSampler(frames if frames is not None else InMemoryFrames(indexed_frames()),
                            labels, depth, **args)


def test_meta_batch_layout_and_ranges():
    batch = make().meta_batch(PSEUDO, epoch=0, step=0)
    # What crosses to the device is uint8: frames as stored, depth as k/255.
    assert batch["x"].shape == (K, B, RES, RES, 3) and batch["x"].dtype == np.uint8
    assert batch["y"].shape == (K, B) and batch["y"].dtype == np.float32
    assert batch["depth"].shape == (K, B, D, D) and batch["depth"].dtype == np.uint8
    assert batch["domains"].shape == (K,) and batch["domains"].dtype == np.int32
    # x is exactly the chosen frames.
    idx = indices_of(batch["x"])
    np.testing.assert_array_equal(batch["x"], indexed_frames()[idx])
    np.testing.assert_array_equal(batch["y"], LABELS[idx])


def test_each_domain_batch_is_balanced_pure_and_the_meta_test_domain_is_another():
    sampler = make()
    seen_test = set()
    for step in range(20):
        batch = sampler.meta_batch(PSEUDO, epoch=1, step=step)
        np.testing.assert_array_equal(batch["y"].sum(axis=1), [B // 2] * K)
        assert sorted(batch["domains"]) == list(range(K))  # a permutation: test ∉ train
        idx = indices_of(batch["x"])
        for row, dom in enumerate(batch["domains"]):
            np.testing.assert_array_equal(PSEUDO[idx[row]], dom)
        seen_test.add(int(batch["domains"][-1]))
    assert seen_test == set(range(K))  # every domain takes its turn as meta-test


def test_meta_indices_agree_with_meta_batch():
    sampler = make()
    idx, order = sampler.meta_indices(PSEUDO, 2, 5)
    batch = sampler.meta_batch(PSEUDO, 2, 5)
    np.testing.assert_array_equal(indices_of(batch["x"]), idx)
    np.testing.assert_array_equal(batch["domains"], order)


def test_deterministic_per_seed_epoch_step():
    a, b = make(), make()  # a resumed run builds a fresh sampler with the same seed
    first = a.meta_batch(PSEUDO, 3, 7)
    for key, value in b.meta_batch(PSEUDO, 3, 7).items():
        np.testing.assert_array_equal(value, first[key])
    idx = a.meta_indices(PSEUDO, 3, 7)[0]
    assert not np.array_equal(idx, a.meta_indices(PSEUDO, 3, 8)[0])
    assert not np.array_equal(idx, a.meta_indices(PSEUDO, 4, 7)[0])
    assert not np.array_equal(idx, make(seed=1).meta_indices(PSEUDO, 3, 7)[0])


def test_replacement_only_where_a_domain_is_short():
    i = np.arange(N)
    pseudo = np.where(i < 2, 0, 1 + (i // 2) % 2)  # domain 0: one spoof (0) and one live (1)
    sampler = make(per_domain_batch=8)
    for step in range(5):
        idx, order = sampler.meta_indices(pseudo, 0, step)
        for row, dom in zip(idx, order):
            if dom == 0:
                assert sorted(set(row)) == [0, 1]  # 4 copies of each
                assert np.bincount(row, minlength=2)[:2].tolist() == [4, 4]
            else:
                assert len(set(row)) == 8  # enough examples: no repeats


def test_a_short_domain_is_named_once_per_assignment(caplog):
    i = np.arange(N)
    pseudo = np.where(i < 2, 0, 1 + (i // 2) % 2)  # domain 0: one spoof (0) and one live (1)
    sampler = make(per_domain_batch=8)
    with caplog.at_level(logging.WARNING, logger="d2am_jax.data.sampler"):
        for step in range(3):
            sampler.meta_indices(pseudo, 0, step)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("pseudo domain 0 has 1 live examples for the 4 live places" in m
               for m in messages) == 1
    assert sum("pseudo domain 0 has 1 spoof examples for the 4 spoof places" in m
               for m in messages) == 1
    assert not any("pseudo domain 1" in m or "pseudo domain 2" in m for m in messages)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="d2am_jax.data.sampler"):
        make().meta_indices(PSEUDO, 0, 0)  # 10 per class and domain for 2 places: no word
    assert not caplog.records


def test_prior_depth_for_live_and_zeros_for_spoof():
    batch = make().meta_batch(PSEUDO, 0, 0)
    live = batch["y"] == 1
    prior = np.rint(face_depth_prior(D) * 255).astype(np.uint8)
    np.testing.assert_array_equal(batch["depth"][live], np.broadcast_to(prior, (live.sum(), D, D)))
    assert np.all(batch["depth"][~live] == 0)


class ConstantDepth:
    """A depth store of 16×16 maps holding 0.5 everywhere (spoof included, to be zeroed)."""

    def __len__(self):
        return N

    def __getitem__(self, idx):
        return np.full((len(idx), 16, 16), 0.5, np.float32)


def test_depth_store_is_resized_and_spoof_zeroed():
    batch = make(depth=ConstantDepth(), depth_size=4).meta_batch(PSEUDO, 0, 0)
    assert batch["depth"].shape == (K, B, 4, 4)
    expected = np.broadcast_to(np.rint(127.5 * batch["y"][..., None, None]), (K, B, 4, 4))
    np.testing.assert_array_equal(batch["depth"], expected)


def test_pooled_batch_is_balanced_and_deterministic():
    sampler = make()
    batch = sampler.pooled_batch(0, 3)
    assert batch["x"].shape == (1, K * B, RES, RES, 3)
    assert batch["y"].shape == (1, K * B) and batch["depth"].shape == (1, K * B, D, D)
    assert batch["y"].sum() == K * B // 2
    np.testing.assert_array_equal(batch["domains"], [-1])
    np.testing.assert_array_equal(make().pooled_batch(0, 3)["x"], batch["x"])


def test_eval_batches_pad_and_mask_in_order():
    indices = np.array([5, 9, 1, 0, 33, 2, 7, 8, 11, 59])
    batches = list(make().eval_batches(indices, batch_size=4))
    assert len(batches) == 3
    for b in batches:
        assert b["x"].shape == (4, RES, RES, 3) and b["y"].shape == (4,)
        assert b["mask"].dtype == np.bool_
    np.testing.assert_array_equal(batches[-1]["mask"], [True, True, False, False])
    assert np.all(batches[-1]["x"][2:] == 0) and np.all(batches[-1]["y"][2:] == 0)
    real = np.concatenate([indices_of(b["x"])[b["mask"]] for b in batches])
    np.testing.assert_array_equal(real, indices)
    np.testing.assert_array_equal(np.concatenate([b["y"][b["mask"]] for b in batches]),
                                  LABELS[indices])


class CountingDecoder:
    def __init__(self, frames):
        self.frames = frames
        self.calls = np.zeros(len(frames), int)

    def __call__(self, i):
        self.calls[i] += 1
        return self.frames[i]


def test_cached_frames_decode_each_index_once():
    decoder = CountingDecoder(indexed_frames())
    store = CachedFrames(N, decoder, budget_bytes=10 ** 6)
    rng = np.random.default_rng(0)
    for _ in range(5):
        idx = rng.integers(0, N, 25)
        np.testing.assert_array_equal(store[idx], indexed_frames()[idx])
    store[np.array([4, 4, 4])]  # repeats within one call
    assert decoder.calls.max() == 1
    decoded_before = int((decoder.calls == 1).sum())
    assert store.warm() == N - decoded_before
    np.testing.assert_array_equal(decoder.calls, 1)
    assert store.num_cached == N


def test_cached_frames_beyond_budget_decode_on_demand_and_say_so_once(caplog):
    decoder = CountingDecoder(indexed_frames())
    frame_bytes = RES * RES * 3
    store = CachedFrames(N, decoder, budget_bytes=10 * frame_bytes)
    with caplog.at_level(logging.WARNING, logger="d2am_jax.data.sampler"):
        for _ in range(3):
            np.testing.assert_array_equal(store[np.arange(N)], indexed_frames())
    assert store.num_cached == 10
    assert decoder.calls[:10].tolist() == [1] * 10  # cached
    assert decoder.calls[10:].tolist() == [3] * (N - 10)  # decoded at every use
    assert len([r for r in caplog.records if "budget" in r.getMessage()]) == 1


def test_sampler_over_cached_frames_matches_in_memory():
    cached = CachedFrames(N, CountingDecoder(indexed_frames()), budget_bytes=10 ** 6)
    a = make().meta_batch(PSEUDO, 1, 1)
    b = make(frames=cached).meta_batch(PSEUDO, 1, 1)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


# -- errors before training -------------------------------------------------------------------

def test_pseudo_domain_without_a_class_is_named():
    pseudo = PSEUDO.copy()
    pseudo[(pseudo == 1) & (LABELS == 1)] = 0  # domain 1 loses its live examples
    with pytest.raises(ValueError, match="domain 1 has 0 live"):
        make().meta_batch(pseudo, 0, 0)


def test_pseudo_domain_of_wrong_length_or_range():
    with pytest.raises(ValueError, match=rf"pseudo_domain must have shape \({N},\)"):
        make().meta_batch(PSEUDO[:-1], 0, 0)
    bad = PSEUDO.copy()
    bad[7] = K
    with pytest.raises(ValueError, match="index 7"):
        make().meta_batch(bad, 0, 0)


def test_labels_outside_0_1_are_named():
    labels = LABELS.copy()
    labels[12] = 2
    with pytest.raises(ValueError, match="label 2 at index 12"):
        make(labels=labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        make(labels=LABELS[:-3])


def test_source_without_spoof_is_an_error():
    with pytest.raises(ValueError, match="0 spoof"):
        make(labels=np.ones(N, int))


def test_frame_of_wrong_shape_or_channels_names_its_index():
    frames = list(indexed_frames(5))
    frames[3] = np.zeros((RES, RES, 4), np.uint8)
    with pytest.raises(ValueError, match="frame 3"):
        InMemoryFrames(frames)
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        InMemoryFrames(np.zeros((4, RES, RES, 1), np.uint8))

    def decode(i):
        return np.zeros((RES, RES + (i == 5), 3), np.uint8)  # frame 5 is one pixel wider

    sampler = make(frames=CachedFrames(N, decode, budget_bytes=10 ** 6))
    with pytest.raises(ValueError, match="frame 5"):
        sampler.check_frames()
