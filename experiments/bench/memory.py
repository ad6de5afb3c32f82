"""XLA's memory analysis of the paper-scale meta-step, with and without rematerialising E
(`model.remat`: none, all of E at once, block by block; `model.remat_policy`): compiled, never
run, so it works on any backend.

  python experiments/bench/memory.py [--resolution 256] [--width 1.0] [--batches 8,32]
      [--orders second,first] [--remat none,encoder,blocks] [--policy nothing_saveable]
      [--fast-conv-grad False] [--part step]

Prints one JSON line per (per-domain batch, order, remat): argument, output, temporary and
generated-code bytes as XLA reports them for this backend, and the number of convolutions in
the optimised program (rematerialisation shows as E's forward convolutions run again).
`--part encoder` compiles E's training forward and backward alone (the gradient of the sum of
its outputs over the K·B images, no D, no M, no optimizer): where the step's peak lies.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from d2am_jax import meta, models, runtime
from d2am_jax import state as state_lib
from d2am_jax.configs import default
from d2am_jax.data.dataset import depth_size


def _encoder_only(config, state, batch):
    """E's training forward and backward alone, as meta.py runs them (one flat batch of K·B
    images, BatchNorm per domain batch), under the training steps' compiler options."""
    E = models.build_modules(config.model)[0]
    k = batch["x"].shape[0]

    def loss(params, batch_stats, x):
        x = models.model_input(x.reshape(-1, *x.shape[2:]))
        forward = models.rematerialized(
            lambda v, x: E.apply(v, x, True, groups=k, mutable=["batch_stats"]), config.model)
        (_, blocks, drlm), _ = forward({"params": params, "batch_stats": batch_stats}, x)
        return sum(jnp.sum(f) for f in blocks) + sum(jnp.sum(s["p_logit"]) for s in drlm)

    remat = models.remat_setting(config.model)[0] != "none"
    fn = jax.jit(jax.grad(loss), compiler_options=runtime.training_compiler_options(remat))
    return fn.lower(state.params["E"], state.batch_stats["E"], batch["x"])


def analysis(resolution, width, b, order, remat, policy, fast, part="step") -> dict:
    config = default.get_config()
    config.data.resolution, config.model.width = resolution, width
    config.meta.per_domain_batch = b
    config.model.remat, config.model.remat_policy = remat, "" if remat == "none" else policy
    config.model.fast_conv_grad = fast
    k, g = config.meta.num_domains, depth_size(resolution)
    state = jax.eval_shape(lambda: state_lib.init_state(config, jax.random.PRNGKey(0)))
    batch = {"x": jax.ShapeDtypeStruct((k, b, resolution, resolution, 3), np.uint8),
             "y": jax.ShapeDtypeStruct((k, b), np.float32),
             "depth": jax.ShapeDtypeStruct((k, b, g, g), np.uint8)}
    t0 = time.perf_counter()
    if part == "encoder":
        lowered, order = _encoder_only(config, state, batch), "-"
    else:
        lowered = meta.make_meta_step(config).jitted.lower(
            state, batch, second_order=order == "second")
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    convolutions = sum(" convolution(" in line for line in compiled.as_text().splitlines())
    gib = lambda n: round(n / 2**30, 3)
    return {"bench": "meta-step memory analysis", "part": part, "backend": jax.default_backend(),
            "resolution": resolution, "width": width, "per_domain_batch": b, "K": k,
            "order": order, "remat": remat, "remat_policy": config.model.remat_policy,
            "fast_conv_grad": fast,
            "argument_gib": gib(m.argument_size_in_bytes),
            "output_gib": gib(m.output_size_in_bytes),
            "temp_gib": gib(m.temp_size_in_bytes),
            "code_gib": gib(m.generated_code_size_in_bytes),
            "convolutions": convolutions,
            "compile_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batches", default="8,32")
    p.add_argument("--orders", default="second,first")
    p.add_argument("--remat", default="none,encoder,blocks", help="model.remat values")
    p.add_argument("--policy", default="nothing_saveable", help="model.remat_policy")
    p.add_argument("--part", default="step", choices=("step", "encoder"))
    p.add_argument("--fast-conv-grad", default="False",
                   help="the path measured: False = XLA's convolutions (what 'auto' runs on GPU)")
    args = p.parse_args()
    fast = {"true": True, "false": False}.get(args.fast_conv_grad.lower(), args.fast_conv_grad)
    orders = ["-"] if args.part == "encoder" else args.orders.split(",")
    for b in (int(v) for v in args.batches.split(",")):
        for order in orders:
            for remat in args.remat.split(","):
                print(json.dumps(analysis(args.resolution, args.width, b, order, remat,
                                          args.policy, fast, args.part)), flush=True)


if __name__ == "__main__":
    main()
