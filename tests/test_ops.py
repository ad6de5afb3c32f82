"""The Winograd and GEMM-based convolutions and the slice-based max-pool backward equal XLA's own
convolutions and derivatives."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from d2am_jax import ops


@pytest.fixture(params=[True, False], ids=["winograd", "direct"])
def winograd(request, monkeypatch):
    """Runs a test with the fast path's convolutions by Winograd for every channel count, then by
    direct convolution (the tests' small channel counts would otherwise all take the direct
    path)."""
    monkeypatch.setattr(ops, "WINOGRAD_MIN_CHANNELS", 1 if request.param else 10**9)
    return request.param


def test_winograd_conv_matches_direct_conv_for_odd_sizes_chunks_and_prologue():
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        for shape in ((4, 8, 8, 3), (6, 7, 5, 2), (2, 1, 1, 4)):
            x = jnp.asarray(rng.standard_normal(shape))
            w = jnp.asarray(rng.standard_normal((3, 3, shape[-1], 5)))
            ref = ops.conv_same(x, w)
            for chunk in (1, 2):
                np.testing.assert_allclose(
                    ops.conv_same_winograd(x, w, chunk=chunk), ref, rtol=1e-12, atol=1e-12
                )
            # The prologue sees chunk i of x: here it scales chunk i by (i + 1).
            scaled = x * jnp.repeat(jnp.arange(1, shape[0] // 2 + 1), 2)[:, None, None, None]
            out = ops.conv_same_winograd(x, w, prologue=lambda xc, i: xc * (i + 1), chunk=2)
            np.testing.assert_allclose(out, ops.conv_same(scaled, w), rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match="chunk=4 does not divide the batch of 6"):
            ops.conv_same_winograd(jnp.zeros((6, 4, 4, 2)), jnp.zeros((3, 3, 2, 2)), chunk=4)


def test_winograd_conv_in_float32_is_as_accurate_as_a_direct_conv():
    """Against a float64 reference, Winograd's float32 error stays within a small multiple of the
    direct float32 convolution's own error (its transforms add a few roundings per output)."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 16, 16, 64)).astype(np.float32)
    w = (rng.standard_normal((3, 3, 64, 32)) / 24).astype(np.float32)
    with jax.enable_x64(True):
        exact = np.asarray(ops.conv_same(jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64)))
    err_direct = np.max(np.abs(np.asarray(ops.conv_same(x, w)) - exact))
    err_winograd = np.max(np.abs(np.asarray(ops.conv_same_winograd(x, w)) - exact))
    assert err_winograd < 4 * err_direct + 1e-6 * np.max(np.abs(exact)), (err_winograd, err_direct)


def test_conv_same_fast_matches_xla_in_value_and_gradients(winograd):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((2, 7, 6, 3)))
        w = jnp.asarray(rng.standard_normal((3, 3, 3, 5)))
        t = jnp.asarray(rng.standard_normal((2, 7, 6, 5)))
        loss = lambda f: lambda x, w: jnp.sum(jnp.tanh(f(x, w)) * t)
        np.testing.assert_allclose(ops.conv_same_fast(x, w), ops.conv_same(x, w), rtol=1e-12)
        fast = jax.grad(loss(ops.conv_same_fast), (0, 1))(x, w)
        ref = jax.grad(loss(ops.conv_same), (0, 1))(x, w)
        for a, b in zip(fast, ref):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_max_pool_matches_flax_in_value_and_gradient_for_odd_and_even_sizes():
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        for shape in ((2, 8, 8, 3), (1, 7, 5, 2)):
            x = jnp.asarray(rng.standard_normal(shape))
            ref_pool = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
            np.testing.assert_array_equal(ops.max_pool_3x3_s2(x), ref_pool(x))
            t = jnp.asarray(rng.standard_normal(ref_pool(x).shape))
            g = jax.grad(lambda x: jnp.sum(ops.max_pool_3x3_s2(x) * t))(x)
            g_ref = jax.grad(lambda x: jnp.sum(ref_pool(x) * t))(x)
            np.testing.assert_allclose(g, g_ref, rtol=1e-12)


