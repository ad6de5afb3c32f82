"""A diverged but finite update is never saved: the step reports its updated state's scale, the
host stops the run before saving it, and the message names a checkpoint whose state is good."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import smoke_config

from d2am_jax import checkpointing, logs, meta, train
from d2am_jax import state as state_lib

HEALTHY = {"loss/total": 1.2, "grad_norm/total": 3.0, "state/max_abs_param": 1.5,
           "state/max_abs_batch_stat": 4.0}


def _check(scalars, last_good=6):
    logs.check_finite(scalars, "global step 7", last_good, "/run/checkpoints", initial_scale=1.0)


def test_a_healthy_step_passes():
    _check(HEALTHY)


def test_a_diverged_finite_state_is_refused_naming_the_last_good_checkpoint():
    with pytest.raises(logs.DivergedError, match=r"global step 7.*1e\+06.*step 6 in /run"):
        _check({**HEALTHY, "state/max_abs_param": 1e6})
    with pytest.raises(logs.DivergedError, match="no checkpoint had been saved yet"):
        _check({**HEALTHY, "state/max_abs_param": 1e6}, last_good=None)


@pytest.mark.parametrize("key", ["state/max_abs_param", "state/max_abs_batch_stat"])
def test_a_non_finite_updated_state_is_refused(key):
    with pytest.raises(logs.NonFiniteLossError, match=key):
        _check({**HEALTHY, key: math.nan})


def test_state_scale_is_the_largest_magnitude_and_propagates_nan():
    params = {"a": jnp.array([0.5, -3.0]), "b": {"c": jnp.array([[2.0]])}}
    scale = state_lib.state_scale(params, {"m": jnp.array([-7.0, 1.0])})
    assert float(scale["state/max_abs_param"]) == 3.0
    assert float(scale["state/max_abs_batch_stat"]) == 7.0
    params["b"]["c"] = jnp.array([[np.nan]])
    assert math.isnan(float(state_lib.state_scale(params, params)["state/max_abs_param"]))


def test_a_diverged_update_is_not_saved_and_the_message_names_a_good_checkpoint(tmp_path,
                                                                              monkeypatch):
    real = meta.make_meta_step

    def exploding_make_meta_step(config, *args):
        step_fn = real(config, *args)
        calls = {"n": 0}

        def exploding(state, batch, *, second_order):
            calls["n"] += 1
            if calls["n"] == 2:
                # Adam's first moment made huge: step 2's loss and gradients (taken before the
                # update) stay finite while its update moves every parameter by ≥ 1e10 — what a
                # far too large meta.outer_lr does.
                adam, *rest = state.opt_state
                adam = adam._replace(mu=jax.tree.map(lambda m: jnp.full_like(m, 1e12), adam.mu))
                state = state.replace(opt_state=(adam, *rest))
            return step_fn(state, batch, second_order=second_order)

        exploding.trace_count = step_fn.trace_count
        return exploding

    monkeypatch.setattr(meta, "make_meta_step", exploding_make_meta_step)
    # Step 2 is mid-epoch: checkpointed (every_steps=1) before any evaluation could notice.
    config = smoke_config(num_epochs=1, steps_per_epoch=3, **{"checkpoint.every_steps": 1})
    with pytest.raises(logs.DivergedError, match="global step 2.*last good checkpoint is step 1"):
        train.train_and_evaluate(config, str(tmp_path))
    latest = str(tmp_path / checkpointing.LATEST_DIR)
    assert checkpointing.finalized_steps(latest) == [1]  # the diverged state was not saved
    ckpt = checkpointing.Checkpointer(str(tmp_path), 2)
    initial = state_lib.init_state(config, jax.random.PRNGKey(config.seed))
    restored = ckpt.restore(initial)
    ckpt.close()
    bound = logs.DIVERGED_FACTOR * max(float(np.max(np.abs(p))) for p in
                                       jax.tree.leaves(initial.params))
    assert all(np.isfinite(p).all() and np.max(np.abs(p)) <= bound
               for p in jax.tree.leaves(jax.device_get(restored.state.params)))
