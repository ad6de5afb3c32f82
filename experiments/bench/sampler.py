"""Images/s of MetaBatchSampler.meta_batch alone (64×64, K = 3, B = 32), in memory and cached.

Prints one JSON line.  python experiments/bench/sampler.py [--steps 50] [--per_domain 400]
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
from PIL import Image

from d2am_jax.data.sampler import CachedFrames, InMemoryFrames, MetaBatchSampler
from d2am_jax.data.synthetic import SyntheticConfig, generate

K, B = 3, 32


def png_bytes(images: np.ndarray) -> list[bytes]:
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def meta_batch_images_per_s(sampler: MetaBatchSampler, pseudo: np.ndarray, steps: int) -> float:
    sampler.meta_batch(pseudo, 0, 0)  # pools of this pseudo_domain are computed once, as in a run
    start = time.perf_counter()
    for step in range(1, steps + 1):
        sampler.meta_batch(pseudo, 0, step)
    return steps * K * B / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--per_domain", type=int, default=400)
    args = parser.parse_args()

    data = generate(SyntheticConfig(resolution=64, num_domains=K, per_domain=args.per_domain))
    pseudo, labels = data["domain"], data["label"]
    settings = dict(num_domains=K, per_domain_batch=B, depth_size=64 // 8, seed=0)

    in_memory = MetaBatchSampler(InMemoryFrames(data["image"]), labels, None, **settings)
    in_memory_ips = meta_batch_images_per_s(in_memory, pseudo, args.steps)

    blobs = png_bytes(data["image"])
    frames = CachedFrames(len(blobs), lambda i: np.asarray(Image.open(io.BytesIO(blobs[i]))),
                          budget_bytes=1 << 30)
    start = time.perf_counter()
    frames.warm()  # the first pass: every frame decoded once
    first_pass_ips = len(blobs) / (time.perf_counter() - start)
    cached = MetaBatchSampler(frames, labels, None, **settings)
    cached_ips = meta_batch_images_per_s(cached, pseudo, args.steps)

    print(json.dumps({
        "bench": "sampler.meta_batch", "resolution": 64, "K": K, "per_domain_batch": B,
        "frames": len(labels), "steps": args.steps,
        "in_memory_images_per_s": round(in_memory_ips, 1),
        "cached_images_per_s": round(cached_ips, 1),
        "png_first_pass_images_per_s": round(first_pass_ips, 1),
    }))


if __name__ == "__main__":
    main()
