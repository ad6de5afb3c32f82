"""Mixed precision and rematerialisation: a bfloat16 step's losses and gradient directions stay
close to float32's; rematerialising E changes no number."""

import cv2
import jax
import numpy as np
import pytest
from conftest import tiny_config

from d2am_jax import config_check, meta
from d2am_jax import state as state_lib
from d2am_jax.data import synthetic
from d2am_jax.data.dataset import depth_size


def _config(**model):
    config = tiny_config(resolution=32, width=0.125, adaptation_dim=16, per_domain_batch=8)
    config.model.fast_conv_grad = False     # the path bfloat16 runs on (XLA's convolutions)
    for key, value in model.items():
        config.model[key] = value
    return config


def _face_batch():
    """A meta-batch of the built-in synthetic faces (K = 3 domains, 4 live + 4 spoof each), as
    the sampler makes it: uint8 frames and uint8 depth targets."""
    raw = synthetic.generate(synthetic.SyntheticConfig(resolution=32, num_domains=3,
                                                       per_domain=8))
    rows = [np.r_[np.flatnonzero((raw["domain"] == d) & (raw["label"] == 1))[:4],
                  np.flatnonzero((raw["domain"] == d) & (raw["label"] == 0))[:4]]
            for d in range(3)]
    idx = np.stack(rows)
    g = depth_size(32)
    depth = np.stack([[cv2.resize(raw["depth"][i], (g, g), interpolation=cv2.INTER_AREA)
                       for i in row] for row in idx])
    return {"x": raw["image"][idx], "y": raw["label"][idx].astype(np.float32),
            "depth": np.rint(depth * 255).astype(np.uint8)}


def _loss_and_grads(config, state, batch):
    objective = meta.make_objective(config)
    key = jax.random.PRNGKey(3)
    fn = jax.jit(jax.value_and_grad(
        lambda p: objective(p, state.batch_stats, batch, key, True), has_aux=True))
    (total, (_, metrics)), grads = fn(state.params)
    return float(total), jax.device_get(metrics), jax.device_get(grads)


def _cosine(a, b):
    a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (a, b))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def float32_run():
    config = _config()
    state = state_lib.init_state(config, jax.random.PRNGKey(0))
    batch = _face_batch()
    return state, batch, _loss_and_grads(config, state, batch)


def test_bfloat16_losses_and_gradient_directions_stay_close_to_float32(float32_run):
    # bfloat16 keeps 8 significant bits (relative rounding 2⁻⁹ ≈ 0.2 %) in every convolution
    # and activation (the convolutions accumulate in float32). The losses move by about a
    # percent (measured: total 3.768 vs 3.788). M's and D's gradients keep their direction
    # (cosine ≈ 0.95 and 0.99). E's move most (cosine ≈ 0.78): its gradient passes through
    # three max-pools, where rounding changes which element of a window is the maximum and so
    # where the gradient goes, and through BatchNorm over 8-image domain batches; rounding only
    # the input frames to bfloat16 in a float32 network already turns E's gradient by a cosine of
    # ≈ 0.94 at this size. Parameters, BatchNorm statistics, the losses and the inner step stay
    # float32 (checked), so nothing accumulates beyond one step's rounding.
    state, batch, (total32, metrics32, grads32) = float32_run
    total16, metrics16, grads16 = _loss_and_grads(_config(dtype="bfloat16"), state, batch)
    assert abs(total16 - total32) <= 0.02 * abs(total32)
    for key in ("loss/cls_meta_train", "loss/cls_meta_test", "loss/depth", "loss/entropy"):
        assert abs(metrics16[key] - metrics32[key]) <= 0.05 * abs(metrics32[key]), key
    cosines = {module: _cosine(grads16[module], grads32[module]) for module in "EDM"}
    assert cosines["D"] > 0.97 and cosines["M"] > 0.9 and cosines["E"] > 0.7, cosines
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(grads16))


def test_rematerialising_e_changes_no_number(float32_run):
    state, batch, (total, _, grads) = float32_run
    total_r, _, grads_r = _loss_and_grads(_config(remat_policy="nothing_saveable"), state, batch)
    assert total_r == pytest.approx(total, rel=1e-6)
    assert _cosine(grads_r, grads) > 1 - 1e-6
    for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("field,value,match", [
    ("dtype", "float16", "config.model.dtype"),
    ("remat_policy", "save_all", "config.model.remat_policy"),
    ("fast_conv_grad", True, "config.model.fast_conv_grad"),   # with dtype='bfloat16' below
])
def test_bad_precision_settings_name_the_field(field, value, match):
    config = _config(dtype="bfloat16")
    config.model[field] = value
    with pytest.raises(ValueError, match=match):
        config_check.check(config)
