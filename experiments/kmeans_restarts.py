"""Does epoch 1's pseudo-domain assignment depend on the seed? Per number of k-means restarts,
the agreement between the epoch-1 assignments (Algorithm 1 line 5) that seeds 0..N−1 give on
one config's source, and the live-domain sizes each finds.

Host-only apart from the ImageNet features (EfficientNet-Lite0, computed once):
  python experiments/kmeans_restarts.py --config d2am_jax/configs/benchmark.py \
      [--seeds 5] [--n_init 3,10,30] [--config.FIELD=VALUE ...]

One JSON line per n_init: the mean and smallest adjusted Rand index over pairs of seeds (1: every
seed finds the same partition) and each seed's sorted live-domain sizes. Each seed uses the split
its run would use (data.source_val_seed fixes it across seeds; -1 draws it by seed, so the source
itself then differs between seeds).
"""

from __future__ import annotations

import itertools
import json
import tempfile

import numpy as np
from absl import app, flags
from ml_collections import config_flags
from sklearn.metrics import adjusted_rand_score

_CONFIG = config_flags.DEFINE_config_file("config", None, "a d2am_jax config file")
_SEEDS = flags.DEFINE_integer("seeds", 5, "seeds 0..N-1")
_N_INIT = flags.DEFINE_string("n_init", "3,10,30", "comma-separated numbers of k-means restarts")


def main(argv) -> int:
    del argv
    from d2am_jax import train
    from d2am_jax.data import sources
    config = _CONFIG.value
    labels = {}
    k = int(config.meta.num_domains)
    with tempfile.TemporaryDirectory() as workdir:
        for seed in range(_SEEDS.value):
            config.seed = seed
            data = sources.load(config, workdir)
            if seed == 0 or config.data.source_val_seed < 0:  # the split decides the source
                bank = train.ImageNetBank(config, data.train.frames)
            for n_init in (int(v) for v in _N_INIT.value.split(",")):
                config.domains.n_init = n_init
                # The training program's own epoch-1 step, so the probe measures what a run does.
                assigned, _ = train.epoch_domains(config, 0, k, None, None, data.train, None, bank)
                labels.setdefault(n_init, []).append((assigned, data.train.labels == 1))
    for n_init, runs in labels.items():
        same_source = config.data.source_val_seed >= 0
        aris = [adjusted_rand_score(a[0], b[0]) for a, b in itertools.combinations(runs, 2)] \
            if same_source else []
        print(json.dumps({
            "n_init": n_init,
            "mean_pairwise_ari": float(np.mean(aris)) if aris else None,
            "min_pairwise_ari": float(np.min(aris)) if aris else None,
            "live_domain_sizes": [sorted(np.bincount(lab[live], minlength=int(
                config.meta.num_domains)).tolist()) for lab, live in runs]}))
    return 0


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
