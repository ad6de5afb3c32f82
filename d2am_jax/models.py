"""The D²AM network in flax.linen: feature extractor E with three DRLMs, depth estimator D and
meta-learner M.

Layer table after RFM (conv 64; three blocks of conv 128→196→128 + max-pool, each followed by a
DRLM, Eq. 4–7); D regresses a depth map from the three blocks; M ends in the adaptation layer h.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2am_jax import ops, runtime

INPUT_CHANNELS = 6  # RGB + HSV


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
    """HSV of float RGB in [0, 1] (last axis 3), hue in [0, 1): `data.color.rgb_to_hsv` in jnp,
    the same operations in the same order, so both agree to float rounding."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc = jnp.max(rgb, axis=-1)
    minc = jnp.min(rgb, axis=-1)
    delta = maxc - minc
    s = jnp.where(maxc > 0, delta / jnp.where(maxc > 0, maxc, 1.0), 0.0)
    safe = jnp.where(delta > 0, delta, 1.0)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = jnp.where(r == maxc, bc - gc, jnp.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
    h = jnp.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    return jnp.stack([h, s, maxc], axis=-1)


def model_input(x: jax.Array, dtype=jnp.float32) -> jax.Array:
    """The network's input [..., 6] (RGB then HSV, each in [0, 1]) in `dtype`.

    x is either uint8 RGB [..., 3] — what crosses from the host, a quarter of float32's bytes —
    scaled and converted here, inside the jitted step; or an already converted float [..., 6]
    (`data.color.rgb_to_model_input`), passed through.
    """
    if x.shape[-1] == INPUT_CHANNELS and jnp.issubdtype(x.dtype, jnp.floating):
        return x.astype(dtype)
    compute = jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32
    rgb = x.astype(compute) / 255.0
    return jnp.concatenate([rgb, rgb_to_hsv(rgb)], axis=-1).astype(dtype)


def input_ok(shape, dtype, resolution: int) -> bool:
    """Whether x's last three axes are an input `model_input` takes at this resolution: uint8 RGB
    (r, r, 3) or float RGB+HSV (r, r, 6)."""
    r = int(resolution)
    if jnp.dtype(dtype) == jnp.uint8:
        return tuple(shape[-3:]) == (r, r, 3)
    return jnp.issubdtype(dtype, jnp.floating) and tuple(shape[-3:]) == (r, r, INPUT_CHANNELS)


INPUT_FORMS = "uint8 RGB [..., r, r, 3] or float RGB+HSV [..., r, r, 6]"


def depth_input(depth: jax.Array, dtype) -> jax.Array:
    """Depth targets in [0, 1] as `dtype`: uint8 maps (what crosses from the host) are k/255."""
    if jnp.dtype(depth.dtype) == jnp.uint8:
        return depth.astype(dtype) / 255.0
    return depth.astype(dtype)


def scaled(channels: int, width: float, field: str = "model.width") -> int:
    """Channels of a layer under the width multiplier; a layer rounded to zero is an error."""
    c = int(round(channels * width))
    if c < 1:
        raise ValueError(
            f"{field}={width} rounds a {channels}-channel layer to {c} channels; "
            f"expected {field} ≥ {0.5 / channels:.4g}"
        )
    return c


_CONV_IMPL = {"xla": ops.conv_same, "im2col": ops.conv_same_im2col}


class Conv3x3(nn.Module):
    """3×3 stride-1 SAME convolution (bias-free: a BatchNorm always follows).

    `impl`: 'xla' (XLA's own derivatives) or 'im2col' (one GEMM, differentiable any number of
    times). Used by M; E and D apply their convolutions through `ops` directly (see ConvBNLayer).
    """

    features: int
    impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel",
            nn.initializers.kaiming_normal(),
            (3, 3, x.shape[-1], self.features),
            jnp.float32,
        )
        kernel = kernel.astype(x.dtype)
        return _CONV_IMPL[self.impl](x, kernel)


