"""Benchmark of the jitted D²AM meta-step (not a test): images/s, step time, compile time, memory.

    python experiments/bench/meta_step.py --resolution 64 --per-domain-batch 32 --width 1.0 \
        --order second

Prints one JSON line. Compile time is excluded from step times; the step time is the median of
--steps timed steps after --warmup untimed ones. The step runs as train.py runs it: compiled once,
then the compiler's freed heap given back (`runtime.release_host_memory`).
"""

import argparse
import json
import platform
import resource
import statistics
import time

import jax
import numpy as np

from d2am_jax import meta, runtime
from d2am_jax import state as state_lib
from d2am_jax.configs import default
from d2am_jax.data.dataset import depth_size


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--per-domain-batch", type=int, default=32)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--num-domains", type=int, default=3)
    p.add_argument("--order", choices=("first", "second"), default="second")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--grad-cosine", action="store_true")
    p.add_argument("--xla-conv-grad", action="store_true", help="use XLA's own conv gradients in E")
    return p.parse_args()


def matmul_gflop_s() -> float:
    """This machine's float32 GEMM rate right now (4096², jax): the yardstick for achieved
    FLOP/s."""
    a = jax.numpy.ones((4096, 4096), jax.numpy.float32)
    f = jax.jit(jax.numpy.dot)
    jax.block_until_ready(f(a, a))
    times = []
    for _ in range(3):
        t = time.perf_counter()
        jax.block_until_ready(f(a, a))
        times.append(time.perf_counter() - t)
    return 2 * 4096**3 / min(times) / 1e9


def step_flops(config, state, data, second: bool) -> float:
    """FLOPs of one step from XLA's analysis of the same step with XLA's own conv gradients.

    (The fast variant's kernel gradient is a scan, whose body XLA's cost analysis counts once.)
    Lowered, never compiled or run.
    """
    plain = config.copy_and_resolve_references()
    plain.model.fast_conv_grad = False
    lowered = meta.make_meta_step(plain).jitted.lower(state, data, second_order=second)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def main():
    args = parse_args()
    peak = matmul_gflop_s()
    config = default.get_config()
    config.data.resolution = args.resolution
    config.model.width = args.width
    config.model.fast_conv_grad = not args.xla_conv_grad
    config.meta.num_domains = args.num_domains
    config.meta.per_domain_batch = args.per_domain_batch
    config.meta.grad_cosine = args.grad_cosine
    k, b, r = args.num_domains, args.per_domain_batch, args.resolution
    g = depth_size(r)
    rng = np.random.default_rng(0)

    def batch():
        y = np.tile(np.r_[np.ones(b // 2), np.zeros(b - b // 2)], (k, 1)).astype(np.float32)
        return {
            "x": jax.device_put(rng.random((k, b, r, r, 6), dtype=np.float32)),
            "y": jax.device_put(y),
            "depth": jax.device_put(
                rng.random((k, b, g, g), dtype=np.float32) * y[:, :, None, None]
            ),
        }

    second = args.order == "second"
    state = state_lib.init_state(config, jax.random.PRNGKey(0))
    step = meta.make_meta_step(config)
    data = batch()
    flops = step_flops(config, state, data, second)
    t0 = time.perf_counter()
    compiled = step.jitted.lower(state, data, second_order=second).compile()
    compile_s = time.perf_counter() - t0
    runtime.release_host_memory()  # as train.py does after compiling

    times = []
    for i in range(args.warmup + args.steps):
        data = batch()
        jax.block_until_ready(data)
        t = time.perf_counter()
        state, metrics = compiled(state, data)
        jax.block_until_ready(metrics)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    images = k * b
    print(
        json.dumps(
            {
                "images_per_s": round(images / step_s, 3),
                "step_s": round(step_s, 4),
                "step_s_all": [round(t, 4) for t in times],
                "compile_s": round(compile_s, 2),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "xla_flops_per_step": flops,
                "achieved_tflop_s": round(flops / step_s / 1e12, 4),
                "matmul_gflop_s": round(peak, 1),
                "fraction_of_matmul_peak": round(flops / step_s / 1e9 / peak, 3),
                "order": args.order,
                "resolution": r,
                "per_domain_batch": b,
                "num_domains": k,
                "width": args.width,
                "fast_conv_grad": config.model.fast_conv_grad,
                "loss": float(metrics["loss/total"]),
                "device": jax.devices()[0].device_kind,
                "jax": jax.__version__,
                "machine": platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
