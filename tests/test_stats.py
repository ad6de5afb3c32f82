"""The stats pass: traced once, padding-invariant, equal to an un-jitted E.apply; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2am_jax import domains, models, stats
from d2am_jax.configs import default
from d2am_jax.data.color import rgb_to_model_input
from d2am_jax.data.sampler import InMemoryFrames, MetaBatchSampler

RES, WIDTH, B = 32, 0.125, 4
CHANNELS = models.scaled(128, WIDTH)  # every DRLM follows a 128-channel conv


def small_config():
    config = default.get_config()
    config.data.resolution = RES
    config.model.width = WIDTH
    return config


def random_frames(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, RES, RES, 3), dtype=np.uint8)


def trained_variables(config, seed):
    """E's params (He-scaled normal) and running BatchNorm statistics away from their init (mean 0,
    var 1), so that evaluation-mode normalization is not the identity. Drawn with numpy: compiling
    jax's threefry for every parameter would cost the test tens of seconds here."""
    E, _, _ = models.build_modules(config.model)
    x = jnp.zeros((1, RES, RES, 6))
    shapes = jax.eval_shape(lambda x: E.init(jax.random.key(0), x, True), x)
    rng = np.random.default_rng(seed)

    def param(path, leaf):
        name = path[-1].key
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if len(leaf.shape) > 1:                    # conv / dense kernels
            return noise * np.float32(np.sqrt(2.0 / np.prod(leaf.shape[:-1])))
        return 1.0 + 0.1 * noise if name == "scale" else 0.1 * noise

    def running(path, leaf):
        if path[-1].key == "mean":
            return 0.2 * rng.standard_normal(leaf.shape).astype(np.float32)
        return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)

    return (jax.tree_util.tree_map_with_path(param, shapes["params"]),
            jax.tree_util.tree_map_with_path(running, shapes["batch_stats"]))


@pytest.fixture(scope="module")
def setup():
    config = small_config()
    params, batch_stats = trained_variables(config, 0)
    return config, stats.make_stats_pass(config, B), params, batch_stats


def assert_stats_close(a, b, rtol=1e-5, atol=1e-6):
    assert len(a) == len(b) == 3
    for j in range(3):
        assert set(a[j]) == set(b[j]) == set(stats.STATS_KEYS)
        for key in stats.STATS_KEYS:
            np.testing.assert_allclose(a[j][key], b[j][key], rtol=rtol, atol=atol,
                                       err_msg=f"DRLM {j} '{key}'")


def test_shapes_and_match_with_unjitted_apply(setup):
    config, stats_pass, params, batch_stats = setup
    frames = random_frames(7, 1)  # 2 batches of 4, the last padded by 1
    out = stats_pass(params, batch_stats, InMemoryFrames(frames))
    for s in out:
        for key in stats.STATS_KEYS:
            assert s[key].shape == (7, CHANNELS) and s[key].dtype == np.float32
            assert isinstance(s[key], np.ndarray)
    E, _, _ = models.build_modules(config.model)
    _, _, drlm = E.apply({"params": params, "batch_stats": batch_stats},
                         jnp.asarray(rgb_to_model_input(frames)), False)
    direct = [{key: np.asarray(d[key]) for key in stats.STATS_KEYS} for d in drlm]
    assert_stats_close(out, direct, rtol=1e-4, atol=1e-5)
    # Attention is a sigmoid and std is at least sqrt(eps): the comparison is not trivially zero.
    assert all(0 < s["attention"].min() and s["attention"].max() < 1 for s in out)
    assert all(s["std"].min() > 1e-3 and np.ptp(s["mean"]) > 1e-3 for s in out)


def test_padding_does_not_change_real_samples(setup):
    _, stats_pass, params, batch_stats = setup
    frames = random_frames(6, 2)  # batches [0..3] and [4, 5, pad, pad]
    padded = stats_pass(params, batch_stats, frames)
    # Samples 4 and 5 again, now in a full batch next to other real images (no padding at all).
    full = stats_pass(params, batch_stats, frames[[4, 5, 0, 1]])
    tail = [{key: s[key][4:6] for key in s} for s in padded]
    head = [{key: s[key][:2] for key in s} for s in full]
    assert_stats_close(tail, head)
    # And the overlap with the first batch: sample 0 and 1 keep their numbers in another batch.
    assert_stats_close([{k: s[k][:2] for k in s} for s in padded],
                       [{k: s[k][2:4] for k in s} for s in full])