class ConvBNReLU(nn.Module):
    features: int
    impl: str = "xla"
    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, train: bool):
        x = Conv3x3(self.features, self.impl)(x)
        # Training uses batch statistics (per domain batch, see meta.py); evaluation uses the
        # running averages that the outer step accumulates from those batch statistics.
        x = nn.BatchNorm(
            dtype=x.dtype,  # the activations' dtype; flax reduces the statistics in float32
            use_running_average=not train,
            momentum=self.momentum,
            epsilon=self.epsilon,
            param_dtype=jnp.float32,
        )(x)
        return nn.relu(x)


def max_pool(x, fast_grad: bool = False, window: int = 3):
    """Stride-2 max-pool that halves H and W; `window` (config.model.pool_window):

    3: 3×3, padding 1, H → ⌈H/2⌉ — SSDG's MaxPool2d(3, 2, 1) (its MADDG backbone,
       models/DGFAS.py), this project's default since its first version;
    2: 2×2, no padding, H → ⌊H/2⌋ — RFM's MaxPool2d(2) (models/DGFANet.py), the layer table D²AM
       builds on. Pairwise maxima over a reshape: differentiable to any order with no
       select-and-scatter.
    """
    if window == 2:
        n, h, w, c = x.shape
        x = x[:, : h - h % 2, : w - w % 2].reshape(n, h // 2, 2, w // 2, 2, c)
        # Not jnp.max over the window: its derivative divides by the number of inputs equal to
        # the max, which XLA's fusions may recompute as zero (0/0: NaN meta-gradients, measured
        # with fast_conv_grad at 32×32); maximum's derivative is a selection, finite regardless.
        rows = jnp.maximum(x[:, :, 0], x[:, :, 1])
        return jnp.maximum(rows[:, :, :, 0], rows[:, :, :, 1])
    if fast_grad:
        return ops.max_pool_3x3_s2(x)
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def adaptive_avg_pool(f: jax.Array, size: tuple[int, int]) -> jax.Array:
    """PyTorch's adaptive_avg_pool2d on NHWC: output cell i averages input rows
    ⌊i·H/h⌋ … ⌈(i+1)·H/h⌉ − 1 (likewise columns), so every input pixel counts, as in RFM's depth
    head (F.adaptive_avg_pool2d(dx, 32)); two small averaging matrices, exact and cheap."""
    rows = _averaging_matrix(f.shape[1], size[0], f.dtype)
    cols = _averaging_matrix(f.shape[2], size[1], f.dtype)
    return jnp.einsum("ih,jw,nhwc->nijc", rows, cols, f)


def _averaging_matrix(n_in: int, n_out: int, dtype) -> jax.Array:
    """[n_out, n_in]: row i holds 1/len on the bins of adaptive average pooling, 0 elsewhere."""
    matrix = [[0.0] * n_in for _ in range(n_out)]
    for i in range(n_out):
        start, stop = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        for j in range(start, stop):
            matrix[i][j] = 1.0 / (stop - start)
    return jnp.asarray(matrix, dtype)


def instance_stats(f: jax.Array, eps: float = 1e-5) -> tuple[jax.Array, jax.Array]:
    """Per-sample, per-channel spatial mean and std of an NHWC map (Eq. 2–3), at least in float32
    (a bfloat16 map's statistics are reduced in float32)."""
    f = f.astype(jnp.promote_types(f.dtype, jnp.float32))
    mu = jnp.mean(f, axis=(1, 2))
    var = jnp.mean(jnp.square(f - mu[:, None, None, :]), axis=(1, 2))
    return mu, jnp.sqrt(var + eps)


class DRLM(nn.Module):
    """Domain representation learning module (Eq. 4–7).

    a = σ(W2 ReLU(W1 pool(F))) splits F into F⁺ = a·F (passed on) and F⁻ = (1−a)·F, whose pooled
    features give P(F⁻) = σ(W_p pool(F⁻)) for L_p. Returns F⁺ and the statistics the stats pass
    and the losses need: 'p_logit' is the logit L_p sees. `entropy_head` (config.model):
      'paper'       — p_logit = W_p pool(F⁻); L_p trains W_p and E alike (Eq. 7 as written);
      'adversarial' — p_logit uses W_p held fixed (stop_gradient), so L_p trains only E, and
                      'head_logit' = W_p applied to pool(F⁻) held fixed, for the cross-entropy
                      that trains W_p alone to predict liveness (losses.entropy_head_bce).
    'wp_norm' is ‖W_p‖ (kernel), for the logs.
    """

    reduction: int = 16
    entropy_head: str = "paper"

    @nn.compact
    def __call__(self, f):
        c = f.shape[-1]
        pooled = jnp.mean(f, axis=(1, 2))
        hidden = nn.relu(
            nn.Dense(max(1, c // self.reduction), name="W1", param_dtype=jnp.float32)(pooled)
        )
        a = nn.sigmoid(nn.Dense(c, name="W2", param_dtype=jnp.float32)(hidden))  # Eq. 4
        f_plus = f * a.astype(f.dtype)[:, None, None, :]  # Eq. 5 (in the activations' dtype)
        f_minus = f - f_plus  # Eq. 6
        pooled_minus = jnp.mean(f_minus.astype(a.dtype), axis=(1, 2))
        wp = nn.Dense(1, name="Wp", param_dtype=jnp.float32)
        p_logit = wp(pooled_minus)[:, 0]  # Eq. 7
        kernel, bias = wp.variables["params"]["kernel"], wp.variables["params"]["bias"]
        mu, sigma = instance_stats(f_minus)  # Eq. 2–3
        stats = {"attention": a, "p_logit": p_logit, "mean": mu, "std": sigma,
                 "wp_norm": jnp.sqrt(jnp.sum(jnp.square(kernel)))}
        if self.entropy_head == "adversarial":
            sg = jax.lax.stop_gradient
            # L_p's only gradient on W_p drives it to 0 (P ≡ ½ whatever F⁻ holds): here W_p is
            # a critic that L_p cannot move, and E must make F⁻ uninformative to it.
            stats["p_logit"] = (pooled_minus @ sg(kernel) + sg(bias))[:, 0]
            stats["head_logit"] = (sg(pooled_minus) @ kernel + bias)[:, 0]
        return f_plus, stats


class _Kernel(nn.Module):
    features: int

    @nn.compact
    def __call__(self, cin: int):
        return self.param(
            "kernel", nn.initializers.kaiming_normal(), (3, 3, cin, self.features), jnp.float32
        )


class _BatchNormVariables(nn.Module):
    features: int
    momentum: float = 0.9

    @nn.compact
    def __call__(self, batch_moments=None):
        c = self.features
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        if batch_moments is not None and not self.is_initializing():
            # Running averages for evaluation, flax BatchNorm's rule (not while initialising).
            m = self.momentum
            mean.value = m * mean.value + (1 - m) * jax.lax.stop_gradient(batch_moments[0])
            var.value = m * var.value + (1 - m) * jax.lax.stop_gradient(batch_moments[1])
        return scale, bias, mean.value, var.value


class ConvBNLayer(nn.Module):
    """The variables of one conv → BatchNorm → ReLU layer of E or D, under ConvBNReLU's names.

    E and D apply them through `ops` (batch statistics per group of images, fused units), so this
    module only declares them: `Conv3x3_0/kernel`, `BatchNorm_0/{scale, bias}` and the running
    statistics `BatchNorm_0/{mean, var}`. Called with `batch_moments=(mean, var)` it also moves the
    running statistics. Returns (kernel, scale, bias, running mean, running var).
    """

    features: int
    momentum: float = 0.9

    @nn.compact
    def __call__(self, cin: int, batch_moments=None):
        kernel = _Kernel(self.features, name="Conv3x3_0")(cin)
        return (kernel,) + _BatchNormVariables(self.features, self.momentum, name="BatchNorm_0")(
            batch_moments
        )


def _bn_relu(layer: ConvBNLayer, cin: int, z, train: bool, groups: int, eps: float):
    """relu(BatchNorm(z)) in plain jnp: batch statistics per group (train) or running averages."""
    _, scale, bias, mean, var = layer(cin)
    if train:
        a, batch_mean, batch_var = ops.bn_relu_reference(z, scale, bias, eps, groups)
        layer(cin, (batch_mean, batch_var))
        return a
    return ops.bn_relu(z, scale, bias, mean, jax.lax.rsqrt(var + eps))


def _check_groups(x, groups: int, module: str):
    if groups < 1 or x.shape[0] % groups:
        raise ValueError(
            f"{module}: batch of {x.shape[0]} images does not split into groups={groups} "
            f"equal domain batches"
        )


class FeatureExtractor(nn.Module):
    """E: conv 64, then three [conv 128 → 196 → 128, max-pool, DRLM] blocks.

    `groups`: the batch is that many domain batches of equal size, laid end to end; BatchNorm uses
    batch statistics per domain batch in training. With `fast_grad`, training runs through the
    fused units of `ops` (one saved map per convolution, GEMM-based backward); otherwise through
    plain jnp and XLA's own derivatives (the reference the fused units are tested against).

    `remat` ('none', 'blocks' or 'layers'; model.remat) with `remat_policy` (a
    `jax.checkpoint_policies` name): in training, the backward pass recomputes E piece by piece
    instead of keeping its activations. 'blocks': the stem and each block run under their own
    `jax.checkpoint`, so between blocks only their inputs are kept. 'layers': each layer runs
    under its own — the BatchNorm + ReLU of the previous layer with this layer's convolution (the
    unit the fused ops apply), and the last BatchNorm + ReLU with the max-pool — so only the
    layers' pre-BatchNorm inputs are kept, and one layer at a time is recomputed. The stem
    (conv 64) ends before its BatchNorm: the fused units apply that BatchNorm inside the first
    block's first convolution, so that block begins with it.
    """

    width: float = 1.0
    reduction: int = 16
    fast_grad: bool = True
    momentum: float = 0.9
    epsilon: float = 1e-5
    pool_window: int = 3
    entropy_head: str = "paper"
    remat: str = "none"
    remat_policy: str = ""

    @nn.compact
    def __call__(self, x, train: bool, groups: int = 1):
        _check_groups(x, groups, "FeatureExtractor")
        widths = [scaled(c, self.width) for c in (64,) + (128, 196, 128) * 3]
        cins = [x.shape[-1]] + widths[:-1]
        layers = [
            ConvBNLayer(c, self.momentum, name=f"ConvBNReLU_{i}") for i, c in enumerate(widths)
        ]
        # Every layer's variables are read here, outside the blocks, and passed in as arrays; the
        # blocks hand back their BatchNorm moments, and the running statistics move here too.
        # So a block is a function of arrays (and its DRLM), which jax.checkpoint can recompute.
        variables = [layer(cin) for layer, cin in zip(layers, cins)]
        remat = self.remat if train and self.remat_policy else "none"
        policy = getattr(jax.checkpoint_policies, self.remat_policy) if remat != "none" else None
        run = (lambda fn: nn.checkpoint(fn, policy=policy)) if remat == "blocks" \
            else (lambda fn: fn)
        unit = (lambda fn: jax.checkpoint(fn, policy=policy)) if remat == "layers" \
            else (lambda fn: fn)

        # Python values (b, unit) reach the lifted checkpoint by closure: its arguments are traced.
        z = run(lambda mdl, x, kernel: _e_stem(mdl, x, kernel, unit))(self, x, variables[0][0])
        f = None  # the previous block's F⁺ (set by its DRLM)
        block_outputs, drlm = [], []
        for b in range(3):
            # The first block also applies the stem's BatchNorm + ReLU (pending on z); the others
            # start from the previous DRLM's F⁺.
            owned = list(range(0 if b == 0 else 3 * b + 1, 3 * b + 4))

            def block(mdl, inp, block_variables, b=b):
                return _e_block(mdl, inp, block_variables, b, train, groups, unit)

            f, stats, moments = run(block)(self, z if b == 0 else f,
                                           tuple(variables[i] for i in owned))
            for i, batch_moments in zip(owned, moments):
                layers[i](cins[i], batch_moments)
            block_outputs.append(f)
            drlm.append(stats)
        return f, block_outputs, drlm


def _e_stem(mdl: FeatureExtractor, x, kernel, unit):
    """E's first convolution (its BatchNorm + ReLU run at the start of the first block)."""
    conv = ops.conv_same_fast if mdl.fast_grad else ops.conv_same
    return unit(conv)(x, kernel.astype(x.dtype))


def _e_block(mdl: FeatureExtractor, inp, block_variables, b: int, train: bool, groups: int,
             unit):
    """One block of E: three conv → BatchNorm → ReLU layers, max-pool, DRLM.

    `inp` is the stem's pre-BatchNorm map for b = 0 (`block_variables` then begin with the stem's
    layer), else the previous DRLM's F⁺. Each layer's step runs through `unit` (jax.checkpoint
    under model.remat='layers', else as it is). Returns (F⁺, the DRLM's statistics, the batch
    moments (mean, var) of each layer in `block_variables` — empty outside training).
    """
    fused = train and mdl.fast_grad
    fused_pool = fused and mdl.pool_window == 3  # ops fuses only the 3×3 / stride-2 pool
    conv = ops.conv_same_fast if mdl.fast_grad else ops.conv_same
    eps, dtype = mdl.epsilon, inp.dtype

    def bn_relu(z, scale, bias, mean, var):
        """relu(BatchNorm(z)) and the batch moments (train), or with the running averages."""
        if train:  # batch statistics per domain batch
            return ops.bn_relu_reference(z, scale, bias, eps, groups)
        return ops.bn_relu(z, scale, bias, mean, jax.lax.rsqrt(var + eps)), None, None

    def bn_relu_then_conv(z, scale, bias, mean, var, kernel):
        if fused:
            return ops.bn_relu_conv(z, scale, bias, kernel, eps, groups)
        a, batch_mean, batch_var = bn_relu(z, scale, bias, mean, var)
        return conv(a, kernel), batch_mean, batch_var

    def bn_relu_then_pool(z, scale, bias, mean, var):
        if fused_pool:
            return ops.bn_relu_pool(z, scale, bias, eps, groups)
        a, batch_mean, batch_var = bn_relu(z, scale, bias, mean, var)
        return max_pool(a, mdl.fast_grad, mdl.pool_window), batch_mean, batch_var

    moments = []
    convs = block_variables[1:] if b == 0 else block_variables
    pending = block_variables[0] if b == 0 else None  # the layer whose BatchNorm + ReLU is due
    z = inp
    for layer_variables in convs:
        kernel = layer_variables[0].astype(dtype)
        if pending is None:  # block input: the previous DRLM's F⁺
            z = unit(conv)(z, kernel)
        else:
            z, batch_mean, batch_var = unit(bn_relu_then_conv)(z, *pending[1:], kernel)
            moments.append((batch_mean, batch_var))
        pending = layer_variables
    pooled, batch_mean, batch_var = unit(bn_relu_then_pool)(z, *pending[1:])
    moments.append((batch_mean, batch_var))
    # Named, and parented to `mdl` (the module as the lifted checkpoint sees it), so that its
    # parameters keep their place DRLM_b under E whether or not the block is rematerialised.
    f, stats = DRLM(mdl.reduction, mdl.entropy_head, name=f"DRLM_{b}", parent=mdl)(pooled)
    return f, stats, tuple(moments) if train else ()


class DepthEstimator(nn.Module):
    """D: the three blocks' outputs average-pooled to the last block's grid (RFM's
    adaptive_avg_pool2d; every pixel of a block counts), concatenated, conv 128 → 64 → 1.

    `groups` as in FeatureExtractor.
    """

    width: float = 1.0
    fast_grad: bool = True
    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, block_outputs: Sequence[jax.Array], train: bool, groups: int = 1):
        _check_groups(block_outputs[-1], groups, "DepthEstimator")
        _, h, w, _ = block_outputs[-1].shape
        resized = [f if f.shape[1:3] == (h, w) else adaptive_avg_pool(f, (h, w))
                   for f in block_outputs]
        x = jnp.concatenate(resized, axis=-1)
        # D works on the small last-block grid, where one im2col GEMM per conv beats per-tap GEMMs.
        conv = ops.conv_same_im2col if self.fast_grad else ops.conv_same
        for i, c in enumerate((128, 64)):
            layer, cin = (
                ConvBNLayer(scaled(c, self.width), self.momentum, name=f"ConvBNReLU_{i}"),
                x.shape[-1],
            )
            x = conv(x, layer(cin)[0].astype(x.dtype))
            x = _bn_relu(layer, cin, x, train, groups, self.epsilon)
        # Linear output: the target (a depth map in [0, 1] or zeros) is regressed with MSE (Eq. 10).
        x = nn.Conv(1, (3, 3), padding="SAME", param_dtype=jnp.float32, name="out")(x)
        return x[..., 0]


class MetaLearner(nn.Module):
    """M: conv 128 → pool → 256 → pool → 512, GAP, adaptation layer h (Eq. 9), one logit (Eq. 8).

    The inner step differentiates M twice: its convs are im2col GEMMs (`ops.conv_same_im2col`),
    whose derivatives of every order stay GEMMs.
    """

    width: float = 1.0
    adaptation_dim: int = 512
    fast_grad: bool = True
    momentum: float = 0.9
    epsilon: float = 1e-5
    pool_window: int = 3

    @nn.compact
    def __call__(self, x, train: bool):
        impl = "im2col" if self.fast_grad else "xla"
        for i, c in enumerate((128, 256, 512)):
            x = ConvBNReLU(scaled(c, self.width), impl, self.momentum, self.epsilon)(x, train)
            if i < 2:
                x = max_pool(x, window=self.pool_window)
        x = jnp.mean(x, axis=(1, 2))
        h = nn.Dense(self.adaptation_dim, name="adaptation", param_dtype=jnp.float32)(x)
        logit = nn.Dense(1, name="logit", param_dtype=jnp.float32)(h)[:, 0]
        return logit, h


def remat_setting(model_config) -> tuple[str, str]:
    """(where, policy) of E's rematerialisation: where is 'none', 'encoder', 'blocks' or 'layers'
    (`model.remat`), policy the `jax.checkpoint_policies` name (`model.remat_policy`); ('none',
    '') when either says none. A config saved before `model.remat` existed names only the policy,
    which then meant all of E: 'encoder', the field's default."""
    where = str(model_config.get("remat", "encoder"))
    policy = str(model_config.get("remat_policy", ""))
    if where == "none" or not policy:
        return "none", ""
    return where, policy


def rematerialized(fn, model_config):
    """`fn` (E's training forward) under one `jax.checkpoint` with the named policy when
    `model.remat='encoder'`, else `fn` itself ('blocks' and 'layers' are applied inside E, see
    FeatureExtractor). All of E at once: its backward pass recomputes all of E's activations
    together, so this barely lowers the peak (BENCHMARKS.md)."""
    where, policy = remat_setting(model_config)
    if where != "encoder":
        return fn
    return jax.checkpoint(fn, policy=getattr(jax.checkpoint_policies, policy))


def compute_dtype(model_config, params) -> jnp.dtype:
    """The activations' dtype: bfloat16 with `model.dtype='bfloat16'` (convolutions and matmuls
    run in it; parameters, BatchNorm statistics and losses stay float32), else the parameters'."""
    if str(model_config.get("dtype", "float32")) == "bfloat16":
        return jnp.bfloat16
    return jax.tree.leaves(params)[0].dtype


def build_modules(model_config: Any) -> tuple[FeatureExtractor, DepthEstimator, MetaLearner]:
    """E, D, M from `config.model` (fields documented in configs/default.py); `fast_conv_grad`
    resolved for the backend (`runtime.fast_conv_grad`: 'auto' means the CPU-tuned ops on CPU,
    and never with bfloat16 activations: those ops are float32 only)."""
    for c in (64, 128, 196, 256, 512):
        scaled(c, model_config.width)
    fast = runtime.fast_conv_grad(model_config.fast_conv_grad)
    if str(model_config.get("dtype", "float32")) == "bfloat16":
        fast = False
    common = dict(
        momentum=model_config.bn_momentum, epsilon=model_config.bn_epsilon, fast_grad=fast
    )
    window = int(model_config.pool_window)
    where, policy = remat_setting(model_config)
    return (
        FeatureExtractor(model_config.width, model_config.drlm_reduction, **common,
                         pool_window=window, entropy_head=model_config.entropy_head,
                         remat=where if where in ("blocks", "layers") else "none",
                         remat_policy=policy),
        DepthEstimator(model_config.width, **common),
        MetaLearner(model_config.width, model_config.adaptation_dim, **common, pool_window=window),
    )
