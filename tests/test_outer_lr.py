"""The outer learning rate β over a run (meta.outer_lr_schedule): Adam's steps follow
β·½(1 + cos(π·t/T)) from β to 0, a training step reports the β it applies, a schedule without the
run's length is refused, and a resume may not change the number of epochs it spans."""

import math

import jax
import numpy as np
import optax
import pytest
from conftest import random_meta_batch, tiny_config

from d2am_jax import config_check, runtime, train
from d2am_jax import state as state_lib
from d2am_jax.errors import UserError


def _cosine(beta, t, total):
    return beta * 0.5 * (1 + math.cos(math.pi * min(t, total) / total))


def test_adam_steps_follow_the_cosine_schedule_from_beta_to_zero():
    # With the same gradient g at every step Adam's bias-corrected direction is g / (|g| + ε),
    # so step t moves each parameter by −β_t · sign(g) (|g| ≫ ε): the schedule itself.
    config = tiny_config()
    config.meta.outer_lr, config.meta.outer_lr_schedule = 1e-2, "cosine"
    total = 6
    tx = state_lib.outer_optimizer(config.meta, total)
    params = {"w": np.array([0.5, -2.0, 3.0], np.float32)}
    grads = {"w": np.array([0.3, -1.0, 2.0], np.float32)}
    opt_state = tx.init(params)
    for t in range(total + 2):
        updates, opt_state = tx.update(grads, opt_state, params)
        np.testing.assert_allclose(np.asarray(updates["w"]),
                                   -_cosine(1e-2, t, total) * np.sign(grads["w"]),
                                   rtol=1e-4, atol=1e-9)
    constant = state_lib.outer_optimizer(tiny_config().meta)       # the default: β throughout
    assert isinstance(constant.init(params)[-1], optax.EmptyState)


def test_training_steps_report_the_scheduled_beta_and_need_the_run_length():
    config = tiny_config()
    config.method, config.meta.outer_lr, config.meta.outer_lr_schedule = "erm", 1e-3, "cosine"
    config_check.check(config)
    state = state_lib.init_state(config, jax.random.PRNGKey(0))
    steps = train._steps(config, runtime.Placement(), 8)           # as train_and_evaluate builds
    reported = []
    for seed in range(3):
        batch = random_meta_batch(config, seed=seed)
        state, metrics = steps.train(state, {k: v.reshape(1, -1, *v.shape[2:])
                                             for k, v in batch.items()})
        reported.append(float(metrics["lr/outer"]))
    np.testing.assert_allclose(reported, [_cosine(1e-3, t, 8) for t in range(3)], rtol=1e-6)
    with pytest.raises(ValueError, match="without the run's total number of outer steps"):
        state_lib.outer_optimizer(config.meta).update(state.params, state.opt_state,
                                                      state.params)


def test_a_resume_may_not_change_the_epochs_a_schedule_spans():
    config = tiny_config()
    saved = config_check.as_dict(config)
    config.num_epochs = saved["num_epochs"] + 5
    assert config_check.resumable_changes(saved, config, "W") == ["num_epochs"]  # constant β
    config.meta.outer_lr_schedule = "cosine"
    saved["meta"]["outer_lr_schedule"] = "cosine"
    with pytest.raises(UserError, match=r"\['num_epochs'\] — meta.outer_lr_schedule spans "
                                        r"num_epochs"):
        config_check.resumable_changes(saved, config, "W")


def test_an_unknown_schedule_names_the_field():
    config = tiny_config()
    config.meta.outer_lr_schedule = "linear"
    with pytest.raises(ValueError, match=r"config.meta.outer_lr_schedule: expected one of "
                                         r"\('constant', 'cosine'\)"):
        config_check.check(config)
