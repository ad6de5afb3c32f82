"""The network: the full-width model at 256×256 against the layer table (shape evaluation only), and
the fused training path of E and D against plain autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2am_jax import models, ops
from d2am_jax.configs import default


def _conv_bn(cin, cout):
    return 9 * cin * cout + 2 * cout  # bias-free 3×3 conv, BatchNorm scale and bias


def _drlm(c, tau):
    hidden = max(1, c // tau)
    return (c * hidden + hidden) + (hidden * c + c) + (c + 1)  # W1, W2, Wp (with biases)


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def full():
    config = default.get_config()
    E, D, M = models.build_modules(config.model)
    x = jax.ShapeDtypeStruct((2, 256, 256, 6), jnp.float32)
    key = jax.random.PRNGKey(0)
    vars_e = jax.eval_shape(lambda x: E.init(key, x, True), x)
    (feat, blocks, drlm), _ = jax.eval_shape(
        lambda v, x: E.apply(v, x, True, mutable=["batch_stats"]), vars_e, x
    )
    vars_d = jax.eval_shape(lambda b: D.init(key, b, True), blocks)
    depth, _ = jax.eval_shape(
        lambda v, b: D.apply(v, b, True, mutable=["batch_stats"]), vars_d, blocks
    )
    vars_m = jax.eval_shape(lambda f: M.init(key, f, True), feat)
    (logit, h), _ = jax.eval_shape(
        lambda v, f: M.apply(v, f, True, mutable=["batch_stats"]), vars_m, feat
    )
    return dict(
        config=config,
        E=E,
        D=D,
        M=M,
        vars_e=vars_e,
        vars_d=vars_d,
        vars_m=vars_m,
        feat=feat,
        blocks=blocks,
        drlm=drlm,
        depth=depth,
        logit=logit,
        h=h,
    )


def test_output_shapes_follow_the_layer_table(full):
    assert full["feat"].shape == (2, 32, 32, 128)
    assert [b.shape for b in full["blocks"]] == [
        (2, 128, 128, 128),
        (2, 64, 64, 128),
        (2, 32, 32, 128),
    ]
    for stats in full["drlm"]:
        assert stats["attention"].shape == stats["mean"].shape == stats["std"].shape == (2, 128)
        assert stats["p_logit"].shape == (2,)
    assert full["depth"].shape == (2, 32, 32)
    assert full["logit"].shape == (2,)
    assert full["h"].shape == (2, full["config"].model.adaptation_dim)


def test_parameter_counts_follow_the_layer_table(full):
    tau = full["config"].model.drlm_reduction
    e = _conv_bn(6, 64)
    cin = 64
    for _ in range(3):
        e += _conv_bn(cin, 128) + _conv_bn(128, 196) + _conv_bn(196, 128) + _drlm(128, tau)
        cin = 128
    d = _conv_bn(3 * 128, 128) + _conv_bn(128, 64) + (9 * 64 + 1)
    hdim = full["config"].model.adaptation_dim
    m = (
        _conv_bn(128, 128)
        + _conv_bn(128, 256)
        + _conv_bn(256, 512)
        + (512 * hdim + hdim)
        + (hdim + 1)
    )
    assert _count(full["vars_e"]["params"]) == e
    assert _count(full["vars_d"]["params"]) == d
    assert _count(full["vars_m"]["params"]) == m


def test_forward_is_about_100_gflop_per_image_at_paper_scale(full):
    # The network's FLOPs as direct convolutions (the fast path's Winograd convs do fewer
    # multiplies).
    E, M = full["E"].clone(fast_grad=False), full["M"].clone(fast_grad=False)

    def forward(ve, vm, x):
        feat = E.apply(ve, x, False)[0]
        return M.apply(vm, feat, False)

    x = jax.ShapeDtypeStruct((1, 256, 256, 6), jnp.float32)
    cost = jax.jit(forward).lower(full["vars_e"], full["vars_m"], x).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert 85e9 < cost["flops"] < 115e9, cost["flops"]


def _e_and_d_loss(E, D, variables_e, variables_d, x, groups, t):
    """A scalar of everything E and D return in training mode, and their new running statistics."""
    (feat, blocks, drlm), new_e = E.apply(
        variables_e, x, True, groups=groups, mutable=["batch_stats"]
    )
    depth, new_d = D.apply(variables_d, blocks, True, groups=groups, mutable=["batch_stats"])
    value = (
        jnp.sum(jnp.sin(feat) * t) + jnp.sum(depth**2) + sum(jnp.sum(s["p_logit"]) for s in drlm)
    )
    return value, (new_e, new_d)


def test_fused_training_path_equals_plain_autodiff_with_per_domain_statistics(monkeypatch):
    """E and D with the fused units of `ops` (fast_grad) against the same layers in plain jnp with
    XLA's derivatives: value, every parameter gradient and the running statistics, in float64."""
    monkeypatch.setattr(
        ops, "WINOGRAD_MIN_CHANNELS", 1
    )  # Winograd at this test's channel counts too
    with jax.enable_x64(True):
        config = default.get_config()
        config.model.width = 0.0625
        config.model.drlm_reduction = 4
        E, D, _ = models.build_modules(config.model)
        E_ref = E.clone(fast_grad=False)
        D_ref = D.clone(fast_grad=False)
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.random((6, 16, 16, 6)))
        to64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
        ve = to64(jax.jit(lambda k: E.init(k, x, True))(jax.random.PRNGKey(0)))
        blocks = jax.jit(lambda v: E.apply(v, x, True, mutable=["batch_stats"])[0][1])(ve)
        vd = to64(jax.jit(lambda k: D.init(k, blocks, True))(jax.random.PRNGKey(1)))
        # Running statistics away from their init, so that the update rule is visible.
        ve["batch_stats"] = jax.tree.map(lambda a: a + 0.3, ve["batch_stats"])
        t = jnp.asarray(rng.standard_normal((6, 2, 2, 8)))

        def grads(E_, D_):
            def f(pe, pd):
                return _e_and_d_loss(E_, D_, {**ve, "params": pe}, {**vd, "params": pd}, x, 3, t)

            return jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(ve["params"], vd["params"])

        (value, stats), g = grads(E, D)
        (value_ref, stats_ref), g_ref = grads(E_ref, D_ref)
        np.testing.assert_allclose(value, value_ref, rtol=1e-12)
        for a, b in zip(jax.tree.leaves((g, stats)), jax.tree.leaves((g_ref, stats_ref))):
            np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-11)
        # Per-domain statistics: grouping the batch differently changes the result.
        other = jax.jit(lambda: _e_and_d_loss(E, D, ve, vd, x, 1, t)[0])()
        assert abs(float(other) - float(value)) > 1e-6


