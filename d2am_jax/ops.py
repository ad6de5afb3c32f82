"""Convolution with a GEMM-based backward pass: the same maths as `lax.conv`, faster on XLA:CPU.

XLA:CPU lowers the gradients of a 3×3 convolution to slow generic kernels (see BENCHMARKS.md); here
the input gradient is a forward convolution with the flipped kernel and the kernel gradient per-tap
GEMMs over chunks of images, both of which XLA runs at GEMM speed. Only first derivatives
pass through E.
"""

import jax
import jax.numpy as jnp
from jax import lax

_DIMS = ("NHWC", "HWIO", "NHWC")


def conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 SAME convolution, NHWC × HWIO → NHWC (XLA's own derivatives)."""
    return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_DIMS)


# Images per step of the kernel-gradient scan: the GEMMs stay large (K = chunk·H·W) while the
# shifted input slices stay small temporaries (BENCHMARKS.md: 4 beat 1, 2 and 8 here).
KERNEL_GRAD_CHUNK = 4


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _kernel_grad(x: jax.Array, g: jax.Array, kh: int, kw: int) -> jax.Array:
    """∂L/∂W[i, j] = Σ_nhw x_pad[n, h+i, w+j, :]ᵀ g[n, h, w, :]: one GEMM per tap and chunk of images.

    A scan over chunks keeps the shifted slices to `KERNEL_GRAD_CHUNK` images at a time; per-tap
    GEMMs avoid materialising a 9×-sized im2col matrix.
    """
    n, h, w, cin = x.shape
    cout = g.shape[-1]
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    xp = jnp.pad(x, ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)))
    chunk = _largest_divisor_at_most(n, KERNEL_GRAD_CHUNK)
    xs = xp.reshape(n // chunk, chunk, *xp.shape[1:])
    gs = g.reshape(n // chunk, chunk, h, w, cout)

    def accumulate(acc, xg):
        xc, gc = xg
        g2 = gc.reshape(-1, cout)
        taps = [
            jnp.dot(lax.slice(xc, (0, i, j, 0), (chunk, i + h, j + w, cin)).reshape(-1, cin).T, g2,
                    preferred_element_type=acc.dtype)
            for i in range(kh) for j in range(kw)
        ]
        return acc + jnp.stack(taps), None

    acc, _ = lax.scan(accumulate, jnp.zeros((kh * kw, cin, cout), g.dtype), (xs, gs))
    return acc.reshape(kh, kw, cin, cout)


@jax.custom_vjp
def conv_same_fast(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`conv_same` whose backward is expressed as forward convolutions and GEMMs."""
    return conv_same(x, kernel)


def _fwd(x, kernel):
    return conv_same(x, kernel), (x, kernel)


def _bwd(res, g):
    x, kernel = res
    kh, kw = kernel.shape[:2]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"conv_same_fast: odd kernel sizes only, got {kernel.shape[:2]}")
    # Input gradient of a stride-1 SAME conv = SAME conv of g with the flipped, I/O-swapped kernel.
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    dx = conv_same(g, flipped)
    return dx, _kernel_grad(x, g, kh, kw)


conv_same_fast.defvjp(_fwd, _bwd)


def _pool_taps(x: jax.Array) -> jax.Array:
    """3×3 / stride-2 / pad-1 max-pool as the maximum of nine strided slices (differentiable)."""
    n, h, w, c = x.shape
    ho, wo = (h + 1) // 2, (w + 1) // 2
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    out = None
    for i in range(3):
        for j in range(3):
            s = lax.slice(xp, (0, i, j, 0), (n, i + 2 * ho - 1, j + 2 * wo - 1, c), (1, 2, 2, 1))
            out = s if out is None else jnp.maximum(out, s)
    return out


def _pool_window(x: jax.Array) -> jax.Array:
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                             ((0, 0), (1, 1), (1, 1), (0, 0)))


@jax.custom_vjp
def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """RFM's MaxPool2d(3, 2, 1) on NHWC. Backward through nine strided slices instead of XLA's
    select-and-scatter, which XLA:CPU runs ~4× slower (BENCHMARKS.md)."""
    return _pool_window(x)


def _pool_fwd(x):
    return _pool_window(x), x


def _pool_bwd(x, g):
    return jax.vjp(_pool_taps, x)[1](g)


max_pool_3x3_s2.defvjp(_pool_fwd, _pool_bwd)
