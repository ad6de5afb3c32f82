"""Meta-gradients in float64: exact second order against finite differences and a loop reference;
first order as the gradient with the inner gradient held constant; the two orders at α = 0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_meta_batch, tiny_config

from d2am_jax import losses, meta, models, runtime
from d2am_jax import state as state_lib


def _f64(tree):
    return jax.tree.map(
        lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def _config(alpha):
    config = tiny_config(resolution=16, width=0.03125, adaptation_dim=4, per_domain_batch=4)
    config.meta.inner_lr = alpha
    return config


@runtime.with_project_random  # the project's random streams: the same prior samples as meta.py
def reference_objective(config, params, batch_stats, batch, key, const_grads, use_const):
    """Eq. 11–13 written out with Python loops over domains, independently of meta.py's flat
    K·B batch (here E and D see one domain batch at a time).

    The inner step uses the true inner gradient (use_const = 0) or the constants const_grads
    (use_const = 1: the first-order approximation); one compile serves both.
    """
    E, D, M = models.build_modules(config.model)
    mc = config.meta
    k = batch["x"].shape[0]
    keys = jax.random.split(key, 2 * (k - 1)).reshape(k - 1, 2, -1)
    total, feats = 0.0, []
    for d in range(k):
        (feat, blocks, drlm), _ = E.apply(
            {"params": params["E"], "batch_stats": batch_stats["E"]},
            batch["x"][d],
            True,
            mutable=["batch_stats"],
        )
        pred, _ = D.apply(
            {"params": params["D"], "batch_stats": batch_stats["D"]},
            blocks,
            True,
            mutable=["batch_stats"],
        )
        total = total + losses.depth(pred, batch["depth"][d])
        if d < k - 1:
            total = total + mc.lambda_p * losses.domain_entropy([s["p_logit"] for s in drlm])
        feats.append(feat)

    def m_loss(params_m, feat, y, key):
        (logit, h), _ = M.apply(
            {"params": params_m, "batch_stats": batch_stats["M"]},
            feat,
            True,
            mutable=["batch_stats"],
        )
        prior = jax.random.normal(key, h.shape, h.dtype)
        return losses.classification(logit, y) + mc.lambda_m * losses.mmd_to_prior(
            h, prior, mc.mmd_bandwidths
        )

    grads = []
    for i in range(k - 1):
        loss_i, g_i = jax.value_and_grad(m_loss)(params["M"], feats[i], batch["y"][i], keys[i, 0])
        grads.append(g_i)
        g_i = jax.tree.map(lambda g, c: (1 - use_const) * g + use_const * c, g_i, const_grads[i])
        adapted = jax.tree.map(lambda p, g: p - mc.inner_lr * g, params["M"], g_i)
        total = total + loss_i + m_loss(adapted, feats[k - 1], batch["y"][k - 1], keys[i, 1])
    return total, grads


@pytest.fixture(scope="module")
def f64():
    """Float64 setup at α = 0.5 (large, so that the second-order terms are visible).

    α is passed as an array, so one compile serves α = 0.5 and α = 0. Everything here traces
    under the project's random context (runtime.project_random, as meta_step's jit does), so the
    MMD prior samples of the objective, the reference and the step are the same numbers.
    """
    with jax.enable_x64(True), runtime.project_random():
        config = _config(alpha=0.5)
        config.meta.grad_cosine = True
        state = state_lib.init_state(config, jax.random.PRNGKey(0))
        params, stats = _f64(state.params), _f64(state.batch_stats)
        batch = {k: jnp.asarray(v) for k, v in random_meta_batch(config, 0, np.float64).items()}
        key = jax.random.fold_in(state.rng, 0)  # the key meta_step uses at step 0
        objective = meta.make_objective(config)

        @jax.jit
        def value_and_grads(p, alpha):
            value, g2 = jax.value_and_grad(
                lambda q: objective(q, stats, batch, key, True, alpha)[0]
            )(p)
            g1 = jax.grad(lambda q: objective(q, stats, batch, key, False, alpha)[0])(p)
            return value, g2, g1

        value, g2, g1 = value_and_grads(params, 0.5)
        yield dict(
            config=config,
            state=state,
            params=params,
            stats=stats,
            batch=batch,
            key=key,
            value_and_grads=value_and_grads,
            value=value,
            g2=g2,
            g1=g1,
        )


def _dot(a, b):
    return sum(float(jnp.vdot(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _tree_rel(a, b):
    """Largest relative difference over the leaves, each relative to its own scale."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        worst = max(worst, float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-300)))
    return worst


def test_second_order_gradient_matches_central_finite_differences(f64):
    with jax.enable_x64(True):
        params, rng = f64["params"], np.random.default_rng(0)
        eps = 1e-7  # float64: rounding error ~1e-9 relative; larger steps cross ReLU/max-pool kinks
        for module in ("E", "D", "M"):
            # A random direction in one module's parameters, zero elsewhere.
            v = jax.tree.map(jnp.zeros_like, params)
            v[module] = jax.tree.map(
                lambda a: jnp.asarray(rng.standard_normal(a.shape)), params[module]
            )
            plus = jax.tree.map(lambda p, d: p + eps * d, params, v)
            minus = jax.tree.map(lambda p, d: p - eps * d, params, v)
            fd = (
                float(f64["value_and_grads"](plus, 0.5)[0])
                - float(f64["value_and_grads"](minus, 0.5)[0])
            ) / (2 * eps)
            exact = _dot(f64["g2"], v)
            assert abs(exact - fd) / abs(fd) < 1e-5, (module, exact, fd)
            if module in ("E", "M"):
                # The first-order gradient misses the inner step's curvature, and FD sees it.
                assert abs(_dot(f64["g1"], v) - fd) / abs(fd) > 1e-4, module


