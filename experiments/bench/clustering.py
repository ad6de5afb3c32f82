"""Wall time of one epoch's pseudo-domain assignment (`domains.assign`) at paper-plus scale.

Prints one JSON line: seconds of `assign` with algorithm='auto' (what training uses), and, unless
--no-compare, the other k-means variant's seconds and the NMI between MiniBatchKMeans and full
KMeans labels on the same data (the issue asks ≥ 0.99 if mini-batch is used).
  python experiments/bench/clustering.py [--n 200000] [--d 384] [--k 3] [--n-init 3] [--no-compare]

Data: a synthetic bank of n samples × d features, float32: K domains whose centres lie
--domain-distance noise-σ apart on average, shared by live and spoof samples, plus one class offset
of --class-distance σ; unit Gaussian noise. prev_labels are the true domains with 20 % of the
labels scrambled, as after an earlier epoch, so the Kuhn–Munkres path is the one timed.
"""

import argparse
import json
import os
import platform
import time

import numpy as np
from sklearn.metrics import normalized_mutual_info_score

from d2am_jax import domains


def synthetic_bank(n, d, k, domain_distance, class_distance, seed):
    """(bank float32 [n, d], is_live [n], true domain [n], prev_labels [n])."""
    rng = np.random.default_rng(seed)
    # E‖c_i − c_j‖ ≈ scale · √(2d) for centres drawn N(0, scale²·I).
    centres = rng.normal(size=(k, d)) * (domain_distance / np.sqrt(2 * d))
    class_offset = rng.normal(size=d) * (class_distance / np.sqrt(d))
    domain = rng.integers(0, k, n)
    is_live = rng.random(n) < 0.5
    bank = rng.standard_normal((n, d), dtype=np.float32)
    bank += centres[domain].astype(np.float32)
    bank[is_live] += class_offset.astype(np.float32)
    prev = domain.copy()
    scrambled = rng.random(n) < 0.2
    prev[scrambled] = rng.integers(0, k, int(scrambled.sum()))
    return bank, is_live, domain, prev


def timed_assign(bank, is_live, prev, args, algorithm):
    start = time.perf_counter()
    result = domains.assign(bank, is_live, args.k, prev_labels=prev, seed=args.seed,
                            n_init=args.n_init, algorithm=algorithm)
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--n-init", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--domain-distance", type=float, default=5.0)
    parser.add_argument("--class-distance", type=float, default=4.0)
    parser.add_argument("--no-compare", action="store_true",
                        help="time only algorithm='auto', skip the full vs mini-batch comparison")
    args = parser.parse_args()

    bank, is_live, domain, prev = synthetic_bank(
        args.n, args.d, args.k, args.domain_distance, args.class_distance, args.seed)
    auto, auto_s = timed_assign(bank, is_live, prev, args, "auto")
    record = {
        "bench": "clustering", "n": args.n, "d": args.d, "k": args.k, "n_init": args.n_init,
        "auto_algorithm": auto.diagnostics["algorithm"], "auto_seconds": round(auto_s, 2),
        "auto_nmi_true_domain": round(normalized_mutual_info_score(domain, auto.labels), 4),
        "auto_nmi_previous": round(auto.diagnostics["nmi_previous"], 4),
        "mmd2_pseudo": round(auto.diagnostics["mmd2_pseudo"], 4),
    }
    if not args.no_compare:
        other_name = "full" if auto.diagnostics["algorithm"] == "minibatch" else "minibatch"
        other, other_s = timed_assign(bank, is_live, prev, args, other_name)
        labels = {auto.diagnostics["algorithm"]: auto.labels, other_name: other.labels}
        record.update({
            f"{other_name}_seconds": round(other_s, 2),
            f"{other_name}_nmi_true_domain":
                round(normalized_mutual_info_score(domain, other.labels), 4),
            "nmi_minibatch_vs_full":
                round(normalized_mutual_info_score(labels["full"], labels["minibatch"]), 5),
        })
    record.update({"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                   "machine": platform.machine()})
    print(json.dumps(record))


if __name__ == "__main__":
    main()
