"""Does a run's target ranking suffer from BatchNorm's running statistics? Frame-level AUC of a
checkpoint with E on its running averages (as evaluation runs) against E on batch statistics.

  python experiments/bn_check.py --workdir RUN [RUN ...] [--which latest|best] [--out FILE.csv]

Per run and split (source validation, target) it prints one JSON line: `auc_running` (E and M on
running averages: what `evaluation.py` measures, per frame), `auc_domain_batches` (E's BatchNorm
on batch statistics of frames of one true domain at a time, in shuffled batches of
`eval.batch_size`; M on its running averages) and the same per true domain. A large gap says the
running averages do not describe the features E was trained on — e.g. with
meta.batch_norm='per_domain', whose training never normalises over more than one domain batch.
Diagnostic only: the batch statistics use unlabelled frames of the split itself (the target's,
for the target), which no evaluation protocol here allows.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import numpy as np
from sklearn.metrics import roc_auc_score

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import figures  # noqa: E402


def _scorers(config):
    import jax

    from d2am_jax import models
    E, _, M = models.build_modules(config.model)

    def make(batch_stats_in_e: bool):
        @jax.jit
        def score(params, batch_stats, x):
            x = models.model_input(x)
            e = {"params": params["E"], "batch_stats": batch_stats["E"]}
            if batch_stats_in_e:
                (feat, _, _), _ = E.apply(e, x, True, mutable=["batch_stats"])
            else:
                feat = E.apply(e, x, False)[0]
            logit, _ = M.apply({"params": params["M"], "batch_stats": batch_stats["M"]}, feat,
                               False)
            return logit
        return score
    return make(False), make(True)


def _auc(labels, scores) -> float | None:
    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else None


def check(view: figures.RunView, which: str) -> list[dict]:
    """One record per split of `view`'s run at checkpoint `which`."""
    state, restored = view.state(which)
    running, batched = _scorers(view.config)
    bs = int(view.config.eval.batch_size)
    rows = []
    for split, data in (("val", view.data.val), ("target", view.data.target)):
        frames = np.asarray(data.frames[np.arange(len(data))])
        labels, domain = np.asarray(data.labels), np.asarray(data.domain).astype(str)
        s_run = np.concatenate([np.asarray(running(state.params, state.batch_stats,
                                                   frames[i:i + bs]))
                                for i in range(0, len(frames), bs)])
        s_dom = np.zeros(len(frames))
        row = {"run": view.workdir, "checkpoint": which, "step": int(restored.step),
               "split": split, "frames": len(frames)}
        rng = np.random.default_rng(0)
        for d in sorted(set(domain)):
            idx = rng.permutation(np.flatnonzero(domain == d))
            # Batches of bs frames; a short remainder joins the previous batch (batch statistics
            # of a handful of frames would be noise).
            cuts = list(range(0, len(idx), bs))
            if len(cuts) > 1 and len(idx) - cuts[-1] < bs // 2:
                cuts.pop()
            for lo, hi in zip(cuts, cuts[1:] + [len(idx)]):
                part = idx[lo:hi]
                s_dom[part] = np.asarray(batched(state.params, state.batch_stats, frames[part]))
            m = domain == d
            row[f"auc_running_domain_{d}"] = _auc(labels[m], s_run[m])
            row[f"auc_domain_batches_domain_{d}"] = _auc(labels[m], s_dom[m])
        row["auc_running"] = _auc(labels, s_run)
        row["auc_domain_batches"] = _auc(labels, s_dom)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", nargs="+", required=True)
    parser.add_argument("--which", default="latest", choices=("latest", "best"))
    parser.add_argument("--out", default="", help="also write the records to this CSV")
    args = parser.parse_args(argv)
    rows = []
    for workdir in args.workdir:
        for row in check(figures.RunView(workdir), args.which):
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k.startswith("auc"), k))
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, keys)
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
