"""Images/s of the stats pass (jitted eval-mode forward of E, DRLM statistics back to the host).

Prints one JSON line; with --compare_meta_step also the meta-step's images/s on the same network
and their ratio (issue 4 asks for ≥ 3×), measured in the same process under the same load.
  python experiments/bench/stats_pass.py [--resolution 64] [--width 1.0] [--batch 96]
      [--batches 4] [--micro_batch N] [--compare_meta_step]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from d2am_jax import meta, models, stats
from d2am_jax import state as state_lib
from d2am_jax.configs import default
from d2am_jax.data.dataset import depth_size


def random_tree(shapes, rng: np.random.Generator):
    """Values for a tree of shapes, drawn with numpy (throughput does not depend on them, and
    compiling jax's RNG costs seconds per shape here): He-scaled kernels, BatchNorm scales near 1,
    running means near 0 and variances in [0.5, 2] (non-trivial evaluation-mode BN), zeros else."""
    def value(path, leaf):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        noise = lambda: rng.standard_normal(leaf.shape).astype(leaf.dtype)
        if "batch_stats" in keys:
            if keys[-1] == "mean":
                return 0.2 * noise()
            return rng.uniform(0.5, 2.0, leaf.shape).astype(leaf.dtype)
        if "params" in keys and "opt_state" not in keys:
            if len(leaf.shape) > 1:
                return noise() * np.sqrt(2.0 / np.prod(leaf.shape[:-1])).astype(leaf.dtype)
            return 1.0 + 0.1 * noise() if keys[-1] == "scale" else 0.1 * noise()
        return np.zeros(leaf.shape, leaf.dtype)
    return jax.tree_util.tree_map_with_path(value, shapes)


def variables_of_e(config, rng):
    E, _, _ = models.build_modules(config.model)
    r = config.data.resolution
    shapes = jax.eval_shape(lambda x: E.init(jax.random.key(0), x, True), jnp.zeros((1, r, r, 6)))
    tree = random_tree({"params": shapes["params"], "batch_stats": shapes["batch_stats"]}, rng)
    return jax.device_put((tree["params"], tree["batch_stats"]))


def stats_pass_numbers(config, args, rng) -> dict:
    params, batch_stats = variables_of_e(config, rng)
    n = args.batch * args.batches
    # Random frames: the pass's cost does not depend on pixel values.
    frames = rng.integers(0, 256, (n, args.resolution, args.resolution, 3), dtype=np.uint8)
    stats_pass = stats.make_stats_pass(config, args.batch, args.micro_batch)
    x = jnp.zeros((args.batch, args.resolution, args.resolution, 6), jnp.float32)
    start = time.perf_counter()
    stats_pass.jitted.lower(params, batch_stats, x).compile()  # a separate compile, timed alone
    compile_s = time.perf_counter() - start
    stats_pass(params, batch_stats, frames[: args.batch])    # the pass's own compile + warm-up
    start, cpu = time.perf_counter(), time.process_time()
    out = stats_pass(params, batch_stats, frames)
    run_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    if out[0]["mean"].shape[0] != n:
        raise RuntimeError(f"stats pass returned {out[0]['mean'].shape[0]} rows for {n} frames")
    return {"images_per_s": round(n / run_s, 2), "compile_s": round(compile_s, 2),
            "seconds": round(run_s, 2), "cpu_s_per_image": round(cpu_s / n, 3),
            "micro_batch": stats_pass.micro_batch, "trace_count": stats_pass.trace_count()}


def meta_step_images_per_s(config, args, rng, steps: int = 2) -> float:
    """The meta-step on K × (batch / K) images, after one warm-up step."""
    k = config.meta.num_domains
    config.meta.per_domain_batch = args.batch // k
    shapes = jax.eval_shape(lambda: state_lib.init_state(config, jax.random.PRNGKey(0)))
    # The root key (a raw uint32 PRNGKey, as meta.py expects) is set after the rest is drawn.
    state = jax.device_put(random_tree(shapes.replace(rng=None), rng))
    state = state.replace(rng=jax.random.PRNGKey(0))
    b, r, g = config.meta.per_domain_batch, args.resolution, depth_size(args.resolution)
    y = np.tile(np.r_[np.ones(b // 2), np.zeros(b - b // 2)], (k, 1)).astype(np.float32)
    batch = {"x": rng.random((k, b, r, r, 6), np.float32), "y": y,
             "depth": rng.random((k, b, g, g), np.float32) * y[:, :, None, None]}
    step = meta.make_meta_step(config)
    second = bool(config.meta.second_order)
    state, metrics = step(state, batch, second_order=second)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch, second_order=second)
    jax.block_until_ready(metrics)
    return steps * k * b / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=96)
    parser.add_argument("--batches", type=int, default=4, help="timed full batches after compile")
    parser.add_argument("--micro_batch", type=int, default=None)
    parser.add_argument("--compare_meta_step", action="store_true")
    args = parser.parse_args()

    config = default.get_config()
    config.data.resolution = args.resolution
    config.model.width = args.width
    rng = np.random.default_rng(0)
    result = {"bench": "stats_pass", "resolution": args.resolution, "width": args.width,
              "batch": args.batch, "images": args.batch * args.batches,
              **stats_pass_numbers(config, args, rng)}
    if args.compare_meta_step:
        meta_ips = meta_step_images_per_s(config, args, rng)
        result["meta_step_images_per_s"] = round(meta_ips, 2)
        result["ratio_to_meta_step"] = round(result["images_per_s"] / meta_ips, 2)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["device"] = jax.devices()[0].platform
    print(json.dumps(result))


if __name__ == "__main__":
    main()
