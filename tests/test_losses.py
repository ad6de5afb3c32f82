"""Loss terms against hand-computed values and their defining properties."""

import jax
import jax.numpy as jnp
import numpy as np

from d2am_jax import losses


def test_classification_matches_bce_formula():
    logits = jnp.array([2.0, -1.0, 0.5, -3.0])
    y = jnp.array([1.0, 0.0, 0.0, 1.0])
    p = 1 / (1 + np.exp(-np.asarray(logits)))
    expected = -np.mean(np.asarray(y) * np.log(p) + (1 - np.asarray(y)) * np.log(1 - p))
    np.testing.assert_allclose(losses.classification(logits, y), expected, rtol=1e-6)


def test_mmd_hand_computed_one_dimensional_case():
    # h = {0, 1}, prior = {0, 2}, d = 1, one bandwidth s = 1: k(a, b) = exp(-(a-b)²/2).
    h = jnp.array([[0.0], [1.0]])
    prior = jnp.array([[0.0], [2.0]])
    k = lambda a, b: np.exp(-((a - b) ** 2) / 2)
    kxx = (k(0, 0) + k(0, 1) + k(1, 0) + k(1, 1)) / 4
    kyy = (k(0, 0) + k(0, 2) + k(2, 0) + k(2, 2)) / 4
    kxy = (k(0, 0) + k(0, 2) + k(1, 0) + k(1, 2)) / 4
    np.testing.assert_allclose(
        losses.mmd_to_prior(h, prior, (1.0,)), kxx + kyy - 2 * kxy, rtol=1e-6
    )


def test_mmd_zero_for_identical_samples_and_larger_for_shifted():
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 8))
    assert abs(float(losses.mmd_to_prior(x, x, (0.5, 1.0, 2.0)))) < 1e-6
    near = losses.mmd_to_prior(x + 0.1, x, (0.5, 1.0, 2.0))
    far = losses.mmd_to_prior(x + 2.0, x, (0.5, 1.0, 2.0))
    assert 0 < near < far


def test_depth_is_mean_squared_error():
    pred, target = jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.zeros((2, 2))
    np.testing.assert_allclose(losses.depth(pred, target), (1 + 4 + 9 + 16) / 4)


def test_domain_entropy_is_negative_binary_entropy_minimised_at_half():
    logits = jnp.linspace(-4, 4, 81)
    values = jax.vmap(lambda z: losses.domain_entropy([z[None]]))(logits)
    assert abs(float(logits[jnp.argmin(values)])) < 1e-6
    np.testing.assert_allclose(values[40], -np.log(2), rtol=1e-6)
    # Three DRLMs add up.
    np.testing.assert_allclose(losses.domain_entropy([jnp.zeros(3)] * 3), -3 * np.log(2), rtol=1e-6)
