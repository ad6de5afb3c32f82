"""D²AM's meta-learning step (Algorithm 1 lines 10–17, Eq. 8–13) as pure, jitted functions.

Inner step: one `optax.sgd(α)` update of θ_M per meta-train domain; outer step: Adam(β) on θ_E, θ_M,
θ_D with the gradient of one total objective, differentiated exactly through the inner step
(second order) or with the inner gradient held constant (first order).
"""

from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from d2am_jax import losses, models, runtime

Batch = Mapping[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array            # outer steps taken
    params: Any                # {'E': ..., 'D': ..., 'M': ...}
    batch_stats: Any           # running BatchNorm statistics, same keys
    opt_state: Any             # outer optax state
    rng: jax.Array             # root key; step keys are fold_in(rng, step)


def outer_optimizer(meta_config) -> optax.GradientTransformation:
    """Adam(β) on all parameters (Eq. 11–13)."""
    if meta_config.weight_decay:
        return optax.adamw(meta_config.outer_lr, weight_decay=meta_config.weight_decay)
    return optax.adam(meta_config.outer_lr)


def init_state(config, rng: jax.Array, batch_size: int = 2) -> TrainState:
    """Fresh parameters for E, D and M at the config's resolution, and the outer optimizer state.

    Jitted: run eagerly, flax's init would dispatch (and compile) every primitive one by one.
    """
    E, D, M = models.build_modules(config.model)
    r = config.data.resolution
    tx = outer_optimizer(config.meta)

    @jax.jit
    def init(rng):
        k_e, k_d, k_m, k_root = jax.random.split(rng, 4)
        x = jnp.zeros((batch_size, r, r, models.INPUT_CHANNELS), jnp.float32)
        vars_e = E.init(k_e, x, True)
        feat, blocks, _ = E.apply(vars_e, x, True, mutable=["batch_stats"])[0]
        vars_d = D.init(k_d, blocks, True)
        vars_m = M.init(k_m, feat, True)
        params = {"E": vars_e["params"], "D": vars_d["params"], "M": vars_m["params"]}
        stats = {"E": vars_e["batch_stats"], "D": vars_d["batch_stats"], "M": vars_m["batch_stats"]}
        return TrainState(jnp.zeros((), jnp.int32), params, stats, tx.init(params), k_root)

    return init(rng)


def validate_batch(batch: Batch, config) -> None:
    """Shape checks before tracing, so that bad input fails with the field's name, not in XLA."""
    k = config.meta.num_domains
    r = config.data.resolution
    if k < 2:
        raise ValueError(f"meta.num_domains (K) must be ≥ 2 (K-1 meta-train + 1 meta-test), got {k}")
    for key in ("x", "y", "depth"):
        if key not in batch:
            raise ValueError(f"meta batch: missing field '{key}' (expected x, y, depth)")
    x, y, d = (np.shape(batch[key]) for key in ("x", "y", "depth"))
    expect_x = f"[K={k}, B, {r}, {r}, {models.INPUT_CHANNELS}] (data.resolution={r}, RGB+HSV)"
    if len(x) != 5 or x[0] != k or x[2:4] != (r, r) or x[4] != models.INPUT_CHANNELS:
        raise ValueError(f"meta batch field 'x' has shape {tuple(x)}; expected {expect_x}")
    b = x[1]
    if b < 2:
        raise ValueError(f"meta batch: per-domain batch must be ≥ 2 (live and spoof), got {b}")
    if tuple(y) != (k, b):
        raise ValueError(f"meta batch field 'y' has shape {tuple(y)}; expected [K, B] = {(k, b)}")
    g = depth_size(r)
    if tuple(d) != (k, b, g, g):
        raise ValueError(f"meta batch field 'depth' has shape {tuple(d)}; expected {(k, b, g, g)}")


def depth_size(resolution: int) -> int:
    """The depth map's grid: three stride-2 pools."""
    size = resolution
    for _ in range(3):
        size = (size + 1) // 2
    return size


def stack_domains(meta_train: list[Batch], meta_test: Batch) -> dict[str, np.ndarray]:
    """K-1 meta-train batches and one meta-test batch → the stacked [K, B, ...] layout (test last)."""
    batches = list(meta_train) + [meta_test]
    names = [f"meta_train[{i}]" for i in range(len(meta_train))] + ["meta_test"]
    sizes = {n: np.shape(b["x"])[0] for n, b in zip(names, batches)}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"all domain batches must have the same size; got {sizes}")
    return {key: np.stack([np.asarray(b[key]) for b in batches]) for key in ("x", "y", "depth")}