def _fused_case(seed, shape=(6, 8, 7, 3)):
    rng = np.random.default_rng(seed)
    z = jnp.asarray(rng.standard_normal(shape) * 2 + 0.5)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, shape[-1]))
    bias = jnp.asarray(rng.standard_normal(shape[-1]) * 0.3)
    return rng, z, scale, bias


def _check_grads(fused, reference, args, rng):
    """Values equal; gradients equal under random cotangents for every output (incl. the
    statistics)."""
    out_f, out_r = jax.jit(fused)(*args), jax.jit(reference)(*args)
    cts = [jnp.asarray(rng.standard_normal(np.shape(o))) for o in out_r]
    for a, b in zip(out_f, out_r):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    loss = lambda f: lambda *a: sum(jnp.sum(o * t) for o, t in zip(f(*a), cts))
    g_f = jax.jit(jax.grad(loss(fused), tuple(range(len(args)))))(*args)
    g_r = jax.jit(jax.grad(loss(reference), tuple(range(len(args)))))(*args)
    for name, a, b in zip(("z", "scale", "bias", "kernel"), g_f, g_r):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11, err_msg=name)


def test_bn_relu_conv_matches_plain_autodiff_with_per_group_statistics(winograd):
    with jax.enable_x64(True):
        rng, z, scale, bias = _fused_case(2)
        kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 4)))
        fused = lambda z, s, b, k: ops.bn_relu_conv(z, s, b, k, 1e-5, 3)

        def reference(z, s, b, k):
            a, mean, var = ops.bn_relu_reference(z, s, b, 1e-5, 3)
            return ops.conv_same(a, k), mean, var

        _check_grads(fused, reference, (z, scale, bias, kernel), rng)


def test_bn_relu_pool_matches_plain_autodiff_for_odd_and_even_sizes():
    with jax.enable_x64(True):
        for seed, shape in ((3, (4, 8, 8, 3)), (4, (2, 7, 5, 2))):
            rng, z, scale, bias = _fused_case(seed, shape)
            fused = lambda z, s, b: ops.bn_relu_pool(z, s, b, 1e-5, 2)

            def reference(z, s, b):
                a, mean, var = ops.bn_relu_reference(z, s, b, 1e-5, 2)
                pooled = nn.max_pool(a, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
                return pooled, mean, var

            _check_grads(fused, reference, (z, scale, bias), rng)


def test_group_moments_equal_statistics_of_each_group_alone():
    rng = np.random.default_rng(5)
    z = rng.standard_normal((6, 4, 4, 3))
    mu, var = ops.group_moments(jnp.asarray(z), 3)
    for g in range(3):
        part = z[2 * g : 2 * g + 2]
        np.testing.assert_allclose(mu[g], part.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var[g], part.var((0, 1, 2)), rtol=1e-5, atol=1e-6)


def test_im2col_conv_matches_xla_conv_to_second_order():
    with jax.enable_x64(True):
        rng = np.random.default_rng(6)
        x = jnp.asarray(rng.standard_normal((2, 5, 4, 3)))
        w = jnp.asarray(rng.standard_normal((3, 3, 3, 2)))
        np.testing.assert_allclose(ops.conv_same_im2col(x, w), ops.conv_same(x, w), rtol=1e-12)
        # The inner step differentiates M twice: compare a Hessian-vector product through the conv.
        v = jnp.asarray(rng.standard_normal(w.shape))
        hvp = lambda f: jax.jvp(jax.grad(lambda w: jnp.sum(jnp.sin(f(x, w)))), (w,), (v,))[1]
        np.testing.assert_allclose(hvp(ops.conv_same_im2col), hvp(ops.conv_same), rtol=1e-10)
