"""The D²AM network in flax.linen: feature extractor E with three DRLMs, depth estimator D, meta-learner M.

Layer table after RFM (conv 64; three blocks of conv 128→196→128 + max-pool, each followed by a
DRLM, Eq. 4–7); D regresses a depth map from the three blocks; M ends in the adaptation layer h.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2am_jax import ops

INPUT_CHANNELS = 6  # RGB + HSV


def scaled(channels: int, width: float, field: str = "model.width") -> int:
    """Channels of a layer under the width multiplier; a layer rounded to zero is an error."""
    c = int(round(channels * width))
    if c < 1:
        raise ValueError(
            f"{field}={width} rounds a {channels}-channel layer to {c} channels; "
            f"expected {field} ≥ {0.5 / channels:.4g}"
        )
    return c


class Conv3x3(nn.Module):
    """3×3 stride-1 SAME convolution (bias-free: a BatchNorm always follows)."""

    features: int
    fast_grad: bool = True

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel", nn.initializers.kaiming_normal(), (3, 3, x.shape[-1], self.features), jnp.float32
        )
        kernel = kernel.astype(x.dtype)
        return (ops.conv_same_fast if self.fast_grad else ops.conv_same)(x, kernel)


class ConvBNReLU(nn.Module):
    features: int
    fast_grad: bool = True
    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, train: bool):
        x = Conv3x3(self.features, self.fast_grad)(x)
        # Training uses batch statistics (per domain batch, see meta.py); evaluation uses the
        # running averages that the outer step accumulates from those batch statistics.
        x = nn.BatchNorm(
            use_running_average=not train, momentum=self.momentum, epsilon=self.epsilon,
            param_dtype=jnp.float32,
        )(x)
        return nn.relu(x)


def max_pool(x, fast_grad: bool = False):
    """3×3 window, stride 2, padding 1 (RFM's MaxPool2d(3, 2, 1)): halves H and W."""
    if fast_grad:
        return ops.max_pool_3x3_s2(x)
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def instance_stats(f: jax.Array, eps: float = 1e-5) -> tuple[jax.Array, jax.Array]:
    """Per-sample, per-channel spatial mean and std of an NHWC map (Eq. 2–3)."""
    mu = jnp.mean(f, axis=(1, 2))
    var = jnp.mean(jnp.square(f - mu[:, None, None, :]), axis=(1, 2))
    return mu, jnp.sqrt(var + eps)


class DRLM(nn.Module):
    """Domain representation learning module (Eq. 4–7).

    a = σ(W2 ReLU(W1 pool(F))) splits F into F⁺ = a·F (passed on) and F⁻ = (1−a)·F, whose pooled
    features give P(F⁻) = σ(W_p pool(F⁻)) for L_p. Returns F⁺ and the statistics the stats pass
    and the losses need.
    """

    reduction: int = 16

    @nn.compact
    def __call__(self, f):
        c = f.shape[-1]
        pooled = jnp.mean(f, axis=(1, 2))
        hidden = nn.relu(nn.Dense(max(1, c // self.reduction), name="W1", param_dtype=jnp.float32)(pooled))
        a = nn.sigmoid(nn.Dense(c, name="W2", param_dtype=jnp.float32)(hidden))           # Eq. 4
        f_plus = f * a[:, None, None, :]                                                  # Eq. 5
        f_minus = f - f_plus                                                              # Eq. 6
        p_logit = nn.Dense(1, name="Wp", param_dtype=jnp.float32)(jnp.mean(f_minus, axis=(1, 2)))[:, 0]
        mu, sigma = instance_stats(f_minus)                                               # Eq. 2–3
        return f_plus, {"attention": a, "p_logit": p_logit, "mean": mu, "std": sigma}


class FeatureExtractor(nn.Module):
    """E: conv 64, then three [conv 128 → 196 → 128, max-pool, DRLM] blocks."""

    width: float = 1.0
    reduction: int = 16
    fast_grad: bool = True
    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, train: bool):
        cbr = lambda c: ConvBNReLU(scaled(c, self.width), self.fast_grad, self.momentum, self.epsilon)
        x = cbr(64)(x, train)
        block_outputs, drlm = [], []
        for _ in range(3):
            for c in (128, 196, 128):
                x = cbr(c)(x, train)
            x = max_pool(x, self.fast_grad)
            x, stats = DRLM(self.reduction)(x)
            block_outputs.append(x)
            drlm.append(stats)
        return x, block_outputs, drlm


class DepthEstimator(nn.Module):
    """D: the three blocks' outputs resized to the last block's grid, concatenated, conv 128 → 64 → 1."""

    width: float = 1.0
    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, block_outputs: Sequence[jax.Array], train: bool):
        n, h, w, _ = block_outputs[-1].shape
        resized = [
            f if f.shape[1:3] == (h, w)
            else jax.image.resize(f, (n, h, w, f.shape[-1]), "bilinear", antialias=False)
            for f in block_outputs
        ]
        x = jnp.concatenate(resized, axis=-1)
        for c in (128, 64):
            x = ConvBNReLU(scaled(c, self.width), False, self.momentum, self.epsilon)(x, train)
        # Linear output: the target (a depth map in [0, 1] or zeros) is regressed with MSE (Eq. 10).
        x = nn.Conv(1, (3, 3), padding="SAME", param_dtype=jnp.float32, name="out")(x)
        return x[..., 0]


class MetaLearner(nn.Module):
    """M: conv 128 → pool → 256 → pool → 512, GAP, adaptation layer h (Eq. 9), one logit (Eq. 8).

    Its convs keep XLA's own derivatives: the inner step differentiates M twice.
    """

    width: float = 1.0
    adaptation_dim: int = 512
    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, train: bool):
        for i, c in enumerate((128, 256, 512)):
            x = ConvBNReLU(scaled(c, self.width), False, self.momentum, self.epsilon)(x, train)
            if i < 2:
                x = max_pool(x)
        x = jnp.mean(x, axis=(1, 2))
        h = nn.Dense(self.adaptation_dim, name="adaptation", param_dtype=jnp.float32)(x)
        logit = nn.Dense(1, name="logit", param_dtype=jnp.float32)(h)[:, 0]
        return logit, h


def build_modules(model_config: Any) -> tuple[FeatureExtractor, DepthEstimator, MetaLearner]:
    """E, D, M from `config.model` (fields documented in configs/default.py)."""
    if model_config.drlm_reduction < 1:
        raise ValueError(f"model.drlm_reduction must be ≥ 1, got {model_config.drlm_reduction}")
    if model_config.adaptation_dim < 1:
        raise ValueError(f"model.adaptation_dim must be ≥ 1, got {model_config.adaptation_dim}")
    for c in (64, 128, 196, 256, 512):
        scaled(c, model_config.width)
    common = dict(momentum=model_config.bn_momentum, epsilon=model_config.bn_epsilon)
    return (
        FeatureExtractor(model_config.width, model_config.drlm_reduction, model_config.fast_conv_grad, **common),
        DepthEstimator(model_config.width, **common),
        MetaLearner(model_config.width, model_config.adaptation_dim, **common),
    )
