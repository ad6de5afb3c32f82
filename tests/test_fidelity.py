"""Where the implementation follows the paper's letter or its closest code (issue 15): epoch 1's
joint clusters, degenerate pseudo domains, the entropy head's two readings, the depth head."""

import logging
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import tiny_config
from test_domains import blobs

from d2am_jax import domains, erm, losses, models, train
from d2am_jax import state as state_lib

# ----------------------------------------------------------------------------- epoch 1 (Alg. 1)


def _train_set(live, domain):
    return types.SimpleNamespace(labels=live.astype(np.int32), domain=domain, frames=None)


class _Bank:
    def __init__(self, bank):
        self.bank = bank

    def get(self):
        return self.bank


def test_epoch_one_trains_on_the_joint_clusters_when_each_holds_both_classes():
    bank, live, domain = blobs(seed=1, noise=2.5)
    config = tiny_config()
    labels, record = train.epoch_domains(config, 0, 3, None, None, _train_set(live, domain),
                                         None, _Bank(bank))
    assert record["mode"] == "initial" and record["alignment"] == "joint"
    assert record["pairing_weak"] is False and record["degenerate_domains"] == []
    joint = domains.initial_assignment(bank, 3, seed=0, is_live=live, per_class=False,
                                       n_init=config.domains.n_init)
    np.testing.assert_array_equal(labels, joint.labels)


def test_a_domain_with_one_spoof_image_is_reported_against_half_a_domain_batch(caplog):
    live = np.array([1, 0] * 8 + [1, 1, 1, 0], bool)
    domain = np.array(["a"] * 8 + ["b"] * 8 + ["c"] * 4)
    config = tiny_config(per_domain_batch=4)
    config.domain_labels = "true"
    with caplog.at_level(logging.WARNING, logger="d2am_jax.domains"):
        _, record = train.epoch_domains(config, 0, 3, None, None, _train_set(live, domain), None,
                                        None)
    assert record["min_class_size"] == 2  # domains.min_class_size = 0: half of 4
    assert record["degenerate_domains"] == [{"domain": 2, "live": 3, "spoof": 1}]
    assert any("pseudo domain 2" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- entropy head


def _wp_norm_after_training(head, steps=200):
    """‖W_p‖ before and after Adam on one DRLM's parameters (W1, W2, W_p) with λ_p-free
    L_p + head cross-entropy (losses.drlm_terms, what meta.py and erm.py add), on feature maps
    whose first two channels carry liveness."""
    rng = np.random.default_rng(0)
    y = (np.arange(32) % 2).astype(np.float32)
    f = rng.random((32, 4, 4, 8)).astype(np.float32)
    f[..., :2] += y[:, None, None, None]
    f, y = jnp.asarray(f), jnp.asarray(y)
    drlm = models.DRLM(reduction=4, entropy_head=head)
    params = drlm.init(jax.random.PRNGKey(0), f)["params"]
    tx = optax.adam(0.02)

    def loss(p):
        return sum(losses.drlm_terms([drlm.apply({"params": p}, f)[1]], y))

    def step(carry, _):
        p, opt = carry
        updates, opt = tx.update(jax.grad(loss)(p), opt)
        return (optax.apply_updates(p, updates), opt), None

    trained, _ = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), None, steps)[0])(
        params)
    norm = lambda p: float(jnp.linalg.norm(p["Wp"]["kernel"]))  # noqa: E731
    return norm(params), norm(trained)


def test_paper_head_shrinks_wp_and_adversarial_head_does_not():
    initial, paper = _wp_norm_after_training("paper")
    same, adversarial = _wp_norm_after_training("adversarial")
    assert same == initial
    # L_p's only pull on W_p is toward 0 (P → ½ whatever F⁻ holds) ...
    assert paper < 0.75 * initial, (initial, paper)
    # ... while the adversarial W_p learns to read liveness from F⁻.
    assert adversarial > 2 * initial, (initial, adversarial)


def test_erm_loss_carries_the_entropy_head_and_drlm_diagnostics():
    """The ERM baseline adds the same head term (traced only: shapes, no compile)."""
    config = tiny_config()
    config.model.entropy_head = "adversarial"
    params = jax.eval_shape(lambda: state_lib.init_state(config, jax.random.PRNGKey(0)))
    n, r = 8, config.data.resolution
    batch = {"x": jnp.zeros((n, r, r, 6)), "y": jnp.zeros(n), "depth": jnp.zeros((n, 4, 4))}
    _, (_, metrics) = jax.eval_shape(erm.make_loss(config), params.params, params.batch_stats,
                                     batch, jax.random.PRNGKey(0))
    assert {"loss/entropy_head", "drlm/p_margin_3", "drlm/wp_norm_3"} <= set(metrics)


# ----------------------------------------------------------------------------- meta.batch_norm


def test_meta_batch_norm_pooled_normalises_e_over_all_k_domain_batches():
    """meta.batch_norm='pooled' gives E's BatchNorm the moments of all K·B images (as ERM's one
    batch), 'per_domain' those of each domain batch; with domain batches of different brightness
    the two differ, and each equals E run by hand on the flat batch with groups=1 or K."""
    from conftest import random_meta_batch

    from d2am_jax import meta

    config = tiny_config()
    batch = random_meta_batch(config)
    batch["x"][0] += 0.5          # domain batch 0 brighter: between-domain variance
    k, b, r = batch["x"].shape[:3]
    st = state_lib.init_state(config, jax.random.PRNGKey(0))
    E, _, _ = models.build_modules(config.model)
    flat = models.model_input(jnp.asarray(batch["x"]).reshape(k * b, r, r, 6))
    first = lambda s: s["E"]["ConvBNReLU_0"]["BatchNorm_0"]["var"]  # noqa: E731
    got = {}
    for mode, groups in (("per_domain", k), ("pooled", 1)):
        config.meta.batch_norm = mode
        _, (new_stats, _) = meta.make_objective(config)(
            st.params, st.batch_stats, batch, jax.random.PRNGKey(1), True)
        _, by_hand = E.apply({"params": st.params["E"], "batch_stats": st.batch_stats["E"]},
                             flat, True, groups=groups, mutable=["batch_stats"])
        np.testing.assert_allclose(first(new_stats), first({"E": by_hand["batch_stats"]}),
                                   rtol=1e-5)
        got[mode] = np.asarray(first(new_stats))
    # Pooled variance = mean within-domain variance + between-domain variance.
    assert np.all(got["pooled"] >= got["per_domain"] - 1e-6)
    assert np.mean(got["pooled"] - got["per_domain"]) > 1e-4, got


def test_meta_batch_norm_misspelled_is_an_error_naming_the_field():
    import pytest

    from d2am_jax import config_check

    config = tiny_config()
    config.meta.batch_norm = "pooled_over_domains"
    with pytest.raises(ValueError, match="meta.batch_norm"):
        config_check.check(config)