def test_micro_batches_change_no_number(setup):
    config, stats_pass, params, batch_stats = setup
    assert stats_pass.micro_batch == B  # the largest divisor of 4 that is ≤ MAX_MICRO_BATCH
    assert stats.make_stats_pass(config, 12).micro_batch == 6
    frames = random_frames(7, 8)
    in_pairs = stats.make_stats_pass(config, B, micro_batch=2)
    assert_stats_close(in_pairs(params, batch_stats, frames),
                       stats_pass(params, batch_stats, frames))


def test_traced_once_across_calls_data_and_params(setup):
    config, _, params, batch_stats = setup
    stats_pass = stats.make_stats_pass(config, B)
    stats_pass(params, batch_stats, InMemoryFrames(random_frames(9, 3)))   # 3 batches, 3 pad rows
    stats_pass(params, batch_stats, random_frames(4, 4))                   # exactly one batch
    new_params = jax.tree.map(lambda p: p * 1.01, params)                  # a later epoch's E
    stats_pass(new_params, batch_stats, random_frames(5, 5))
    assert stats_pass.trace_count() == 1


def test_input_iterables_give_the_frame_store_result(setup):
    config, stats_pass, params, batch_stats = setup
    frames = random_frames(10, 6)
    reference = stats_pass(params, batch_stats, frames)
    x = rgb_to_model_input(frames)
    # Uneven pieces are regrouped into full batches; a generator works as well as a list.
    pieces = [x[:3], x[3:4], x[4:10]]
    assert_stats_close(stats_pass(params, batch_stats, pieces), reference)
    assert_stats_close(stats_pass(params, batch_stats, (p for p in pieces)), reference)
    # The sampler's padded evaluation batches: masked rows are dropped.
    sampler = MetaBatchSampler(InMemoryFrames(frames), np.arange(10) % 2, None, num_domains=3,
                               per_domain_batch=2, depth_size=4, seed=0)
    from_sampler = stats_pass(params, batch_stats, sampler.eval_batches(np.arange(10), 3))
    assert_stats_close(from_sampler, reference)


def test_compute_bank_is_domain_features_of_the_stats(setup):
    _, stats_pass, params, batch_stats = setup
    frames = random_frames(5, 7)
    raw = stats_pass(params, batch_stats, frames)
    for mode, dim in (("dataset", 3 * CHANNELS), ("none", 6 * CHANNELS)):
        bank = stats.compute_bank(stats_pass, params, batch_stats, frames, mode)
        assert bank.shape == (5, dim)
        np.testing.assert_array_equal(bank, domains.domain_features(raw, mode))
    # 'dataset': the first DRLM's block is μ over its C/2 lowest-mean-attention channels.
    low = np.argsort(raw[0]["attention"].mean(axis=0), kind="stable")[: CHANNELS // 2]
    bank = stats.compute_bank(stats_pass, params, batch_stats, frames, "dataset")
    np.testing.assert_array_equal(bank[:, : CHANNELS // 2], raw[0]["mean"][:, low])


@pytest.mark.parametrize("source, message", [
    (np.zeros((3, 16, 16, 3), np.uint8), r"frames 0–2 .* \(3, 16, 16, 3\).*data.resolution=32"),
    (np.zeros((3, RES, RES, 3), np.float32), r"dtype float32; expected uint8"),
    (np.zeros((0, RES, RES, 3), np.uint8), r"no samples"),
    ([np.zeros((2, RES, RES, 3), np.float32)],
     r"input batch 0 field 'x' .* float32; expected \[m, r, r, C\]"),
    ([{"y": np.zeros(2)}], r"input batch 0 has keys \['y'\]; expected 'x'"),
    ([{"x": np.zeros((2, RES, RES, 6), np.float32), "mask": np.ones(3, bool)}],
     r"input batch 0 field 'mask' .* expected bool \[2\]"),
    (42, r"neither a frame store"),
])
def test_bad_input_names_what_was_expected(setup, source, message):
    _, stats_pass, params, batch_stats = setup
    with pytest.raises(ValueError, match=message):
        stats_pass(params, batch_stats, source)


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True])
def test_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size must be an integer ≥ 1"):
        stats.make_stats_pass(small_config(), batch_size)


@pytest.mark.parametrize("micro_batch", [0, 3, 8, 2.0])
def test_bad_micro_batch(micro_batch):
    with pytest.raises(ValueError, match="micro_batch must be a divisor of batch_size=4"):
        stats.make_stats_pass(small_config(), 4, micro_batch)
