"""The network's layers with hand-written backward passes: the same maths as plain `lax`/`jnp`, run
at GEMM speed by XLA:CPU and with one saved activation per convolution (BENCHMARKS.md).

XLA:CPU lowers the gradients of a 3×3 convolution to slow generic kernels; here the forward and the
input gradient (a forward convolution with the flipped kernel) run by Winograd F(2×2, 3×3), 2.25×
fewer multiplies, and the kernel gradient as per-tap GEMMs over chunks of images. E's BatchNorm +
ReLU are fused into the next convolution or max-pool (`bn_relu_conv`, `bn_relu_pool`), which
recompute their activation chunk by chunk. Only first derivatives pass through E and D; M,
differentiated twice, uses `conv_same_im2col`.
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

_DIMS = ("NHWC", "HWIO", "NHWC")


def conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 SAME convolution, NHWC × HWIO → NHWC (XLA's own derivatives). bfloat16 inputs
    accumulate in float32 (as tensor cores do) and round the result back to bfloat16."""
    if x.dtype == jnp.bfloat16:
        out = lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_DIMS,
                                       preferred_element_type=jnp.float32)
        return out.astype(x.dtype)
    return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_DIMS)


# Images per step of the kernel-gradient scan: the GEMMs stay large (K = chunk·H·W) while the
# shifted input slices stay small temporaries (BENCHMARKS.md: 4 beat 1, 2 and 8 here).
KERNEL_GRAD_CHUNK = 4


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _kernel_grad(
    x: jax.Array, g: jax.Array, kh: int, kw: int, prologue=None, chunk: int | None = None
) -> jax.Array:
    """∂L/∂W[i, j] = Σ_nhw x_pad[n, h+i, w+j, :]ᵀ g[n, h, w, :]: one GEMM per tap and chunk of
    images.

    A scan over chunks keeps the padded input and its shifted slices to `KERNEL_GRAD_CHUNK` images
    at a time; per-tap GEMMs avoid materialising a 9×-sized im2col matrix. `prologue(x_chunk, i)`,
    if given, maps chunk i of x to the convolution's actual input (the fused units recompute their
    activation here, so it never exists at full size).
    """
    n, h, w, cin = x.shape
    cout = g.shape[-1]
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    chunk = chunk or _largest_divisor_at_most(n, KERNEL_GRAD_CHUNK)
    xs = x.reshape(n // chunk, chunk, h, w, cin)
    gs = g.reshape(n // chunk, chunk, h, w, cout)

    def accumulate(acc, ixg):
        i, xc, gc = ixg
        if prologue is not None:
            xc = prologue(xc, i)
        xc = jnp.pad(xc, ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)))
        g2 = gc.reshape(-1, cout)
        taps = [
            jnp.dot(
                lax.slice(xc, (0, a, b, 0), (chunk, a + h, b + w, cin)).reshape(-1, cin).T,
                g2,
                preferred_element_type=acc.dtype,
            )
            for a in range(kh)
            for b in range(kw)
        ]
        return acc + jnp.stack(taps), None

    acc, _ = lax.scan(
        accumulate, jnp.zeros((kh * kw, cin, cout), g.dtype), (jnp.arange(n // chunk), xs, gs)
    )
    return acc.reshape(kh, kw, cin, cout)


# Winograd F(2×2, 3×3) (Lavin & Gray, 2016): each 2×2 output tile from a 4×4 input tile with 16
# multiplies per channel pair instead of 36. The input transform Bᵀ d B, the kernel transform G g Gᵀ
# and the output transform Aᵀ m A are exact linear maps with entries 0, ±1, ±½; the 16 products are
# one batched GEMM over channels. In float32 the result differs from a direct convolution by a few
# units in the last place (tests/test_ops.py).
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))

# Tiles per step of the Winograd loop (4 images at 64×64): the GEMMs keep thousands of rows while
# the 4×-sized transformed tiles stay ~100 MB temporaries (BENCHMARKS.md: at 64×64, 2, 4 or 8
# images per step are within 6 % of each other; all 96 at once is 1.8× slower).
WINOGRAD_TILES = 4096


