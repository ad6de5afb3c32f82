"""How long the training loop waits for its input, end to end: the mean `input_wait_share` (the
share of the loop's step time spent waiting for the prefetched batch) of a finished run.

  python experiments/bench/input_wait.py --workdir DIR                # a run that has finished
  python experiments/bench/input_wait.py --manifest-run DIR [--resolution 128] [--steps 30]

The second form writes synthetic face frames as PNG files with a manifest.csv under DIR, builds
them like a user's data (ArrayRecord) and trains D²AM on them for --steps steps (one epoch, a
width-1/8 network), then reports the same figures. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import numpy as np


def wait_share(workdir: str) -> dict:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if r.get("kind") == "train" and "input_wait_share" in r]
    if not train:
        raise SystemExit(f"{workdir}: no train records with input_wait_share")
    shares = [r["input_wait_share"] for r in train]
    # The first window holds the compile; the loop's steady state is the rest.
    steady = shares[1:] or shares
    return {"workdir": workdir, "records": len(shares),
            "input_wait_share_mean": round(statistics.mean(steady), 4),
            "input_wait_share_max": round(max(steady), 4),
            "images_per_s_median": round(statistics.median(r["images_per_s"]
                                                           for r in train[1:] or train), 1)}


def manifest_run(directory: str, resolution: int, steps: int) -> str:
    from PIL import Image

    from d2am_jax import train
    from d2am_jax.configs import manifest as manifest_config
    from d2am_jax.data import synthetic
    raw = synthetic.generate(synthetic.SyntheticConfig(resolution=resolution, num_domains=4,
                                                       per_domain=200))
    frames = os.path.join(directory, "frames")
    os.makedirs(frames, exist_ok=True)
    lines = ["path,label,video,domain"]
    for i, image in enumerate(raw["image"]):
        Image.fromarray(image).save(os.path.join(frames, f"{i}.png"))
        label = "live" if raw["label"][i] else "spoof"
        lines.append(f"frames/{i}.png,{label},{raw['video'][i]},site{raw['domain'][i]}")
    with open(os.path.join(directory, "manifest.csv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    config = manifest_config.get_config()
    config.data.manifest = os.path.join(directory, "manifest.csv")
    config.data.source, config.data.target = "site0,site1,site2", "site3"
    config.data.resolution, config.data.face_crop = resolution, "none"
    config.model.width, config.model.adaptation_dim, config.model.drlm_reduction = 0.125, 64, 4
    config.meta.per_domain_batch, config.meta.outer_lr = 8, 1e-3
    config.num_epochs, config.steps_per_epoch, config.log_every = 1, steps, 5
    config.progress = False
    workdir = os.path.join(directory, "run")
    train.train_and_evaluate(config, workdir)
    return workdir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir")
    p.add_argument("--manifest-run")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    if args.manifest_run:
        workdir = manifest_run(args.manifest_run, args.resolution, args.steps)
    elif args.workdir:
        workdir = args.workdir
    else:
        raise SystemExit("give --workdir or --manifest-run")
    out = wait_share(workdir)
    out["cpu_count"] = len(os.sched_getaffinity(0))
    out["numpy"] = np.__version__
    print(json.dumps(out))


if __name__ == "__main__":
    main()
