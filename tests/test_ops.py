"""The GEMM-based conv backward and the slice-based max-pool backward equal XLA's own derivatives."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from d2am_jax import ops


def test_conv_same_fast_matches_xla_in_value_and_gradients():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((2, 7, 6, 3)))
        w = jnp.asarray(rng.standard_normal((3, 3, 3, 5)))
        t = jnp.asarray(rng.standard_normal((2, 7, 6, 5)))
        loss = lambda f: (lambda x, w: jnp.sum(jnp.tanh(f(x, w)) * t))
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
