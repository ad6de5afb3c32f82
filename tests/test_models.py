"""The full-width network at 256×256 against the layer table (shape evaluation only, no compute)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2am_jax import models
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
    (feat, blocks, drlm), _ = jax.eval_shape(lambda v, x: E.apply(v, x, True, mutable=["batch_stats"]), vars_e, x)
    vars_d = jax.eval_shape(lambda b: D.init(key, b, True), blocks)
    depth, _ = jax.eval_shape(lambda v, b: D.apply(v, b, True, mutable=["batch_stats"]), vars_d, blocks)
    vars_m = jax.eval_shape(lambda f: M.init(key, f, True), feat)
    (logit, h), _ = jax.eval_shape(lambda v, f: M.apply(v, f, True, mutable=["batch_stats"]), vars_m, feat)
    return dict(config=config, E=E, D=D, M=M, vars_e=vars_e, vars_d=vars_d, vars_m=vars_m, feat=feat,
                blocks=blocks, drlm=drlm, depth=depth, logit=logit, h=h)


def test_output_shapes_follow_the_layer_table(full):
    assert full["feat"].shape == (2, 32, 32, 128)
    assert [b.shape for b in full["blocks"]] == [(2, 128, 128, 128), (2, 64, 64, 128), (2, 32, 32, 128)]
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
    m = _conv_bn(128, 128) + _conv_bn(128, 256) + _conv_bn(256, 512) + (512 * hdim + hdim) + (hdim + 1)
    assert _count(full["vars_e"]["params"]) == e
    assert _count(full["vars_d"]["params"]) == d
    assert _count(full["vars_m"]["params"]) == m


def test_forward_is_about_100_gflop_per_image_at_paper_scale(full):
    E, M = full["E"], full["M"]

    def forward(ve, vm, x):
        feat = E.apply(ve, x, False)[0]
        return M.apply(vm, feat, False)

    x = jax.ShapeDtypeStruct((1, 256, 256, 6), jnp.float32)
    cost = jax.jit(forward).lower(full["vars_e"], full["vars_m"], x).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert 85e9 < cost["flops"] < 115e9, cost["flops"]