def test_objective_equals_loop_reference_in_value_and_both_orders(f64):
    with jax.enable_x64(True):
        config, stats, batch, key = f64["config"], f64["stats"], f64["batch"], f64["key"]

        zeros = [jax.tree.map(jnp.zeros_like, f64["params"]["M"])] * (config.meta.num_domains - 1)

        @jax.jit
        def reference(p, const, use_const):
            (value, inner), grad = jax.value_and_grad(
                lambda q: reference_objective(config, q, stats, batch, key, const, use_const),
                has_aux=True,
            )(p)
            return value, grad, inner

        ref_value, ref_g2, inner = reference(f64["params"], zeros, 0.0)
        np.testing.assert_allclose(f64["value"], ref_value, rtol=1e-12)
        assert _tree_rel(f64["g2"], ref_g2) < 1e-10
        # First order = the gradient of the same objective with the inner gradients as constants.
        _, ref_g1, _ = reference(f64["params"], inner, 1.0)
        assert _tree_rel(f64["g1"], ref_g1) < 1e-10
        # …and it differs from the exact gradient when α > 0.
        assert _tree_rel(f64["g1"]["M"], f64["g2"]["M"]) > 1e-3
        assert _tree_rel(f64["g1"]["E"], f64["g2"]["E"]) > 1e-4


def test_orders_agree_when_inner_lr_is_zero(f64):
    with jax.enable_x64(True):
        _, g2, g1 = f64["value_and_grads"](f64["params"], 0.0)
        assert _tree_rel(g1, g2) < 1e-12


def test_step_reports_cosine_between_first_and_second_order_gradients(f64):
    with jax.enable_x64(True):
        # Copies: meta_step donates the state, and the fixture's parameters serve other tests.
        state = _f64(f64["state"]).replace(params=jax.tree.map(jnp.copy, f64["params"]))
        g1, g2 = f64["g1"], f64["g2"]
        expected = _dot(g1, g2) / np.sqrt(_dot(g1, g1) * _dot(g2, g2))
        _, metrics = meta.make_meta_step(f64["config"])(state, f64["batch"], second_order=True)
        np.testing.assert_allclose(metrics["grad_cosine_first_second"], expected, rtol=1e-9)
        assert expected < 1 - 1e-6  # α = 0.5: the two orders point in different directions


def test_adversarial_entropy_head_changes_only_the_wp_gradient(f64):
    """model.entropy_head='adversarial': ∇J equals the paper objective's gradient (checked above
    against the loop reference; first order, which compiles faster and holds the same terms) on
    every parameter but W_p, whose gradient is λ_p ∇ of the head's cross-entropy on the
    meta-train batches, by hand here: E's L_p gradient is unchanged (W_p only held fixed) and the
    cross-entropy reaches no F⁻."""
    with jax.enable_x64(True):
        config = f64["config"].copy_and_resolve_references()
        config.model.entropy_head = "adversarial"
        params, stats, batch, key = f64["params"], f64["stats"], f64["batch"], f64["key"]
        objective = meta.make_objective(config)
        g_adv = jax.jit(jax.grad(lambda q: objective(q, stats, batch, key, False, 0.5)[0]))(params)
        flat_adv = dict(jax.tree_util.tree_flatten_with_path(g_adv)[0])
        for path, value in jax.tree_util.tree_flatten_with_path(f64["g1"])[0]:
            if all(getattr(p, "key", None) != "Wp" for p in path):
                assert _tree_rel(flat_adv[path], value) < 1e-10, path

        E = models.build_modules(config.model)[0]
        k, b = batch["x"].shape[:2]
        x = batch["x"].reshape(k * b, *batch["x"].shape[2:])
        drlm = jax.jit(lambda v: E.apply(v, x, True, groups=k, mutable=["batch_stats"])[0][2])(
            {"params": params["E"], "batch_stats": stats["E"]})
        for j, s in enumerate(drlm):
            pooled = s["mean"].reshape(k, b, -1)  # pool(F⁻) = μ(F⁻) (Eq. 2)

            def head_loss(wp, pooled=pooled):
                logits = (pooled @ wp["kernel"] + wp["bias"])[..., 0]
                return config.meta.lambda_p * sum(
                    losses.classification(logits[i], batch["y"][i]) for i in range(k - 1))

            expected = jax.grad(head_loss)(params["E"][f"DRLM_{j}"]["Wp"])
            assert _tree_rel(g_adv["E"][f"DRLM_{j}"]["Wp"], expected) < 1e-10, j
            assert _tree_rel(f64["g1"]["E"][f"DRLM_{j}"]["Wp"], expected) > 1e-2, j
