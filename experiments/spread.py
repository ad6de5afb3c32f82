"""How many evaluations to average: per grid pair, the seed-to-seed standard deviation of the
paired difference of one metric at the final evaluation and at the mean of the last N, and the
95 % half-width it gives.

Host-only (no jax), from a grid's finished workdirs (experiments/run.py):

  python experiments/spread.py table3 --workdir runs/bench26 --seeds 5 \
      --rows d2am,erm,w_d --last 1,3,6,12 [--metric auc] [--first-seed 0] [--out spread.csv]

`--last 1` is the final evaluation. A smaller spread means fewer seeds separate two methods; which
N to report should be chosen on runs other than the ones it is then used to compare.
`--first-seed S` uses seeds S..N-1 only: with `--seeds 10 --first-seed 5`, a second 5-seed
experiment independent of seeds 0–4, to see how far a 5-seed spread moves between replicates.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import grids  # noqa: E402
import summary  # noqa: E402

from d2am_jax.errors import UserError  # noqa: E402


def spreads(grid, directory: str, seeds: int, lasts, metric: str = "auc",
            first_seed: int = 0) -> list[dict]:
    """One dict per (pair, N): row, reference, last, n (seeds in both), mean and std of the
    paired difference (points ×100 of a fraction metric, as in the summary) and the 95 %
    half-width of its mean, over seeds first_seed..seeds-1."""
    out = []
    for last in lasts:
        rows = summary.collect(grid, directory, seeds, last)
        for entry in rows:
            for which, by_seed in entry["values"].items():
                entry["values"][which] = {s: v for s, v in by_seed.items() if s >= first_seed}
        for p in summary.paired(rows, f"last{last}", grid.pairs):
            if p["metric"] != metric:
                continue
            half = (p["hi"] - p["lo"]) / 2  # summary.interval's Student-t interval; NaN if n < 2
            out.append({"row": p["row"], "reference": p["reference"], "last": last, "n": p["n"],
                        "mean": 100 * p["mean"], "std": 100 * p["std"], "half_width": 100 * half})
    return out


def markdown(records: list[dict], lasts, metric: str) -> str:
    """Rows × N: 'std (half-width)' of the paired difference, and the root mean square of the
    standard deviations over the pairs."""
    lines = [f"| row − reference ({metric}, points) | " + " | ".join(
        "final" if n == 1 else f"last {n}" for n in lasts) + " |",
             "| --- | " + " | ".join("---" for _ in lasts) + " |"]
    pairs = list(dict.fromkeys((r["row"], r["reference"]) for r in records))
    cell = {(r["row"], r["reference"], r["last"]): r for r in records}
    for row, ref in pairs:
        cells = [cell.get((row, ref, n)) for n in lasts]
        lines.append(f"| {row} − {ref} | " + " | ".join(
            f"{c['std']:.2f} ({c['half_width']:.2f})" if c and math.isfinite(c["std"]) else "—"
            for c in cells) + " |")
    rms = []
    for n in lasts:
        sds = [r["std"] for r in records if r["last"] == n and math.isfinite(r["std"])]
        rms.append(f"{math.sqrt(sum(s * s for s in sds) / len(sds)):.2f}" if sds else "—")
    lines.append("| root mean square of the std | " + " | ".join(rms) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("grid", help=f"one of {sorted(grids.GRIDS)}")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rows", default="", help="comma-separated subset of the grid's rows")
    parser.add_argument("--last", default="1,3,6", help="comma-separated N (1: final evaluation)")
    parser.add_argument("--metric", default="auc", choices=summary.PAIRED_METRICS,
                        help="running_bn_*: the running averages' metrics of runs evaluated with "
                             "eval.bn_statistics=recomputed")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="use seeds FIRST_SEED..SEEDS-1 only (a replicate of the first ones)")
    parser.add_argument("--out", default="", help="also write the table as CSV here")
    args = parser.parse_args(argv)
    try:
        grid = grids.get(args.grid, args.rows)
        try:
            lasts = [int(n) for n in args.last.split(",") if n.strip()]
        except ValueError:
            raise UserError(f"--last {args.last!r}: expected comma-separated integers") from None
        if not lasts or min(lasts) < 1:
            raise UserError(f"--last {args.last!r}: expected integers ≥ 1")
        if not 0 <= args.first_seed < args.seeds:
            raise UserError(f"--first-seed {args.first_seed}: expected 0 ≤ it < --seeds "
                            f"({args.seeds})")
        if not os.path.isdir(args.workdir):
            raise UserError(f"--workdir {args.workdir!r}: no such directory")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    records = spreads(grid, args.workdir, args.seeds, lasts, args.metric, args.first_seed)
    print(markdown(records, lasts, args.metric), end="")
    if args.out and records:
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