def winograd_chunk(batch: int, h: int, w: int) -> int:
    """Images per Winograd step: the largest divisor of `batch` within `WINOGRAD_TILES` tiles."""
    return _largest_divisor_at_most(
        batch, max(1, WINOGRAD_TILES // (((h + 1) // 2) * ((w + 1) // 2)))
    )


def _winograd_input(t0, t1, t2, t3):
    """Bᵀ d along one axis: four input rows (or columns) of a tile → four transformed ones."""
    return t0 - t2, t1 + t2, t2 - t1, t1 - t3


def _winograd_tiles(x: jax.Array) -> jax.Array:
    """[c, H, W, C] → Bᵀ d B of every 4×4 input tile (2×2 output tiles, SAME padding):
    [16, tiles, C]."""
    c, h, w, cin = x.shape
    th, tw = (h + 1) // 2, (w + 1) // 2
    xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - w), (0, 0)))
    # Row r of every tile's 4×4 window is padded row 2·t + r: a stride-2 slice per r.
    rows = [
        lax.slice(xp, (0, r, 0, 0), (c, r + 2 * th - 1, 2 * tw + 2, cin), (1, 2, 1, 1))
        for r in range(4)
    ]
    v = []
    for t in _winograd_input(*rows):
        cols = [
            lax.slice(t, (0, 0, s, 0), (c, th, s + 2 * tw - 1, cin), (1, 1, 2, 1)) for s in range(4)
        ]
        v.extend(_winograd_input(*cols))
    return jnp.stack(v).reshape(16, c * th * tw, cin)


def _winograd_output(m: jax.Array, c: int, h: int, w: int) -> jax.Array:
    """Aᵀ m A, Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]: [16, tiles, C] → the [c, H, W, C] output."""
    th, tw = (h + 1) // 2, (w + 1) // 2
    m = m.reshape(4, 4, c, th, tw, m.shape[-1])
    rows = (m[0] + m[1] + m[2], m[1] - m[2] - m[3])
    y = jnp.stack(
        [jnp.stack((r[0] + r[1] + r[2], r[1] - r[2] - r[3]), axis=3) for r in rows], axis=2
    )
    return y.reshape(c, 2 * th, 2 * tw, -1)[:, :h, :w]


def _write_chunks(fn, x: jax.Array, chunk: int, out_shape) -> jax.Array:
    """fn(i, chunk i of x) for every chunk of `chunk` images, written in place into one output."""
    n = x.shape[0]

    def body(i, out):
        return lax.dynamic_update_slice_in_dim(
            out, fn(i, lax.dynamic_slice_in_dim(x, i * chunk, chunk)), i * chunk, 0
        )

    # The output buffer's initial value is never read (every chunk overwrites its slice). It is made
    # from this call's input, not as constant zeros: XLA merges identical constant broadcasts across
    # loops, which keeps one alive from the forward pass into the backward pass and forces copies
    # (BENCHMARKS.md).
    init = jnp.broadcast_to(x[0, 0, 0, 0] * 0, out_shape)
    return lax.fori_loop(0, n // chunk, body, init)


def conv_same_winograd(
    x: jax.Array, kernel: jax.Array, prologue=None, chunk: int | None = None
) -> jax.Array:
    """`conv_same` for a 3×3 kernel by Winograd F(2×2, 3×3), over chunks of `chunk` images.

    Same maths as `conv_same` (any H, W; odd sizes are padded to whole tiles and cropped) with 2.25×
    fewer multiplies. `prologue(x_chunk, i)`, if given, maps chunk i of x to the convolution's
    actual input (as in `_kernel_grad`), so a fused unit's activation never exists at full size.
    """
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"conv_same_winograd: 3×3 kernels only, got {kernel.shape[:2]}")
    n, h, w, cin = x.shape
    cout = kernel.shape[-1]
    chunk = chunk or winograd_chunk(n, h, w)
    if n % chunk:  # the loop writes whole chunks: a remainder would be left unwritten
        raise ValueError(
            f"conv_same_winograd: chunk={chunk} does not divide the batch of {n} images"
        )
    g = jnp.asarray(_WINOGRAD_G, kernel.dtype)
    u = jnp.einsum("ai,ijco,bj->abco", g, kernel, g).reshape(16, cin, cout)  # G g Gᵀ

    def tiles(i, xc):
        if prologue is not None:
            xc = prologue(xc, i)
        m = lax.dot_general(_winograd_tiles(xc), u, (((2,), (1,)), ((0,), (0,))))
        return _winograd_output(m, xc.shape[0], h, w)

    return _write_chunks(tiles, x, chunk, (n, h, w, cout))


