"""XLA's memory analysis of the paper-scale meta-step, with and without rematerialising E
(`model.remat_policy`): compiled, never run, so it works on any backend.

  python experiments/bench/memory.py [--resolution 256] [--width 1.0] [--batches 8,32]
      [--policies ,nothing_saveable] [--fast-conv-grad False]

Prints one JSON line per (per-domain batch, order, policy): argument, output, temporary and
generated-code bytes as XLA reports them for this backend.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from d2am_jax import meta
from d2am_jax import state as state_lib
from d2am_jax.configs import default
from d2am_jax.data.dataset import depth_size


def analysis(resolution, width, b, order, policy, fast) -> dict:
    config = default.get_config()
    config.data.resolution, config.model.width = resolution, width
    config.meta.per_domain_batch, config.model.remat_policy = b, policy
    config.model.fast_conv_grad = fast
    k, g = config.meta.num_domains, depth_size(resolution)
    state = jax.eval_shape(lambda: state_lib.init_state(config, jax.random.PRNGKey(0)))
    batch = {"x": jax.ShapeDtypeStruct((k, b, resolution, resolution, 3), np.uint8),
             "y": jax.ShapeDtypeStruct((k, b), np.float32),
             "depth": jax.ShapeDtypeStruct((k, b, g, g), np.uint8)}
    t0 = time.perf_counter()
    compiled = meta.make_meta_step(config).jitted.lower(
        state, batch, second_order=order == "second").compile()
    m = compiled.memory_analysis()
    gib = lambda n: round(n / 2**30, 3)
    return {"bench": "meta-step memory analysis", "backend": jax.default_backend(),
            "resolution": resolution, "width": width, "per_domain_batch": b, "K": k,
            "order": order, "remat_policy": policy or "none", "fast_conv_grad": fast,
            "argument_gib": gib(m.argument_size_in_bytes),
            "output_gib": gib(m.output_size_in_bytes),
            "temp_gib": gib(m.temp_size_in_bytes),
            "code_gib": gib(m.generated_code_size_in_bytes),
            "compile_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batches", default="8,32")
    p.add_argument("--orders", default="second,first")
    p.add_argument("--policies", default=",nothing_saveable")
    p.add_argument("--fast-conv-grad", default="False",
                   help="the path measured: False = XLA's convolutions (what 'auto' runs on GPU)")
    args = p.parse_args()
    fast = {"true": True, "false": False}.get(args.fast_conv_grad.lower(), args.fast_conv_grad)
    for b in (int(v) for v in args.batches.split(",")):
        for order in args.orders.split(","):
            for policy in args.policies.split(","):
                print(json.dumps(analysis(args.resolution, args.width, b, order, policy, fast)),
                      flush=True)


if __name__ == "__main__":
    main()