def make_objective(config) -> Callable:
    """J(params, batch_stats, batch, key, second_order, inner_lr=None) → (J, aux): Eq. 11–13's total.

    Terms that do not depend on a module give it no gradient, so ∇J gives exactly Eq. 11 (θ_M),
    12 (θ_E) and 13 (θ_D). `inner_lr` (α) defaults to the config's; passing it as an array lets a
    study sweep α without recompiling.
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
        dtype = jax.tree.leaves(params["E"])[0].dtype
        x, y, depth = x.astype(dtype), y.astype(dtype), depth.astype(dtype)

        # E and D on all K domain batches as one flat batch of K·B images; BatchNorm keeps batch
        # statistics per domain batch (groups=K). One flat batch gives XLA's GEMMs K× larger
        # operands than a vmap over domains, and the fused units of `ops` apply directly.
        b = x.shape[1]
        (feat, blocks, drlm), new_e = E.apply(
            {"params": params["E"], "batch_stats": batch_stats["E"]}, x.reshape(k * b, *x.shape[2:]), True,
            groups=k, mutable=["batch_stats"],
        )
        depth_pred, new_d = D.apply(
            {"params": params["D"], "batch_stats": batch_stats["D"]}, blocks, True, groups=k,
            mutable=["batch_stats"],
        )
        per_domain = lambda a: a.reshape(k, b, *a.shape[1:])
        feat, depth_pred = per_domain(feat), per_domain(depth_pred)
        p_logits = [per_domain(s["p_logit"]) for s in drlm]
        l_dep = jnp.sum(jax.vmap(losses.depth)(depth_pred, depth))        # Σ over all K batches
        train_p_logits = [p[: k - 1] for p in p_logits]
        l_p = jnp.sum(jax.vmap(lambda *ps: losses.domain_entropy(ps))(*train_p_logits))

        keys = jax.random.split(key, 2 * (k - 1)).reshape(k - 1, 2, -1)
        feat_t, y_t = feat[k - 1], y[k - 1]

        def meta_train_and_test(feat_i, y_i, keys_i):
            grad_fn = jax.value_and_grad(m_loss, has_aux=True)
            (loss_i, aux_i), g = grad_fn(params["M"], batch_stats["M"], feat_i, y_i, keys_i[0])
            if not second_order:
                g = jax.lax.stop_gradient(g)          # first-order approximation
            updates, _ = inner_tx.update(g, inner_tx.init(params["M"]), params["M"])
            params_m_i = optax.apply_updates(params["M"], updates)     # θ_M'_i
            loss_t, aux_t = m_loss(params_m_i, batch_stats["M"], feat_t, y_t, keys_i[1])
            return loss_i, aux_i, loss_t, aux_t

        # A Python loop, not vmap: vmapping M over its K-1 adapted parameter sets turns its convs
        # into grouped convolutions, which XLA:CPU runs an order of magnitude slower.
        per_domain = [meta_train_and_test(feat[i], y[i], keys[i]) for i in range(k - 1)]
        stack = lambda *xs: jax.tree.map(lambda *a: jnp.stack(a), *xs)
        loss_tr, aux_tr, loss_te, aux_te = stack(*per_domain)
        total = jnp.sum(loss_tr) + jnp.sum(loss_te) + l_dep + mc.lambda_p * l_p

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
            "acc/meta_train": jnp.mean(aux_tr[2]),
            "acc/meta_test": jnp.mean(aux_te[2]),
        }
        return total, (new_stats, metrics)

    return objective


def _global_norm(tree) -> jax.Array:
    # Written out: optax renamed its helper across the versions requirements.txt admits.
    return jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(tree)))


def _cosine(a, b) -> jax.Array:
    dot = sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return dot / (_global_norm(a) * _global_norm(b) + 1e-30)


def make_meta_step(config) -> Callable:
    """`meta_step(state, batch, *, second_order) -> (state, metrics)`: jitted, state donated.

    `second_order` is static (each value compiles once). With `config.meta.grad_cosine` the
    metrics also hold the cosine between this step's first- and second-order meta-gradients.
    """
    objective = make_objective(config)
    tx = outer_optimizer(config.meta)
    want_cosine = bool(config.meta.grad_cosine)
    traces = {"count": 0}

    def step(state: TrainState, batch: Batch, second_order: bool):
        traces["count"] += 1          # Python side effect: runs once per trace, never per call
        key = jax.random.fold_in(state.rng, state.step)
        grad_fn = jax.value_and_grad(objective, has_aux=True)
        (_, (new_stats, metrics)), grads = grad_fn(state.params, state.batch_stats, batch, key, second_order)
        if want_cosine:
            other = jax.grad(lambda p: objective(p, state.batch_stats, batch, key, not second_order)[0])(
                state.params
            )
            metrics["grad_cosine_first_second"] = _cosine(grads, other)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        for name in ("E", "D", "M"):
            metrics[f"grad_norm/{name}"] = _global_norm(grads[name])
        metrics["grad_norm/total"] = _global_norm(grads)
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state
        )
        return new_state, metrics

    jitted = jax.jit(step, static_argnames=("second_order",), donate_argnums=(0,),
                     compiler_options=runtime.training_compiler_options())

    def meta_step(state: TrainState, batch: Batch, *, second_order: bool):
        validate_batch(batch, config)
        return jitted(state, batch, second_order=bool(second_order))

    meta_step.trace_count = lambda: traces["count"]
    meta_step.jitted = jitted
    return meta_step


def make_predict(config) -> Callable:
    """`predict(params, batch_stats, x[B, H, W, 6]) -> live probability [B]` with running BN stats."""
    E, _, M = models.build_modules(config.model)

    @jax.jit
    def predict(params, batch_stats, x):
        feat = E.apply({"params": params["E"], "batch_stats": batch_stats["E"]}, x, False)[0]
        logit, _ = M.apply({"params": params["M"], "batch_stats": batch_stats["M"]}, feat, False)
        return jax.nn.sigmoid(logit)

    return predict