# Fewer input channels than this: the transforms outweigh the saved multiplies (E's 6-channel
# input conv at 64×64: 0.13 s direct, 0.19 s Winograd; BENCHMARKS.md).
WINOGRAD_MIN_CHANNELS = 16


def use_winograd(kernel_shape) -> bool:
    """Whether the fast path convolves with this HWIO kernel by Winograd."""
    return tuple(kernel_shape[:2]) == (3, 3) and kernel_shape[2] >= WINOGRAD_MIN_CHANNELS


def _conv_fast(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The fast path's convolution: Winograd where `use_winograd`, else `conv_same`."""
    return conv_same_winograd(x, kernel) if use_winograd(kernel.shape) else conv_same(x, kernel)


def _input_grad(kernel: jax.Array, g: jax.Array) -> jax.Array:
    """Input gradient of a stride-1 SAME conv: SAME conv of g with the flipped, I/O-swapped
    kernel."""
    kh, kw = kernel.shape[:2]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"conv_same_fast: odd kernel sizes only, got {kernel.shape[:2]}")
    return _conv_fast(g, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))


@jax.custom_vjp
def conv_same_fast(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`conv_same` (by Winograd where `use_winograd`); backward: the input gradient the same way,
    the kernel gradient per-tap GEMMs."""
    return _conv_fast(x, kernel)


def _fwd(x, kernel):
    return _conv_fast(x, kernel), (x, kernel)


def _bwd(res, g):
    x, kernel = res
    kh, kw = kernel.shape[:2]
    dx = _input_grad(kernel, g)
    return dx, _kernel_grad(x, g, kh, kw)


conv_same_fast.defvjp(_fwd, _bwd)


def conv_same_im2col(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`conv_same` as one GEMM over the nine shifted copies of the input (im2col).

    For small maps that are differentiated twice (the meta-learner M): every derivative of pads,
    slices and a dot is again pads, slices and dots, which XLA:CPU runs at GEMM speed, while its
    own convolution derivatives at M's shapes fall back to a generic loop (BENCHMARKS.md).
    """
    kh, kw, cin, cout = kernel.shape
    n, h, w, _ = x.shape
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    xp = jnp.pad(x, ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)))
    patches = jnp.concatenate(
        [lax.slice(xp, (0, i, j, 0), (n, i + h, j + w, cin)) for i in range(kh) for j in range(kw)],
        axis=-1,
    )
    return jnp.dot(patches, kernel.reshape(kh * kw * cin, cout))


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
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    )


@jax.custom_vjp
def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """SSDG's MaxPool2d(3, 2, 1) (its MADDG backbone; RFM's is MaxPool2d(2)) on NHWC. Backward
    through nine strided slices instead of XLA's select-and-scatter, which XLA:CPU runs ~4×
    slower (BENCHMARKS.md)."""
    return _pool_window(x)


def _pool_fwd(x):
    return _pool_window(x), x


def _pool_bwd(x, g):
    return jax.vjp(_pool_taps, x)[1](g)


max_pool_3x3_s2.defvjp(_pool_fwd, _pool_bwd)


# ---------------------------------------------------------------------------------------------
# BatchNorm (batch statistics per group of images) fused with ReLU and the next convolution or
# max-pool. The feature extractor E runs the K domain batches as one flat batch of K·B images,
# BatchNorm keeping statistics per domain batch (group). Each fused unit saves only its input z
# (the previous convolution's output) and recomputes the normalised, rectified activation in its
# backward pass: one saved map per convolution instead of two (pre-BatchNorm and post-ReLU), at the
# cost of one elementwise pass (BENCHMARKS.md).


def group_moments(z: jax.Array, groups: int) -> tuple[jax.Array, jax.Array]:
    """Per-group, per-channel mean and (biased) variance of z [G·B, H, W, C] → two [G, C] arrays."""
    # Reduced in at least float32: bfloat16 activations keep float32 BatchNorm statistics.
    zg = z.reshape(groups, -1, z.shape[-1]).astype(jnp.promote_types(z.dtype, jnp.float32))
    mu = jnp.mean(zg, axis=1)
    return mu, jnp.mean(jnp.square(zg - mu[:, None, :]), axis=1)


def _normalize(z, scale, bias, mu, rstd):
    """(x̂, y): x̂ = (z − μ_g)·rstd_g as [G, B·H·W, C] and y = x̂·scale + bias, for [G, C]
    statistics."""
    zg = z.reshape(mu.shape[0], -1, z.shape[-1])
    xhat = (zg - mu[:, None, :]) * rstd[:, None, :]
    return xhat, xhat * scale + bias


