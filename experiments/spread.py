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
The last line pools the noise over every row given (summary.pooled: rows as treatments, seeds as
blocks) and prints the paired spread and half-width that implies.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys

import numpy as np

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
        rows = _collect(grid, directory, seeds, last, first_seed)
        for p in summary.paired(rows, f"last{last}", grid.pairs):
            if p["metric"] != metric:
                continue
            half = (p["hi"] - p["lo"]) / 2  # summary.interval's Student-t interval; NaN if n < 2
            out.append({"row": p["row"], "reference": p["reference"], "last": last, "n": p["n"],
                        "mean": 100 * p["mean"], "std": 100 * p["std"], "half_width": 100 * half})
    return out


def _collect(grid, directory, seeds, last, first_seed):
    rows = summary.collect(grid, directory, seeds, last)
    for entry in rows:
        for which, by_seed in entry["values"].items():
            entry["values"][which] = {s: v for s, v in by_seed.items() if s >= first_seed}
    return rows


def pooled(grid, directory: str, seeds: int, lasts, metric: str = "auc",
           first_seed: int = 0) -> list[dict]:
    """Per N, the grid's pooled noise over the rows given (summary.pooled: rows × seeds, row and
    seed effects): the paired standard deviation it implies, √2 · σ, the 95 % half-width of a
    pair's mean difference, its degrees of freedom and Levene's p; points as in `spreads`."""
    out = []
    for last in lasts:
        rows = _collect(grid, directory, seeds, last, first_seed)
        pool = summary.pooled(rows, f"last{last}", grid.pairs, metric)
        if pool:
            out.append({"last": last, "rows": len(pool["rows"]), "seeds": len(pool["seeds"]),
                        "df": pool["df"], "std": 100 * math.sqrt(2) * pool["sigma"],
                        "half_width": 100 * pool["half_width"], "levene_p": pool["levene_p"]})
    return out


def replicate_check(grid, directory: str, seeds: int, last: int, metric: str = "auc") -> dict:
    """Is the pooled interval too narrow? Split seeds 0..seeds-1 into two halves (an odd last
    seed left out), two independent experiments; for every pair of the rows given (not only
    the grid's pairs) the two halves' mean differences should differ only by noise:
    z = (m₁ − m₂) / √(2σ₁²/S₁ + 2σ₂²/S₂), with σ each half's pooled σ. If the pooled σ is
    right, z is about standard normal: variance near 1, |z| > 1.96 for about 5 % of the pairs.
    The same with each pair's own standard deviation beside it. Pairs of rows are not
    independent, so this is a check, not a test."""
    half = seeds // 2
    parts = []
    for first, stop in ((0, half), (half, 2 * half)):
        rows = _collect(grid, directory, stop, last, first)
        pool = summary.pooled(rows, f"last{last}", (), metric)
        if pool is None:
            raise UserError(f"--replicate-check: seeds {first}–{stop - 1} give no pool: at least "
                            "2 rows with every seed and 2 seeds are needed")
        values = {e["row"]: e["values"][f"last{last}"] for e in rows if e["row"] in pool["rows"]}
        parts.append((pool, {n: np.array([v[s][metric] for s in sorted(v)])
                             for n, v in values.items()}))
    (pool1, y1), (pool2, y2) = parts
    names = [n for n in pool1["rows"] if n in y2]
    z_pooled, z_own = [], []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d1, d2 = y1[a] - y1[b], y2[a] - y2[b]
            step = d1.mean() - d2.mean()
            z_pooled.append(step / math.sqrt(2 * pool1["sigma"] ** 2 / d1.size
                                             + 2 * pool2["sigma"] ** 2 / d2.size))
            own = d1.var(ddof=1) / d1.size + d2.var(ddof=1) / d2.size
            z_own.append(step / math.sqrt(own) if own > 0 else math.nan)
    out = {"pairs": len(z_pooled), "seeds_per_half": half}
    for key, z in (("pooled", np.array(z_pooled)), ("own", np.array(z_own))):
        z = z[np.isfinite(z)]
        out[f"{key}_z_variance"] = float(z.var()) if z.size else math.nan
        out[f"{key}_outside"] = float((np.abs(z) > 1.96).mean()) if z.size else math.nan
    return out


def markdown(records: list[dict], lasts, metric: str, pools=()) -> str:
    """Rows × N: 'std (half-width)' of the paired difference, the root mean square of the
    standard deviations over the pairs and, where given, the grid's pooled √2 · σ (half-width)."""
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
    if pools:
        by_last = {p["last"]: p for p in pools}
        cells = [by_last.get(n) for n in lasts]
        lines.append("| grid-pooled √2·σ (half-width) | " + " | ".join(
            f"{c['std']:.2f} ({c['half_width']:.2f})" if c else "—" for c in cells) + " |")
        lines += ["", "grid-pooled: " + "; ".join(
            f"{'final' if p['last'] == 1 else 'last ' + str(p['last'])}: {p['rows']} rows × "
            f"{p['seeds']} seeds, {p['df']} degrees of freedom, Levene p = "
            f"{summary.p_value(p['levene_p'])}"
            for p in pools)]
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
    parser.add_argument("--replicate-check", action="store_true",
                        help="also check the pooled interval on two halves of the seeds "
                             "(replicate_check), at the largest --last")
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
    pools = pooled(grid, args.workdir, args.seeds, lasts, args.metric, args.first_seed)
    print(markdown(records, lasts, args.metric, pools), end="")
    if args.replicate_check:
        try:
            check = replicate_check(grid, args.workdir, args.seeds, max(lasts), args.metric)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        h = check["seeds_per_half"]
        print(f"\nreplicate check (seeds 0–{h - 1} against {h}–{2 * h - 1}, "
              f"{'final' if max(lasts) == 1 else 'last ' + str(max(lasts))}, {check['pairs']} "
              f"pairs of rows; expected: variance ≈ 1, ≈ 5 % outside ±1.96): pooled σ: z "
              f"variance {check['pooled_z_variance']:.2f}, {100 * check['pooled_outside']:.1f} % "
              f"outside; each pair's own spread: z variance {check['own_z_variance']:.2f}, "
              f"{100 * check['own_outside']:.1f} % outside")
    if args.out and records:
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
