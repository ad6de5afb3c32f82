"""D²AM's loss terms as pure functions of arrays: L_cls (Eq. 8), L_MMD (Eq. 9), L_dep (Eq. 10),
L_p (Eq. 7) and the adversarial entropy head's cross-entropy.

Each returns a scalar mean over the batch (the paper writes sums; means keep α and β independent of
the batch size).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax


def classification(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """L_cls, Eq. 8: binary cross-entropy with logits; label 1 = live."""
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))


def _pairwise_sq_dists(a: jax.Array, b: jax.Array) -> jax.Array:
    sq = jnp.sum(a * a, -1)[:, None] + jnp.sum(b * b, -1)[None, :] - 2.0 * a @ b.T
    return jnp.maximum(sq, 0.0)


def mmd_to_prior(h: jax.Array, prior_samples: jax.Array, bandwidths: Sequence[float]) -> jax.Array:
    """L_MMD, Eq. 9: biased MMD² between the batch's h and samples of the prior N(0, I).

    Kernel: Σ_s exp(−‖x − y‖² / (2 (s·√d)²)), so each bandwidth s is in units of the typical
    distance scale √d of d-dimensional unit-variance vectors.
    """
    if h.shape != prior_samples.shape:
        raise ValueError(
            f"mmd_to_prior: h {h.shape} and prior samples {prior_samples.shape} differ"
        )
    d = h.shape[-1]
    both = jnp.concatenate([h, prior_samples], axis=0)
    sq = _pairwise_sq_dists(both, both)
    kernel = sum(jnp.exp(-sq / (2.0 * (s * s) * d)) for s in bandwidths)
    b = h.shape[0]
    return jnp.mean(kernel[:b, :b]) + jnp.mean(kernel[b:, b:]) - 2.0 * jnp.mean(kernel[:b, b:])


def depth(pred: jax.Array, target: jax.Array) -> jax.Array:
    """L_dep, Eq. 10: squared error to the depth map (live) or zeros (spoof), mean per pixel."""
    return jnp.mean(jnp.square(pred - target))


def domain_entropy(p_logits: Sequence[jax.Array]) -> jax.Array:
    """L_p, Eq. 7, summed over the DRLMs: mean of P log P + (1 − P) log(1 − P), P = σ(logit).

    The paper's shorthand "P log P" taken literally is minimised at P = 1/e; its text says the loss
    holds P "around 0.5" for live and spoof alike, which is the negative binary entropy used here.
    """
    total = 0.0
    for logit in p_logits:
        log_p, log_q = jax.nn.log_sigmoid(logit), jax.nn.log_sigmoid(-logit)
        total = total + jnp.mean(jnp.exp(log_p) * log_p + jnp.exp(log_q) * log_q)
    return total


def entropy_head_bce(head_logits: Sequence[jax.Array], labels: jax.Array) -> jax.Array:
    """model.entropy_head='adversarial': W_p's own loss, summed over the DRLMs — binary
    cross-entropy of W_p pool(F⁻) against liveness (label 1 = live), F⁻ held fixed by the DRLM."""
    total = 0.0
    for logit in head_logits:
        total = total + classification(logit, labels)
    return total


def drlm_terms(drlm: Sequence[dict], labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(L_p, the head's cross-entropy) of one batch's DRLM outputs; the latter is 0 under
    model.entropy_head='paper' (no 'head_logit'). Both enter the total as λ_p · (L_p + head)."""
    l_p = domain_entropy([s["p_logit"] for s in drlm])
    if "head_logit" not in drlm[0]:
        return l_p, jnp.zeros_like(l_p)
    return l_p, entropy_head_bce([s["head_logit"] for s in drlm], labels)


def drlm_metrics(drlm: Sequence[dict]) -> dict[str, jax.Array]:
    """Per DRLM j = 1..3: mean |P − ½| over the batch and ‖W_p‖ — whether L_p (Eq. 7) still has a
    P away from ½ to press on, and whether it got there by shrinking W_p (logged every step)."""
    out = {}
    for j, s in enumerate(drlm, start=1):
        out[f"drlm/p_margin_{j}"] = jnp.mean(jnp.abs(jax.nn.sigmoid(s["p_logit"]) - 0.5))
        out[f"drlm/wp_norm_{j}"] = s["wp_norm"]
    return out
