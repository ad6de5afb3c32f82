"""The input pipeline through grain's DataLoader instead of the sampler's decoding threads: the same
meta-batches from the same ArrayRecord records, for a side-by-side measurement.

  pip install grain        # not a dependency of the project
  python experiments/bench/grain_loader.py --resolution R --workers N [--steps 30]
      [--per_domain 100] [--read_threads 16]

Builds fas_synthetic at R×R into --data_dir (the folder experiments/bench/sampler.py uses) and
draws the frame indices of steps 0..S-1 with `MetaBatchSampler.meta_indices` (K = 3, B = 32).
grain reads each record from ArrayRecord (tfds' data source, opened in each worker process),
decodes it in its worker processes (a MapTransform: `loader.decode_rgb` and the depth target as
`loader.DepthStore` makes it) and batches K·B frames per step; N = 0 runs everything in this
process. grain's worker w takes every N-th record and batches its own, so the record order is
laid out for batch t to be step t; every batch is checked equal to `MetaBatchSampler.meta_batch`
afterwards. Prints one JSON line: images_per_s and cpu_ms_per_image (this process and its
worker processes, after two warm-up batches that cover the workers' start).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import grain.python as grain
import numpy as np
import psutil
from absl import flags

from d2am_jax.data import build, builders, loader
from d2am_jax.data.dataset import depth_size
from d2am_jax.data.sampler import MetaBatchSampler

K, B = 3, 32
WARMUP = 2


class FrameRecords(grain.RandomAccessDataSource):
    """Position p → the record `order[p]` = (split, local index) of the built splits in `parts`
    ((builder directory, split) pairs), read from ArrayRecord; opened lazily in each process."""

    def __init__(self, parts: list[tuple[str, str]], order: np.ndarray):
        self._parts, self._order, self._sources = parts, order, None

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, p):
        if self._sources is None:
            import tensorflow_datasets as tfds
            self._sources = [tfds.builder_from_directory(d).as_data_source(s)
                             for d, s in self._parts]
        part, local = self._order[p]
        rec = self._sources[part][int(local)]
        return {"image": rec["image"], "depth": rec["depth"], "label": int(rec["label"])}

    def __getstate__(self):
        return {"_parts": self._parts, "_order": self._order, "_sources": None}

    def __repr__(self) -> str:  # grain names the source in its checkpoints
        return f"FrameRecords({self._parts}, {len(self._order)} positions)"


class Decode(grain.MapTransform):
    """A record → {'x': uint8 [r, r, 3], 'y': float32, 'depth': uint8 [d, d]} as the sampler
    builds them."""

    def __init__(self, resolution: int):
        self._shape, self._depth_size = (resolution, resolution), depth_size(resolution)

    def map(self, rec):
        x = loader.decode_rgb(rec["image"], self._shape, "frame")
        blobs = {k: np.empty(1, object) for k in ("image", "depth")}
        blobs["image"][0], blobs["depth"][0] = rec["image"], rec["depth"]
        store = loader.DepthStore(loader.Records([], np.zeros(1), np.zeros(1), blobs),
                                  np.array([rec["label"]]), np.array([len(rec["depth"]) > 0]),
                                  self._depth_size)
        depth = np.rint(store[np.array([0])][0] * 255.0).astype(np.uint8)
        return {"x": x, "y": np.float32(rec["label"]), "depth": depth}


def laid_out(step_frames: np.ndarray, workers: int) -> np.ndarray:
    """Position order for grain's round robin: worker w reads positions w, w + N, ... and batches
    them K·B at a time; batches come out worker 0, 1, ..., N-1, 0, ... So the j-th position of
    worker w belongs to step (j // KB) · N + w, place j % KB."""
    steps, kb = step_frames.shape
    n = max(1, workers)
    if steps % n:
        raise SystemExit(f"--steps + {WARMUP} warm-up must be a multiple of --workers")
    order = np.empty(steps * kb, np.int64)
    for p in range(order.size):
        w, j = p % n, p // n
        order[p] = step_frames[(j // kb) * n + w, j % kb]
    return order


def cpu_seconds(proc: psutil.Process) -> float:
    """CPU time of this process and of its live children (grain's workers)."""
    total = time.process_time()
    for child in proc.children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1, help="grain worker processes")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--per_domain", type=int, default=100)
    parser.add_argument("--read_threads", type=int, default=16,
                        help="grain's ReadOptions.num_threads per process (its default: 16)")
    parser.add_argument("--data_dir", default="")
    args = parser.parse_args()
    flags.FLAGS(sys.argv[:1])   # grain reads absl flags (its defaults here); argparse has ours

    data_dir = args.data_dir or os.path.join(tempfile.gettempdir(), "d2am_bench_sampler")
    r = args.resolution
    config = {"resolution": r, "num_domains": K, "per_domain": args.per_domain}
    build.build("fas_synthetic", data_dir, config=config)
    splits = [f"domain{d}" for d in range(K)]
    builder = builders.builder("fas_synthetic", data_dir, config)
    parts = [loader.load("fas_synthetic", s, data_dir, config, depth_size=depth_size(r))
             for s in splits]
    data = loader.concat(parts)
    sampler = MetaBatchSampler(data.frames, data.labels, data.depth, num_domains=K,
                               per_domain_batch=B, depth_size=depth_size(r), seed=0)
    pseudo = np.repeat(np.arange(K), [len(p) for p in parts]).astype(np.int32)
    # Global frame index → (split, local index): concat keeps the splits in order.
    offsets = np.cumsum([0] + [len(p) for p in parts])
    where = np.stack([np.searchsorted(offsets, np.arange(len(data)), "right") - 1,
                      np.arange(len(data)) - offsets[:-1].repeat([len(p) for p in parts])], 1)
    total_steps = WARMUP + args.steps
    step_frames = np.stack([sampler.meta_indices(pseudo, 0, s)[0].reshape(-1)
                            for s in range(total_steps)])
    order = laid_out(step_frames, args.workers)

    loader_ = grain.DataLoader(
        data_source=FrameRecords([(str(builder.data_dir), s) for s in splits], where[order]),
        sampler=grain.IndexSampler(len(order), grain.NoSharding(), shuffle=False, num_epochs=1),
        operations=[Decode(r), grain.Batch(K * B, drop_remainder=True)],
        worker_count=args.workers, read_options=grain.ReadOptions(num_threads=args.read_threads))
    proc = psutil.Process()
    batches = []
    iterator = iter(loader_)
    for _ in range(WARMUP):
        batches.append(next(iterator))
    wall, cpu = time.perf_counter(), cpu_seconds(proc)
    for _ in range(args.steps):
        batches.append(next(iterator))
    wall, cpu = time.perf_counter() - wall, cpu_seconds(proc) - cpu
    del iterator

    for step, got in enumerate(batches):   # the same batches as the sampler's, bit for bit
        want = sampler.meta_batch(pseudo, 0, step)
        for key in ("x", "y", "depth"):
            if isinstance(got[key], grain.SharedMemoryArray):
                got[key].unlink_on_del()    # this process is the last to use it
            shaped = got[key].reshape(want[key].shape)
            if not np.array_equal(shaped, want[key]):
                raise SystemExit(f"step {step}: grain's {key!r} differs from the sampler's")
    del batches, got, shaped
    images = args.steps * K * B
    print(json.dumps({
        "bench": "grain DataLoader: ArrayRecord to uint8 meta-batch", "resolution": r,
        "workers": args.workers, "read_threads": args.read_threads, "K": K,
        "per_domain_batch": B, "frames": len(data), "steps": args.steps,
        "images_per_s": round(images / wall, 1), "cpu_ms_per_image": round(1e3 * cpu / images, 3),
        "same_batches_as_sampler": True, "grain": _version(),
        "cores": len(os.sched_getaffinity(0)), "machine": platform.processor() or "unknown",
    }))


def _version() -> str:
    from importlib.metadata import version
    return version("grain")


if __name__ == "__main__":
    main()
