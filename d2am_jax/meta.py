"""D²AM's meta-learning step (Algorithm 1 lines 10–17, Eq. 8–13) as pure, jitted functions.

Inner step: one `optax.sgd(α)` update of θ_M per meta-train domain; outer step: Adam(β) on θ_E, θ_M,
θ_D with the gradient of one total objective, differentiated exactly through the inner step
(second order) or with the inner gradient held constant (first order).
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

Batch = Mapping[str, jax.Array]


def validate_batch(batch: Batch, config) -> None:
    """Shape checks before tracing, so that bad input fails with the field's name, not in XLA:
    x [K ≥ 2, B ≥ 2, r, r, 3] uint8 RGB (or [..., 6] float RGB+HSV), y [K, B], depth [K, B, g, g]
    (uint8 k/255 or float in [0, 1]); r = data.resolution, g its depth grid.
    """
    r = config.data.resolution
    for key in ("x", "y", "depth"):
        if key not in batch:
            raise UserError(f"meta batch: missing field '{key}' (expected x, y, depth)")
    x, y, d = (np.shape(batch[key]) for key in ("x", "y", "depth"))
    if len(x) != 5 or x[0] < 2 or x[1] < 2 or not models.input_ok(x, batch["x"].dtype, r):
        raise UserError(
            f"meta batch field 'x' has shape {tuple(x)} and dtype {batch['x'].dtype}; expected "
            f"[K ≥ 2, B ≥ 2, r, r, C] with {models.INPUT_FORMS} (data.resolution={r}): K-1 "
            f"meta-train domains and one meta-test domain, live and spoof in each"
        )
    k, b = x[:2]
    if tuple(y) != (k, b):
        raise UserError(f"meta batch field 'y' has shape {tuple(y)}; expected [K, B] = {(k, b)}")
    g = depth_size(r)
    if tuple(d) != (k, b, g, g):
        raise UserError(f"meta batch field 'depth' has shape {tuple(d)}; expected {(k, b, g, g)}")


def make_objective(config) -> Callable:
    """J(params, batch_stats, batch, key, second_order, inner_lr=None) → (J, aux): Eq. 11–13's
    total.

    Terms that do not depend on a module give it no gradient, so ∇J gives exactly Eq. 11 (θ_M),
    12 (θ_E) and 13 (θ_D). Under model.entropy_head='adversarial' the total also holds λ_p · the
    head's cross-entropy, whose only gradient is on W_p (the DRLM stops it into F⁻), while L_p's
    gradient on W_p is stopped: one total still serves every parameter. `inner_lr` (α) defaults
    to the config's; passing it as an array lets a study sweep α without recompiling.
    """
    E, D, M = models.build_modules(config.model)
    mc = config.meta
    bandwidths = tuple(float(s) for s in mc.mmd_bandwidths)

    def m_loss(params_m, stats_m, feat, y, key):
        """L_cls + λ_m L_MMD of M on one domain batch (Eq. 8, 9)."""
        (logit, h), new = M.apply(
            {"params": params_m, "batch_stats": stats_m}, feat, True, mutable=["batch_stats"]
        )
        prior = jax.random.normal(key, h.shape, h.dtype)  # h_t ~ N(0, I)
        l_cls = losses.classification(logit, y)
        l_mmd = losses.mmd_to_prior(h, prior, bandwidths)
        acc = jnp.mean((logit > 0) == (y > 0.5))
        return l_cls + mc.lambda_m * l_mmd, (l_cls, l_mmd, acc, new["batch_stats"])

    def objective(params, batch_stats, batch, key, second_order: bool, inner_lr=None):
        inner_tx = optax.sgd(mc.inner_lr if inner_lr is None else inner_lr)
        x, y, depth = batch["x"], batch["y"], batch["depth"]
        k = x.shape[0]
        dtype = jax.tree.leaves(params["E"])[0].dtype    # losses, targets, the inner step
        x = models.model_input(x, models.compute_dtype(config.model, params["E"]))
        y = y.astype(dtype)
        depth = models.depth_input(depth, dtype)

        # E and D on all K domain batches as one flat batch of K·B images; BatchNorm keeps batch
        # statistics per domain batch (groups=K) or, with meta.batch_norm='pooled', over all K·B.
        # One flat batch gives XLA's GEMMs K× larger operands than a vmap over domains, and the
        # fused units of `ops` apply directly.
        b = x.shape[1]
        groups = k if mc.batch_norm == "per_domain" else 1
        e_train = models.rematerialized(
            lambda variables, x: E.apply(variables, x, True, groups=groups,
                                         mutable=["batch_stats"]),
            config.model)
        (feat, blocks, drlm), new_e = e_train(
            {"params": params["E"], "batch_stats": batch_stats["E"]},
            x.reshape(k * b, *x.shape[2:]))
        depth_pred, new_d = D.apply(
            {"params": params["D"], "batch_stats": batch_stats["D"]},
            blocks,
            True,
            groups=groups,
            mutable=["batch_stats"],
        )
        per_domain = lambda a: a.reshape(k, b, *a.shape[1:])
        feat, depth_pred = per_domain(feat), per_domain(depth_pred)
        l_dep = jnp.sum(jax.vmap(losses.depth)(depth_pred, depth))  # Σ over all K batches
        # L_p on the meta-train batches B_i (Eq. 12), with the adversarial head's cross-entropy
        # (model.entropy_head; 0 under 'paper') on the same batches.
        train_drlm = [
            {key: per_domain(s[key])[: k - 1] for key in ("p_logit", "head_logit") if key in s}
            for s in drlm
        ]
        l_p, l_head = (jnp.sum(t) for t in jax.vmap(losses.drlm_terms)(train_drlm, y[: k - 1]))

        keys = jax.random.split(key, 2 * (k - 1)).reshape(k - 1, 2, -1)
        feat_t, y_t = feat[k - 1], y[k - 1]

        def meta_train_and_test(feat_i, y_i, keys_i):
            grad_fn = jax.value_and_grad(m_loss, has_aux=True)
            (loss_i, aux_i), g = grad_fn(params["M"], batch_stats["M"], feat_i, y_i, keys_i[0])
            if not second_order:
                g = jax.lax.stop_gradient(g)  # first-order approximation
            updates, _ = inner_tx.update(g, inner_tx.init(params["M"]), params["M"])
            params_m_i = optax.apply_updates(params["M"], updates)  # θ_M'_i
            loss_t, aux_t = m_loss(params_m_i, batch_stats["M"], feat_t, y_t, keys_i[1])
            return loss_i, aux_i, loss_t, aux_t

        # A Python loop, not vmap: vmapping M over its K-1 adapted parameter sets turns its convs
        # into grouped convolutions, which XLA:CPU runs an order of magnitude slower.
        per_domain = [meta_train_and_test(feat[i], y[i], keys[i]) for i in range(k - 1)]
        stack = lambda *xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)
        loss_tr, aux_tr, loss_te, aux_te = stack(*per_domain)
        total = jnp.sum(loss_tr) + jnp.sum(loss_te) + l_dep + mc.lambda_p * (l_p + l_head)

        mean0 = lambda t: jax.tree.map(lambda a: jnp.mean(a, axis=0), t)
        # E's and D's running statistics already average the K domain batches' moments.
        new_stats = {"E": new_e["batch_stats"], "D": new_d["batch_stats"], "M": mean0(aux_tr[3])}
        metrics = {
            "loss/total": total,
            "loss/cls_meta_train": jnp.mean(aux_tr[0]),
            "loss/mmd_meta_train": jnp.mean(aux_tr[1]),
            "loss/cls_meta_test": jnp.mean(aux_te[0]),
            "loss/mmd_meta_test": jnp.mean(aux_te[1]),
            "loss/depth": l_dep / k,
            "loss/entropy": l_p / (k - 1),
            "loss/entropy_head": l_head / (k - 1),
            **losses.drlm_metrics(drlm),
            "acc/meta_train": jnp.mean(aux_tr[2]),
            "acc/meta_test": jnp.mean(aux_te[2]),
        }
        return total, (new_stats, metrics)

    return runtime.with_project_random(objective)


def _cosine(a, b) -> jax.Array:
    dot = sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return dot / (state_lib.global_norm(a) * state_lib.global_norm(b) + 1e-30)


def make_meta_step(config, placement=None, total_steps: int | None = None) -> Callable:
    """`meta_step(state, batch, *, second_order) -> (state, metrics)`: jitted, state donated.

    `second_order` is static (each value compiles once). With `config.meta.grad_cosine` the
    metrics also hold the cosine between this step's first- and second-order meta-gradients and
    their norm ratio ‖first‖ / ‖second‖ (`grad_norm_ratio_first_second`), on the same batch.
    The batch is checked (`validate_batch`) before it reaches the compiled step. `placement`
    (`runtime.Placement`): the mesh a sharded run's state and batches live on. `total_steps`:
    the run's number of outer steps, which a scheduled β needs (meta.outer_lr_schedule); the
    metrics then also hold this step's β as `lr/outer`.
    """
    objective = make_objective(config)
    tx = state_lib.outer_optimizer(config.meta, total_steps)
    report_lr = state_lib.scheduled_lr_metric(config.meta, total_steps)
    want_cosine = bool(config.meta.grad_cosine)

    def step(state: state_lib.TrainState, batch: Batch, second_order: bool):
        key = jax.random.fold_in(state.rng, state.step)
        grad_fn = jax.value_and_grad(objective, has_aux=True)
        (_, (new_stats, metrics)), grads = grad_fn(
            state.params, state.batch_stats, batch, key, second_order
        )
        if want_cosine:
            other = jax.grad(
                lambda p: objective(p, state.batch_stats, batch, key, not second_order)[0]
            )(state.params)
            metrics["grad_cosine_first_second"] = _cosine(grads, other)
            first, second = (other, grads) if second_order else (grads, other)
            metrics["grad_norm_ratio_first_second"] = state_lib.global_norm(first) / (
                state_lib.global_norm(second) + 1e-30)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics.update(state_lib.gradient_norms(grads))
        metrics.update(state_lib.state_scale(params, new_stats))
        metrics.update(report_lr(state.step))
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state
        )
        return new_state, metrics

    jitted = state_lib.jit_step(
        step, static_argnames=("second_order",), donate_state=True, training=True,
        placement=placement, rematerialized=models.remat_setting(config.model)[0] != "none")

    def meta_step(state: state_lib.TrainState, batch: Batch, *, second_order: bool):
        validate_batch(batch, config)
        return jitted(state, batch, second_order=bool(second_order))

    meta_step.trace_count = jitted.trace_count
    meta_step.jitted = jitted
    return meta_step
