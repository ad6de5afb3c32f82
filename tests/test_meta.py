"""The jitted meta-step: one trace per order, metrics, training signal, BatchNorm statistics, bad
input."""

import jax
import numpy as np
import pytest
from conftest import random_meta_batch, tiny_config

from d2am_jax import meta
from d2am_jax import state as state_lib


@pytest.fixture(scope="module")
def compiled():
    """One config and one meta_step shared by the tests below (each compile costs seconds)."""
    config = tiny_config()
    config.meta.outer_lr = 1e-3
    return config, meta.make_meta_step(config)


def _changed(a, b):
    return any(
        not np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def test_traced_once_per_order_across_steps_with_different_data(compiled):
    config, step = compiled
    state = state_lib.init_state(config, jax.random.PRNGKey(0))
    for s in range(3):
        state, metrics = step(state, random_meta_batch(config, seed=s), second_order=True)
    assert step.trace_count() == 1
    assert int(state.step) == 3
    for s in range(2):
        state, _ = step(state, random_meta_batch(config, seed=10 + s), second_order=False)
    assert step.trace_count() == 2
    expected = {
        "loss/total",
        "loss/cls_meta_train",
        "loss/mmd_meta_train",
        "loss/cls_meta_test",
        "loss/mmd_meta_test",
        "loss/depth",
        "loss/entropy",
        "loss/entropy_head",
        *(f"drlm/{name}_{j}" for name in ("p_margin", "wp_norm") for j in (1, 2, 3)),
        "acc/meta_train",
        "acc/meta_test",
        "grad_norm/E",
        "grad_norm/D",
        "grad_norm/M",
        "grad_norm/total",
        "state/max_abs_param",
        "state/max_abs_batch_stat",
    }
    assert expected == set(metrics)
    assert all(np.ndim(v) == 0 and np.isfinite(v) for v in metrics.values())


def test_a_few_steps_on_a_fixed_batch_lower_the_total_loss(compiled):
    config, step = compiled
    state = state_lib.init_state(config, jax.random.PRNGKey(0))
    batch = random_meta_batch(config)
    history = []
    for _ in range(8):
        state, metrics = step(state, batch, second_order=True)
        history.append(float(metrics["loss/total"]))
    assert np.all(np.isfinite(history))
    assert history[-1] < 0.8 * history[0], history


def test_state_is_donated_and_running_statistics_move(compiled):
    config, step = compiled
    state = state_lib.init_state(config, jax.random.PRNGKey(0))
    before = jax.tree.map(np.asarray, state.batch_stats)
    old_params = state.params
    state, _ = step(state, random_meta_batch(config), second_order=True)
    for name in ("E", "D", "M"):
        assert _changed(state.batch_stats[name], before[name])
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old_params))
    x = random_meta_batch(config)["x"][0]
    p = np.asarray(state_lib.make_predict(config)(state.params, state.batch_stats, x))
    assert p.shape == (config.meta.per_domain_batch,)
    assert np.all((p >= 0) & (p <= 1))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b.update(x=b["x"][..., :3]), "'x' has shape"),
        (lambda b: b.update(x=b["x"][:, :, :16, :16]), "data.resolution=32"),
        (lambda b: b.update(x=b["x"][:2]), "'y' has shape"),
        (lambda b: b.update(y=b["y"][:, :2]), "'y' has shape"),
        (lambda b: b.update(depth=b["depth"][..., :2]), "'depth' has shape"),
        (lambda b: b.pop("depth"), "missing field 'depth'"),
    ],
)
def test_bad_batches_fail_before_tracing_with_the_field_named(mutate, message):
    config = tiny_config()
    step = meta.make_meta_step(config)
    batch = random_meta_batch(config)
    mutate(batch)
    with pytest.raises(ValueError, match=message):
        step(None, batch, second_order=True)
    assert step.trace_count() == 0


def test_a_batch_with_one_domain_is_refused():
    config = tiny_config()
    batch = {key: value[:1] for key, value in random_meta_batch(config).items()}
    with pytest.raises(ValueError, match="K ≥ 2"):
        meta.validate_batch(batch, config)


def test_width_that_rounds_a_layer_to_zero_is_refused():
    config = tiny_config(width=0.001)
    with pytest.raises(ValueError, match="model.width=0.001"):
        state_lib.init_state(config, jax.random.PRNGKey(0))
