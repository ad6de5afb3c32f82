"""BatchNorm statistics for evaluation recomputed from training batches under the current weights
(`eval.bn_statistics='recomputed'`), in place of the running averages the training steps keep.

The running averages move by m·old + (1 − m)·batch at every step (m = model.bn_momentum, 0.9 as in
PyTorch): at evaluation they weigh the last ~10 steps' batches, taken under weights that have
moved since. Recomputing averages the moments of `eval.bn_batches` fresh batches, drawn and
normalised exactly as training draws and normalises them (per domain batch or pooled; the ERM
baseline's pooled batches), with the weights being evaluated — "PreciseBN" (Wu & Johnson,
"Rethinking 'Batch' in BatchNorm", 2021). Nothing of the target or of source validation is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp

from d2am_jax import erm, meta, models
from d2am_jax import state as state_lib


def make_batch_moments(config, placement=None) -> state_lib.JittedStep:
    """`moments(params, batch_stats, batch) -> tree like batch_stats`: the BatchNorm moments that
    the run's own training forward (Eq. 11–13's objective for D²AM, the ERM loss) takes from one
    training batch, in the running statistics' layout — E's and D's averaged over the domain
    batches as training averages them, M's over the meta-train domains. Jitted once.

    The forward runs from running statistics of 0, so each new statistic is (1 − m)·moment
    exactly (the update is linear), and is divided by (1 − m).
    """
    m = float(config.model.bn_momentum)
    if config.method == "d2am":
        objective = meta.make_objective(config)
        forward = lambda p, s, b, k: objective(p, s, b, k, False)[1][0]
    else:
        loss = erm.make_loss(config)
        forward = lambda p, s, b, k: loss(p, s, b, k)[1][0]

    def moments(params, batch_stats, batch):
        zeros = jax.tree.map(jnp.zeros_like, batch_stats)
        # Only the statistics are returned: XLA drops the losses, the inner step and the MMD
        # prior draws (whose key is therefore any).
        new = forward(params, zeros, batch, jax.random.PRNGKey(0))
        return jax.tree.map(lambda a: a / (1.0 - m), new)

    return state_lib.jit_step(
        moments, training=True, placement=placement,
        rematerialized=models.remat_setting(config.model)[0] != "none")


def recompute(moments: Callable, params, batch_stats, batches: Iterable) -> dict:
    """The mean over `batches` of `moments(params, batch_stats, batch)`: the recomputed
    statistics (a tree like batch_stats). At least one batch."""
    total, n = None, 0
    for batch in batches:
        out = moments(params, batch_stats, batch)
        total = out if total is None else jax.tree.map(jnp.add, total, out)
        n += 1
    if total is None:
        raise ValueError("recompute: no batches (eval.bn_batches must be ≥ 1)")
    return jax.tree.map(lambda t: t / n, total)
