"""Seconds to trace and to XLA-compile the gradient of a tiny meta-objective (the test suite's
size: 16×16, width 1/16, K = 3 domain batches of 4), under whatever XLA_FLAGS the process has.

Prints one JSON line. The test suite is compile-bound: this measures its XLA flags
(tests/conftest.py):
  XLA_FLAGS="--xla_backend_optimization_level=0" python experiments/bench/compile_time.py
  XLA_FLAGS="--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false" \\
      python experiments/bench/compile_time.py [--order first] [--xla_convolutions]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from d2am_jax import meta, runtime
from d2am_jax import state as state_lib
from d2am_jax.configs import default
from d2am_jax.data.dataset import depth_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--order", choices=("second", "first"), default="second")
    parser.add_argument("--xla_convolutions", action="store_true",
                        help="model.fast_conv_grad=False (XLA's own convolutions)")
    args = parser.parse_args()
    config = default.get_config()
    config.data.resolution, config.model.width, config.model.adaptation_dim = 16, 0.0625, 4
    config.model.drlm_reduction, config.meta.num_domains, config.meta.per_domain_batch = 4, 3, 4
    config.model.fast_conv_grad = not args.xla_convolutions
    k, b, r = 3, 4, 16
    g = depth_size(r)
    rng = np.random.default_rng(0)
    y = np.tile(np.r_[np.ones(b // 2), np.zeros(b // 2)], (k, 1)).astype(np.float32)
    batch = {"x": rng.random((k, b, r, r, 6)).astype(np.float32), "y": y,
             "depth": (rng.random((k, b, g, g)) * y[..., None, None]).astype(np.float32)}
    with runtime.project_random():
        state = state_lib.init_state(config, jax.random.PRNGKey(0))
        objective = meta.make_objective(config)
        fn = jax.jit(jax.value_and_grad(
            lambda p: objective(p, state.batch_stats, batch, jax.random.PRNGKey(1),
                                args.order == "second"), has_aux=True),
            compiler_options=runtime.training_compiler_options(False))
        t0 = time.perf_counter()
        lowered = fn.lower(state.params)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
    print(json.dumps({"order": args.order, "fast_conv_grad": not args.xla_convolutions,
                      "trace_lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
                      "hlo_lines": lowered.as_text().count("\n"),
                      "xla_flags": os.environ.get("XLA_FLAGS", "")}))


if __name__ == "__main__":
    main()