def bn_relu(z, scale, bias, mu, rstd):
    """relu((z − μ_g)·rstd_g·scale + bias); μ, rstd are [G, C] per group of images, or [C]."""
    c = z.shape[-1]
    _, y = _normalize(z, scale, bias, jnp.reshape(mu, (-1, c)), jnp.reshape(rstd, (-1, c)))
    return jnp.maximum(y, 0).reshape(z.shape).astype(z.dtype)


def bn_relu_reference(z, scale, bias, eps: float, groups: int):
    """Training-mode BatchNorm + ReLU in plain jnp (any-order autodiff) → (a, mean_G μ,
    mean_G var)."""
    mu, var = group_moments(z, groups)
    return bn_relu(z, scale, bias, mu, lax.rsqrt(var + eps)), jnp.mean(mu, 0), jnp.mean(var, 0)


def _bn_relu_backward(z, scale, mu, rstd, xhat, y, da, dmean, dvar):
    """Cotangents of (z, scale, bias) for a = relu(BN(z)) and the mean_G μ, mean_G var outputs."""
    groups = mu.shape[0]
    m = xhat.shape[1]  # elements per group and channel
    # A multiply by the mask, not a select against a broadcast zero, which XLA:CPU materialises as
    # a full-size array when the select lands in a YNNPACK elementwise fusion.
    dy = da.reshape(y.shape) * (y > 0).astype(y.dtype)
    s1 = jnp.sum(dy, axis=1)  # [G, C]
    s2 = jnp.sum(dy * xhat, axis=1)
    zc = xhat / rstd[:, None, :]  # z − μ_g
    dz = (scale * rstd)[:, None, :] * (dy - s1[:, None, :] / m - xhat * s2[:, None, :] / m)
    dz = dz + dmean / (groups * m) + dvar * 2.0 * zc / (groups * m)
    return dz.reshape(z.shape), jnp.sum(s2, 0), jnp.sum(s1, 0)


def _forward_stats(z, eps, groups):
    mu, var = group_moments(z, groups)
    return mu, var, lax.rsqrt(var + eps)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def bn_relu_conv(z, scale, bias, kernel, eps: float, groups: int):
    """conv(relu(BN_train(z)), kernel), SAME, stride 1 → (output, mean_G μ, mean_G var).

    Saves z, not the activation, which the Winograd forward and the kernel gradient make chunk by
    chunk (see the section comment).
    """
    return _bn_relu_conv_fwd(z, scale, bias, kernel, eps, groups)[0]


def _bn_relu_conv_fwd(z, scale, bias, kernel, eps, groups):
    mu, var, rstd = _forward_stats(z, eps, groups)
    if use_winograd(kernel.shape):
        # The activation is made chunk by chunk inside the Winograd map, never at full size.
        cap = winograd_chunk(z.shape[0], z.shape[1], z.shape[2])
        chunk, activation = _chunked_activation(z, scale, bias, mu, rstd, groups, cap)
        y = conv_same_winograd(z, kernel, prologue=activation, chunk=chunk)
    else:
        y = conv_same(bn_relu(z, scale, bias, mu, rstd), kernel)
    return (y, jnp.mean(mu, 0), jnp.mean(var, 0)), (z, scale, bias, kernel, mu, rstd)


