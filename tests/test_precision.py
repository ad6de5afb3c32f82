"""Mixed precision and rematerialisation: a bfloat16 step's losses and gradient directions stay
close to float32's; rematerialising E, as a whole or block by block, changes no number."""

import cv2
import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import random_meta_batch, tiny_config

from d2am_jax import config_check, meta, runtime
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


def _checkpoints(jaxpr) -> int:
    """How many jax.checkpoint regions a jaxpr holds (nested ones included)."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name in ("remat", "remat2", "checkpoint")   # jax.checkpoint's
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += _checkpoints(sub)
    return count


def _remat_config(fast, remat, policy="nothing_saveable"):
    config = tiny_config(resolution=16, width=0.0625, adaptation_dim=4, per_domain_batch=4)
    config.model.fast_conv_grad = fast
    config.model.remat, config.model.remat_policy = remat, policy
    config_check.check(config)
    return config


# jax.checkpoint regions in E's training forward: the stem and the three blocks; or the stem
# and, per block, its three convolution units and its pool unit.
REGIONS = {"none": 0, "blocks": 4, "layers": 13}


@pytest.mark.parametrize("fast", [True, False])
def test_rematerialising_e_block_by_block_or_layer_by_layer_changes_no_number(fast):
    # Both paths of E: the fused units of ops.py (custom VJPs) and XLA's own derivatives; float64.
    # Second order only: the inner step adapts M alone, so E is differentiated once in either
    # order (a VJP whose cotangent the second-order terms through M only change), and the
    # recomputed regions see the same derivative; the first-order program would add 6 compiles
    # (about 70 s of the suite) and test nothing more of rematerialisation.
    with jax.enable_x64(True), runtime.project_random():
        f64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)
        state = state_lib.init_state(_remat_config(fast, "none"), jax.random.PRNGKey(0))
        params, stats = f64(state.params), f64(state.batch_stats)
        batch = random_meta_batch(_remat_config(fast, "none"), seed=1, dtype=np.float64)
        key = jax.random.PRNGKey(2)
        results = {}
        for remat in REGIONS:
            config = _remat_config(fast, remat)
            objective = meta.make_objective(config)
            forward = lambda p, so, objective=objective: objective(p, stats, batch, key, so)
            regions = _checkpoints(jax.make_jaxpr(forward, static_argnums=1)(params, True).jaxpr)
            assert regions == REGIONS[remat]
            options = runtime.training_compiler_options(remat != "none")  # as the steps compile
            fn = jax.jit(jax.value_and_grad(forward, has_aux=True), static_argnums=1,
                         compiler_options=options)
            (total, (new_stats, metrics)), grads = fn(params, True)
            results[remat] = jax.device_get((total, grads, new_stats, metrics))
    plain = results["none"]
    assert np.isfinite(plain[0]) and all(np.any(g != 0) for g in jax.tree.leaves(plain[1]["E"]))
    for remat in ("blocks", "layers"):
        # Recomputation runs the same operations on the same inputs: equal to float64 rounding
        # (loss, every gradient leaf, the new BatchNorm statistics, the metrics).
        for a, b in zip(jax.tree.leaves(results[remat]), jax.tree.leaves(plain)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_whole_e_rematerialisation_is_one_checkpoint_region_and_the_old_default():
    """'encoder' (the default place) wraps all of E once; a config that names only remat_policy,
    as saved before model.remat existed, means the same; 'none' or no policy wrap nothing."""
    config = _remat_config(False, "encoder")
    state = jax.eval_shape(lambda: state_lib.init_state(config, jax.random.PRNGKey(0)))
    batch = random_meta_batch(config)
    old = config.to_dict()
    del old["model"]["remat"]
    cases = [(config, 1), (ml_collections.ConfigDict(old), 1),
             (_remat_config(False, "none"), 0), (_remat_config(False, "encoder", ""), 0)]
    for c, want in cases:
        objective = meta.make_objective(c)
        jaxpr = jax.make_jaxpr(lambda p, s, objective=objective: objective(
            p, s, batch, jax.random.PRNGKey(0), True))(state.params, state.batch_stats)
        assert _checkpoints(jaxpr.jaxpr) == want


@pytest.mark.parametrize("field,value,match", [
    ("dtype", "float16", "config.model.dtype"),
    ("remat_policy", "save_all", "config.model.remat_policy"),
    ("remat", "block", r"config.model.remat: expected one of \('none', 'encoder', 'blocks', "
                       r"'layers'\), got 'block'"),
    ("remat", "blocks", r"config.model.remat_policy: expected a jax.checkpoint_policies name "
                        r"with model.remat='blocks'"),   # remat_policy left at ''
    ("fast_conv_grad", True, "config.model.fast_conv_grad"),   # with dtype='bfloat16' below
])
def test_bad_precision_settings_name_the_field(field, value, match):
    config = _config(dtype="bfloat16")
    config.model[field] = value
    with pytest.raises(ValueError, match=match):
        config_check.check(config)