def test_batch_that_does_not_split_into_groups_is_refused():
    config = default.get_config()
    config.model.width = 0.0625
    E, _, _ = models.build_modules(config.model)
    x = jax.ShapeDtypeStruct((5, 16, 16, 6), jnp.float32)
    variables = jax.eval_shape(lambda x: E.init(jax.random.PRNGKey(0), x, True), x)
    with pytest.raises(ValueError, match="groups=2"):  # raised while tracing, before any compute
        jax.eval_shape(
            lambda v, x: E.apply(v, x, True, groups=2, mutable=["batch_stats"]), variables, x
        )


def test_adaptive_average_pool_equals_hand_computation():
    f = (np.arange(2 * 8 * 5 * 3).reshape(2, 8, 5, 3) ** 1.5).astype(np.float32)
    out = np.asarray(models.adaptive_avg_pool(jnp.asarray(f), (2, 2)))
    # Rows: 8 → 2 in blocks of 4; columns: 5 → 2 in PyTorch's bins [0, 3) and [2, 5).
    for i, rows in enumerate((slice(0, 4), slice(4, 8))):
        for j, cols in enumerate((slice(0, 3), slice(2, 5))):
            np.testing.assert_allclose(out[:, i, j], f[:, rows, cols].mean(axis=(1, 2)),
                                       rtol=1e-6)