def _chunked_activation(z, scale, bias, mu, rstd, groups, cap):
    """(chunk, prologue): chunks of ≤ cap images within one group, and their relu(BN(·))."""
    per_group = z.shape[0] // groups
    chunk = _largest_divisor_at_most(per_group, cap)
    return chunk, lambda zc, i: bn_relu(
        zc, scale, bias, mu[i * chunk // per_group], rstd[i * chunk // per_group]
    )


def _bn_relu_conv_bwd(eps, groups, res, cts):
    # The barrier keeps XLA from merging this recomputation with the forward's identical one
    # (common-subexpression elimination), which would keep the forward's activation alive.
    z, scale, bias, kernel, mu, rstd = lax.optimization_barrier(res)
    g, dmean, dvar = cts
    kh, kw = kernel.shape[:2]
    da = _input_grad(kernel, g)
    # The kernel gradient recomputes the activation chunk by chunk, from z and its group's
    # statistics.
    chunk, activation = _chunked_activation(z, scale, bias, mu, rstd, groups, KERNEL_GRAD_CHUNK)
    dkernel = _kernel_grad(z, g, kh, kw, prologue=activation, chunk=chunk)
    xhat, y = _normalize(z, scale, bias, mu, rstd)
    dz, dscale, dbias = _bn_relu_backward(z, scale, mu, rstd, xhat, y, da, dmean, dvar)
    return dz, dscale, dbias, dkernel


bn_relu_conv.defvjp(_bn_relu_conv_fwd, _bn_relu_conv_bwd)


def _pool_scatter_taps(idx: jax.Array, g: jax.Array, h: int, w: int) -> jax.Array:
    """Gradient of a 3×3 / stride-2 / pad-1 max-pool: g[ho, wo] goes to tap idx[ho, wo] of its
    window.

    Input row 2m is tap row 1 of window m only; row 2m+1 is tap row 2 of window m and tap row 0 of
    window m+1 (columns alike). So each of the four (row, column) parity classes gathers from at
    most
    four windows at a quarter-size grid, and one interleave builds the full map: about a ninth of
    the work of scattering each of the nine taps over the full map.
    """
    n, ho, wo, c = g.shape

    def shift(a, d, e, fill):  # a[:, m + d, l + e], past the edge: fill
        if d == 0 and e == 0:
            return a
        return jnp.pad(a[:, d:, e:], ((0, 0), (0, d), (0, e), (0, 0)), constant_values=fill)

    sources = {0: ((1, 0),), 1: ((2, 0), (0, 1))}  # parity → (tap row/col, window offset)
    rows = []
    for p in (0, 1):
        cols = []
        for q in (0, 1):
            acc = 0
            for i, d in sources[p]:
                for j, e in sources[q]:
                    acc = acc + jnp.where(shift(idx, d, e, -1) == 3 * i + j, shift(g, d, e, 0), 0)
            cols.append(acc)
        rows.append(jnp.stack(cols, axis=3))  # [N, Ho, Wo, 2, C]
    full = jnp.stack(rows, axis=2)  # [N, Ho, 2, Wo, 2, C]
    return full.reshape(n, 2 * ho, 2 * wo, c)[:, :h, :w, :]


def _pool_with_argmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """3×3 / stride-2 / pad-1 max-pool and the index (0..8, row-major) of each window's first
    maximum.

    Both come from one pass over the nine strided slices, so the index never depends on comparing
    values recomputed elsewhere; "first maximum" is the tap XLA's select-and-scatter picks.
    """
    n, h, w, c = x.shape
    ho, wo = (h + 1) // 2, (w + 1) // 2
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    best, idx = None, None
    for t in range(9):
        i, j = divmod(t, 3)
        s = lax.slice(xp, (0, i, j, 0), (n, i + 2 * ho - 1, j + 2 * wo - 1, c), (1, 2, 2, 1))
        if best is None:
            best, idx = s, jnp.zeros(s.shape, jnp.int8)
        else:
            better = s > best
            best, idx = jnp.where(better, s, best), jnp.where(better, jnp.int8(t), idx)
    return best, idx


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def bn_relu_pool(z, scale, bias, eps: float, groups: int):
    """max_pool_3x3_s2(relu(BN_train(z))) → (pooled, mean_G μ, mean_G var).

    Saves z and the int8 index of each window's maximum (a quarter-size map), not the activation.
    """
    return _bn_relu_pool_fwd(z, scale, bias, eps, groups)[0]


def _bn_relu_pool_fwd(z, scale, bias, eps, groups):
    mu, var, rstd = _forward_stats(z, eps, groups)
    pooled, idx = _pool_with_argmax(bn_relu(z, scale, bias, mu, rstd))
    return (pooled, jnp.mean(mu, 0), jnp.mean(var, 0)), (z, scale, bias, mu, rstd, idx)


def _bn_relu_pool_bwd(eps, groups, res, cts):
    z, scale, bias, mu, rstd, idx = lax.optimization_barrier(res)  # see _bn_relu_conv_bwd
    g, dmean, dvar = cts
    xhat, y = _normalize(z, scale, bias, mu, rstd)
    da = _pool_scatter_taps(idx, g, z.shape[1], z.shape[2])
    return _bn_relu_backward(z, scale, mu, rstd, xhat, y, da, dmean, dvar)


bn_relu_pool.defvjp(_bn_relu_pool_fwd, _bn_relu_pool_bwd)
