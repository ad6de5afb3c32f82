"""Recomputed BatchNorm statistics (eval.bn_statistics='recomputed'): statistics recomputed from one
batch make evaluation mode score that batch exactly as training mode does — for D²AM (per domain
batch) and for ERM (pooled) —, several batches give the mean of their moments, and a bad setting
names its field."""

import jax
import numpy as np
import pytest
from conftest import random_meta_batch, tiny_config

from d2am_jax import bn_recompute, config_check, erm, models
from d2am_jax import state as state_lib


def _train_mode_logits(config, params, batch_stats, x):
    """E and M in training mode on one batch x (uint8 or float [B, H, W, 3|6]): every BatchNorm
    normalised by x's own statistics."""
    E, _, M = models.build_modules(config.model)
    x = models.model_input(x)
    (feat, _, _), _ = E.apply({"params": params["E"], "batch_stats": batch_stats["E"]}, x, True,
                              mutable=["batch_stats"])
    (logit, _), _ = M.apply({"params": params["M"], "batch_stats": batch_stats["M"]}, feat, True,
                            mutable=["batch_stats"])
    return np.asarray(logit)


def _batch(config, seed):
    """A training batch of the config's method, and the images whose training-mode scores it
    fixes. D²AM: every domain batch the same images, so that the mean of the per-domain moments
    (E, D) and of the meta-train domains' (M) is that one domain batch's. ERM: a pooled batch."""
    batch = random_meta_batch(config, seed=seed)
    if config.method == "d2am":
        batch = {key: np.repeat(value[:1], config.meta.num_domains, axis=0)
                 for key, value in batch.items()}
        return batch, batch["x"][0]
    batch = erm.flat_batch({key: value.reshape(1, -1, *value.shape[2:])
                            for key, value in batch.items()})
    return batch, batch["x"]


@pytest.mark.parametrize("method", ["d2am", "erm"])
def test_statistics_of_one_batch_make_evaluation_equal_training_on_it(method):
    config = tiny_config(resolution=16, width=0.0625, adaptation_dim=4, per_domain_batch=4)
    config.method = method
    config_check.check(config)
    state = state_lib.init_state(config, jax.random.PRNGKey(0))
    batch, x = _batch(config, seed=3)
    moments = bn_recompute.make_batch_moments(config)
    stats = bn_recompute.recompute(moments, state.params, state.batch_stats, [batch])
    assert jax.tree.structure(stats) == jax.tree.structure(state.batch_stats)
    predict = state_lib.make_predict(config)
    evaluated = np.asarray(predict(state.params, stats, x))
    trained = jax.nn.sigmoid(_train_mode_logits(config, state.params, state.batch_stats, x))
    np.testing.assert_allclose(evaluated, trained, rtol=1e-4, atol=1e-5)
    # ... where the running averages (the initial ones here) score it otherwise.
    assert np.max(np.abs(np.asarray(predict(state.params, state.batch_stats, x)) - trained)) > 1e-3

    # Two batches: the mean of their moments.
    other, _ = _batch(config, seed=4)
    both = bn_recompute.recompute(moments, state.params, state.batch_stats, [batch, other])
    alone = bn_recompute.recompute(moments, state.params, state.batch_stats, [other])
    for a, b, c in zip(*map(jax.tree.leaves, (both, stats, alone))):
        assert not np.allclose(b, c)
        np.testing.assert_allclose(a, (b + c) / 2, rtol=1e-5, atol=1e-7)
    assert moments.trace_count() == 1
    with pytest.raises(ValueError, match="no batches"):
        bn_recompute.recompute(moments, state.params, state.batch_stats, [])


@pytest.mark.parametrize("field,value,match", [
    ("bn_statistics", "precise", r"config.eval.bn_statistics: expected one of \('running', "
                                 r"'recomputed'\)"),
    ("bn_batches", 0, "config.eval.bn_batches"),
])
def test_bad_bn_settings_name_the_field(field, value, match):
    config = tiny_config()
    config.eval[field] = value
    with pytest.raises(ValueError, match=match):
        config_check.check(config)