def test_depth_head_average_pools_the_blocks_to_the_last_grid():
    """D on the three blocks equals D on those blocks already averaged over their 4×4 and 2×2
    cells by hand: every pixel counts (bilinear resizing without antialiasing reads only a few)."""
    config = default.get_config()
    config.model.width = 0.0625
    _, D, _ = models.build_modules(config.model)
    rng = np.random.default_rng(0)
    blocks = [rng.standard_normal((4, s, s, 8)) for s in (16, 8, 4)]
    by_hand = [b.reshape(4, 4, b.shape[1] // 4, 4, b.shape[2] // 4, 8).mean(axis=(2, 4))
               for b in blocks]
    by_hand[-1] = blocks[-1]
    apply = jax.jit(lambda v, bs: D.apply(v, bs, True, mutable=["batch_stats"])[0])
    variables = jax.jit(lambda b: D.init(jax.random.PRNGKey(0), b, True))(
        [jnp.asarray(b, jnp.float32) for b in blocks])
    np.testing.assert_allclose(apply(variables, [jnp.asarray(b, jnp.float32) for b in blocks]),
                               apply(variables, [jnp.asarray(b, jnp.float32) for b in by_hand]),
                               rtol=1e-5, atol=1e-5)


def test_rfm_max_pool_is_2x2_stride_2_and_floors_odd_sizes():
    x = np.random.default_rng(0).standard_normal((2, 5, 6, 3)).astype(np.float32)
    out = np.asarray(models.max_pool(jnp.asarray(x), window=2))
    expected = x[:, :4, :6].reshape(2, 2, 2, 3, 2, 3).max(axis=(2, 4))  # MaxPool2d(2)
    np.testing.assert_array_equal(out, expected)
    assert models.max_pool(jnp.asarray(x)).shape == (2, 3, 3, 3)  # SSDG's 3×3/2 pad 1: ceil


def test_pool_window_2_runs_e_and_m_with_2x2_pools():
    config = default.get_config()
    config.model.width = 0.0625
    config.model.pool_window = 2
    E, D, M = models.build_modules(config.model)
    # 36 → 18 → 9 → 4 with 2×2 pools (floor); SSDG's 3×3 pools would give 18, 9, 5.
    x = jax.ShapeDtypeStruct((2, 36, 36, 6), jnp.float32)
    key = jax.random.PRNGKey(0)
    ve = jax.eval_shape(lambda x: E.init(key, x, True), x)
    (feat, blocks, _), _ = jax.eval_shape(
        lambda v, x: E.apply(v, x, True, mutable=["batch_stats"]), ve, x)
    assert [b.shape[1] for b in blocks] == [18, 9, 4]
    vm = jax.eval_shape(lambda f: M.init(key, f, True), feat)
    (logit, _), _ = jax.eval_shape(lambda v, f: M.apply(v, f, True, mutable=["batch_stats"]),
                                   vm, feat)
    assert logit.shape == (2,)
    assert models.max_pool(jnp.zeros((1, 4, 4, 1)), window=2).shape == (1, 2, 2, 1)


def test_pool_window_2_meta_gradients_are_finite_and_match_xla_convolutions():
    # jnp.max over the 2×2 window gave NaN meta-test gradients under jit with the CPU-tuned ops
    # (its derivative divides by a count of ties that the compiled step could make zero); the
    # same step with XLA's own convolutions was finite. Both must now agree (first order: the
    # NaN came from the meta-test loss through M', and one order keeps the compile short).
    from conftest import random_meta_batch, tiny_config

    from d2am_jax import meta
    from d2am_jax import state as state_lib
    batch, grads = None, {}
    for fast in (True, False):
        config = tiny_config()
        config.model.pool_window = 2
        config.model.fast_conv_grad = fast
        objective = meta.make_objective(config)
        state = state_lib.init_state(config, jax.random.PRNGKey(0))
        batch = batch or random_meta_batch(config, seed=0)
        grads[fast] = jax.jit(jax.grad(
            lambda p: objective(p, state.batch_stats, batch, jax.random.PRNGKey(1), False)[0]))(
                state.params)
    fast, xla = (np.concatenate([np.ravel(a) for a in jax.tree.leaves(grads[f])])
                 for f in (True, False))
    assert np.isfinite(fast).all()
    assert np.linalg.norm(fast - xla) <= 1e-4 * np.linalg.norm(xla)
