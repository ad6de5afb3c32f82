"""The input pipeline alone: meta-batches from a built ArrayRecord dataset to device-ready uint8
arrays, cold (every frame decoded from its PNG record) and from the decoded-frame cache.

  python experiments/bench/sampler.py --resolution R --workers N [--steps 20] [--per_domain 200]
      [--streamed]

Builds fas_synthetic at R×R once into --data_dir (default a temporary folder), reads it as a run
does (`loader.load`, records kept encoded in memory, or with --streamed re-read from ArrayRecord
as data.encoded_in_memory=False does), and times `MetaBatchSampler.meta_batch` (K = 3, B = 32)
with N decoding threads for frames and depth maps (`sources._cached`). Prints one JSON line:
images_per_s and cpu_ms_per_image (process CPU time per image, all threads: what sizes the host
of a GPU) for the cold pass and for the cached one, and meta_batches_per_s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

from d2am_jax.data import build, loader
from d2am_jax.data.dataset import depth_size
from d2am_jax.data.sampler import CachedFrames, MetaBatchSampler

K, B = 3, 32


def timed_batches(sampler: MetaBatchSampler, pseudo: np.ndarray, steps: int,
                  epoch: int) -> tuple[float, float, float]:
    """(wall seconds, process CPU seconds, this thread's CPU seconds) of `steps` meta-batches."""
    wall, cpu, own = time.perf_counter(), time.process_time(), time.thread_time()
    for step in range(steps):
        batch = sampler.meta_batch(pseudo, epoch, step)
        assert batch["x"].dtype == np.uint8 and batch["depth"].dtype == np.uint8
    return time.perf_counter() - wall, time.process_time() - cpu, time.thread_time() - own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--per_domain", type=int, default=200)
    parser.add_argument("--data_dir", default="")
    parser.add_argument("--streamed", action="store_true",
                        help="re-read each record from ArrayRecord (data.encoded_in_memory=False)")
    args = parser.parse_args()

    data_dir = args.data_dir or os.path.join(tempfile.gettempdir(), "d2am_bench_sampler")
    r = args.resolution
    config = {"resolution": r, "num_domains": K, "per_domain": args.per_domain}
    build.build("fas_synthetic", data_dir, config=config)
    parts = [loader.load("fas_synthetic", f"domain{d}", data_dir, config,
                         depth_size=depth_size(r), in_memory=not args.streamed)
             for d in range(K)]
    data = loader.concat(parts)
    pseudo = np.repeat(np.arange(K), [len(p) for p in parts]).astype(np.int32)
    images = args.steps * K * B
    depth = data.depth.with_options(args.workers)

    def sampler(budget: int) -> MetaBatchSampler:
        frames = CachedFrames(len(data), data.frames.decode_one, budget, args.workers)
        return MetaBatchSampler(frames, data.labels, depth, num_domains=K,
                                per_domain_batch=B, depth_size=depth_size(r), seed=0)

    load_before = os.getloadavg()
    # Cold: a zero-byte cache, so every frame of every batch is decoded from its record.
    cold_wall, cold_cpu, cold_main = timed_batches(sampler(0), pseudo, args.steps, 0)
    warm = sampler(1 << 34)
    warm.frames.warm()
    warm_wall, warm_cpu, _ = timed_batches(warm, pseudo, args.steps, 1)
    print(json.dumps({
        "bench": "input pipeline: ArrayRecord to uint8 meta-batch", "resolution": r,
        "workers": args.workers, "streamed": args.streamed, "K": K, "per_domain_batch": B,
        "frames": len(data),
        "steps": args.steps, "images_per_s": round(images / cold_wall, 1),
        "cpu_ms_per_image": round(1e3 * cold_cpu / images, 3),
        # With N threads, the calling thread's share is the part that does not run in parallel;
        # cores_used (CPU / wall) is what the machine gave the process.
        "main_thread_cpu_ms_per_image": round(1e3 * cold_main / images, 3),
        "cores_used": round(cold_cpu / cold_wall, 2),
        "meta_batches_per_s": round(args.steps / cold_wall, 2),
        "cached_images_per_s": round(images / warm_wall, 1),
        "cached_cpu_ms_per_image": round(1e3 * warm_cpu / images, 3),
        "cores": len(os.sched_getaffinity(0)), "machine": platform.processor() or "unknown",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
