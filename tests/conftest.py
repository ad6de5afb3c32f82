"""Shared test configuration: tiny D²AM configs that run in seconds on 2 CPU cores."""

import os

# Tests run tiny models whose XLA:CPU compile time dwarfs their run time: skip LLVM's backend
# optimisations (about 2× faster compiles), and emit fusions with XLA:CPU's elemental emitter
# rather than its newer fusion emitters (a tiny second-order meta-step compiles in 4.9 s instead
# of 9.2 s, BENCHMARKS.md); the maths is unchanged. Set before jax initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                      "--xla_cpu_use_fusion_emitters=false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from d2am_jax.configs import default  # noqa: E402


def tiny_config(resolution=32, width=0.0625, adaptation_dim=8, num_domains=3, per_domain_batch=4):
    config = default.get_config()
    config.data.resolution = resolution
    config.model.width = width
    config.model.adaptation_dim = adaptation_dim
    config.model.drlm_reduction = 4
    config.meta.num_domains = num_domains
    config.meta.per_domain_batch = per_domain_batch
    return config


def random_meta_batch(config, seed=0, dtype=np.float32):
    """A meta-batch of the config's shape: [K, B, ...], half live, half spoof per domain."""
    from d2am_jax.data.dataset import depth_size

    rng = np.random.default_rng(seed)
    k, b, r = config.meta.num_domains, config.meta.per_domain_batch, config.data.resolution
    g = depth_size(r)
    y = np.tile(np.r_[np.ones(b // 2), np.zeros(b - b // 2)], (k, 1))
    depth = rng.random((k, b, g, g)) * y[:, :, None, None]
    return {
        "x": rng.random((k, b, r, r, 6)).astype(dtype),
        "y": y.astype(dtype),
        "depth": depth.astype(dtype),
    }


@pytest.fixture
def tiny():
    return tiny_config()
