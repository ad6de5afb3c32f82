"""Throughput of the epoch-1 pretrained-feature pass (`FeatureExtractor.features`), in images/s.

Prints one JSON line: per input size, compile seconds and steady-state images/s.
  python experiments/bench/pretrained_features.py [--sizes 64 128] [--batch-size 64] [--batches 4]
"""

import argparse
import json
import os
import platform
import time

import jax
import numpy as np

from d2am_jax import pretrained


def measure(extractor, size: int, batch_size: int, batches: int, seed: int = 0) -> dict:
    """Compile time (one batch) and images/s over `batches` further batches at size × size."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch_size * batches, size, size, 3), dtype=np.uint8)
    start = time.perf_counter()
    extractor.features(images[:batch_size], batch_size=batch_size)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    feats = extractor.features(images, batch_size=batch_size)
    run_s = time.perf_counter() - start
    assert np.isfinite(feats).all()
    return {"size": size, "compile_s": round(compile_s, 2), "images": len(images),
            "seconds": round(run_s, 3), "images_per_s": round(len(images) / run_s, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="efficientnet_lite0",
                        choices=sorted(pretrained.ARCHITECTURES))
    parser.add_argument("--checkpoint", default=None, help="torch state dict (ResNets need one)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4, help="timed batches per size")
    args = parser.parse_args()
    extractor = pretrained.load_feature_extractor(args.arch, checkpoint_path=args.checkpoint)
    results = [measure(extractor, s, args.batch_size, args.batches) for s in args.sizes]
    print(json.dumps({
        "bench": "pretrained_features", "arch": args.arch, "layers": list(extractor.layers),
        "feature_dim": extractor.feature_dim, "batch_size": args.batch_size,
        "backend": jax.default_backend(), "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "results": results}))


if __name__ == "__main__":
    main()
