"""The prepared accelerator check: the paper-scale meta-step on one device, one JSON line per
measurement, within a time budget (the GPU run of `experiments/bench/accelerator.sh`).

  python experiments/bench/accelerator.py [--resolution 256] [--width 1.0] [--budget-s 420]

Measures, most important first, until --budget-s is spent: per-domain batch 8 and 32 (K = 3),
second and first order, float32 and bfloat16 with `model.fast_conv_grad='auto'`, then float32
with the CPU-tuned ops forced on. Each line: images/s, median step time, compile time, peak
device memory, XLA's FLOP count of the step, achieved TFLOP/s and the fraction of the chip's dense
peak for that dtype (table below; 'unknown' elsewhere). `--resolution 32 --width 0.125` rehearses
the same code on a CPU in a minute.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

from d2am_jax import meta
from d2am_jax import state as state_lib
from d2am_jax.configs import default
from d2am_jax.data.dataset import depth_size

# Dense peak TFLOP/s by device kind (vendor data sheets; tensor cores, no sparsity).
PEAK_TFLOPS = {
    "NVIDIA H200": {"bfloat16": 989.0, "float32": 494.0},   # float32 as TF32 on tensor cores
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989.0, "float32": 494.0},
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312.0, "float32": 156.0},
    "NVIDIA A100-SXM4-40GB": {"bfloat16": 312.0, "float32": 156.0},
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},
}


def plan(b_values=(8, 32)):
    """(per-domain batch, order, dtype, fast_conv_grad) in the order they are measured."""
    runs = [(b, order, dtype, "auto") for dtype in ("bfloat16", "float32")
            for b in b_values[::-1] for order in ("second", "first")]
    runs += [(b_values[-1], order, "float32", True) for order in ("second", "first")]
    return runs


def measure(resolution: int, width: float, b: int, order: str, dtype: str, fast,
            steps: int, warmup: int) -> dict:
    config = default.get_config()
    config.data.resolution, config.model.width = resolution, width
    config.meta.per_domain_batch, config.model.dtype = b, dtype
    config.model.fast_conv_grad = fast
    k, r, g = config.meta.num_domains, resolution, depth_size(resolution)
    rng = np.random.default_rng(0)
    y = np.tile(np.r_[np.ones(b // 2), np.zeros(b // 2)], (k, 1)).astype(np.float32)

    def batch():  # what crosses to the device in a run: uint8 frames and depth targets
        return jax.device_put({
            "x": rng.integers(0, 256, (k, b, r, r, 3), dtype=np.uint8), "y": y,
            "depth": (rng.integers(0, 256, (k, b, g, g)) * y[..., None, None]).astype(np.uint8)})

    second = order == "second"
    state = state_lib.init_state(config, jax.random.PRNGKey(0))
    step = meta.make_meta_step(config)
    data = batch()
    t0 = time.perf_counter()
    lowered = step.jitted.lower(state, data, second_order=second)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", float("nan")))
    times = []
    for i in range(warmup + steps):
        data = batch()
        jax.block_until_ready(data)
        t = time.perf_counter()
        state, metrics = compiled(state, data)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    peak = PEAK_TFLOPS.get(device.device_kind, {}).get(dtype)
    achieved = flops / step_s / 1e12
    return {
        "bench": "accelerator meta-step", "device": device.device_kind,
        "resolution": r, "width": width, "per_domain_batch": b, "K": k, "order": order,
        "dtype": dtype, "fast_conv_grad": fast, "images_per_s": round(k * b / step_s, 2),
        "step_s": round(step_s, 4), "compile_s": round(compile_s, 1),
        "peak_device_memory_gib": (round(stats["peak_bytes_in_use"] / 2**30, 2)
                                   if "peak_bytes_in_use" in stats else None),  # CPU: none
        "xla_flops_per_step": flops, "achieved_tflop_s": round(achieved, 2),
        "fraction_of_peak": round(achieved / peak, 3) if peak else "unknown",
        "loss": float(metrics["loss/total"]), "jax": jax.__version__,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=420.0)
    args = p.parse_args()
    start = time.perf_counter()
    for b, order, dtype, fast in plan():
        if time.perf_counter() - start > args.budget_s:
            print(json.dumps({"skipped": [b, order, dtype, fast], "reason": "time budget"}))
            continue
        try:
            print(json.dumps(measure(args.resolution, args.width, b, order, dtype, fast,
                                     args.steps, args.warmup)), flush=True)
        except Exception as err:  # noqa: BLE001 - one failed measurement must not end the check
            print(json.dumps({"failed": [b, order, dtype, fast], "error": repr(err)[:500]}),
                  flush=True)


if __name__ == "__main__":
    main()
