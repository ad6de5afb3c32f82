"""The ERM baseline for comparisons: D²AM's network and losses on the pooled source batch, one plain
Adam step per batch — no inner step, no meta-train/meta-test split, no pseudo domains.

Loss: L_cls (Eq. 8) + λ_m L_MMD (Eq. 9) + L_dep (Eq. 10) + λ_p L_p (Eq. 7), all on the same batch
(with λ_p · the entropy head's cross-entropy under model.entropy_head='adversarial').
"""

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from d2am_jax import losses, models, runtime
from d2am_jax import state as state_lib
from d2am_jax.data.dataset import depth_size
from d2am_jax.errors import UserError


def validate_batch(batch: Mapping, config) -> None:
    """Shape checks before tracing: 'x' [N, r, r, 3 | 6], 'y' [N], 'depth' [N, g, g] (or with a
    leading axis of 1, as `MetaBatchSampler.pooled_batch` returns)."""
    r = config.data.resolution
    g = depth_size(r)
    for key in ("x", "y", "depth"):
        if key not in batch:
            raise UserError(f"ERM batch: missing field '{key}' (expected x, y, depth)")
    x, y, d = (np.shape(batch[key]) for key in ("x", "y", "depth"))
    if len(x) != 4 or x[0] < 2 or not models.input_ok(x, batch["x"].dtype, r):
        raise UserError(f"ERM batch field 'x' has shape {tuple(x)} and dtype {batch['x'].dtype};"
                        f" expected [N ≥ 2, r, r, C] with {models.INPUT_FORMS} "
                        f"(data.resolution={r})")
    n = x[0]
    if tuple(y) != (n,):
        raise UserError(f"ERM batch field 'y' has shape {tuple(y)}; expected [{n}]")
    if tuple(d) != (n, g, g):
        raise UserError(f"ERM batch field 'depth' has shape {tuple(d)}; expected {(n, g, g)}")


def flat_batch(batch: Mapping) -> dict:
    """x, y, depth of a pooled batch, its leading axis of 1 (pooled_batch's layout) removed."""
    out = {key: batch[key] for key in ("x", "y", "depth") if key in batch}
    if np.ndim(out.get("x")) == 5 and np.shape(out["x"])[0] == 1:
        out = {key: value[0] for key, value in out.items()}
    return out


def make_loss(config) -> Callable:
    """loss(params, batch_stats, batch, key) → (total, (new batch_stats, metrics))."""
    E, D, M = models.build_modules(config.model)
    mc = config.meta
    bandwidths = tuple(float(s) for s in mc.mmd_bandwidths)

    def loss(params, batch_stats, batch, key):
        dtype = jax.tree.leaves(params["E"])[0].dtype
        x = models.model_input(batch["x"], models.compute_dtype(config.model, params["E"]))
        y, depth = batch["y"].astype(dtype), models.depth_input(batch["depth"], dtype)
        e_train = models.rematerialized(
            lambda variables, x: E.apply(variables, x, True, mutable=["batch_stats"]),
            config.model)
        (feat, blocks, drlm), new_e = e_train(
            {"params": params["E"], "batch_stats": batch_stats["E"]}, x)
        pred, new_d = D.apply(
            {"params": params["D"], "batch_stats": batch_stats["D"]}, blocks, True,
            mutable=["batch_stats"])
        (logit, h), new_m = M.apply(
            {"params": params["M"], "batch_stats": batch_stats["M"]}, feat, True,
            mutable=["batch_stats"])
        prior = jax.random.normal(key, h.shape, h.dtype)  # h ~ N(0, I), Eq. 9
        l_cls = losses.classification(logit, y)
        l_mmd = losses.mmd_to_prior(h, prior, bandwidths)
        l_dep = losses.depth(pred, depth)
        l_p, l_head = losses.drlm_terms(drlm, y)  # head: 0 unless model.entropy_head='adversarial'
        total = l_cls + mc.lambda_m * l_mmd + l_dep + mc.lambda_p * (l_p + l_head)
        new_stats = {"E": new_e["batch_stats"], "D": new_d["batch_stats"],
                     "M": new_m["batch_stats"]}
        metrics = {"loss/total": total, "loss/cls": l_cls, "loss/mmd": l_mmd,
                   "loss/depth": l_dep, "loss/entropy": l_p, "loss/entropy_head": l_head,
                   "acc/train": jnp.mean((logit > 0) == (y > 0.5)), **losses.drlm_metrics(drlm)}
        return total, (new_stats, metrics)

    return runtime.with_project_random(loss)


def make_erm_step(config, placement=None, total_steps: int | None = None) -> Callable:
    """`erm_step(state, batch) -> (state, metrics)`: jitted once, state donated; the same
    TrainState and outer optimizer (Adam(β), its schedule over `total_steps`) as the meta-step."""
    loss = make_loss(config)
    tx = state_lib.outer_optimizer(config.meta, total_steps)
    report_lr = state_lib.scheduled_lr_metric(config.meta, total_steps)

    def step(state: state_lib.TrainState, batch):
        key = jax.random.fold_in(state.rng, state.step)
        (_, (new_stats, metrics)), grads = jax.value_and_grad(loss, has_aux=True)(
            state.params, state.batch_stats, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics.update(state_lib.gradient_norms(grads))
        metrics.update(state_lib.state_scale(params, new_stats))
        metrics.update(report_lr(state.step))
        return state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                             opt_state=opt_state), metrics

    jitted = state_lib.jit_step(
        step, donate_state=True, training=True, placement=placement,
        rematerialized=models.remat_setting(config.model)[0] != "none")

    def erm_step(state: state_lib.TrainState, batch):
        batch = flat_batch(batch)
        validate_batch(batch, config)
        return jitted(state, batch)

    erm_step.trace_count = jitted.trace_count
    erm_step.jitted = jitted
    return erm_step
