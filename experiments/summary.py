"""A grid's summary over seeds: mean ± std and a 95 % Student-t interval per row and metric, the
paper's numbers beside them, paired differences (the grid's pairs; per pair and pooled over the
grid), run time; per-epoch gradient diagnostics.

Host-only (numpy, scipy; never jax): it reads results.json, metrics.jsonl and run.json files.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict

import numpy as np
from scipy import stats

# Both HTERs (source-validation threshold: honest; the target's own EER threshold: what published
# tables report), AUC and TPR at two spoof-acceptance budgets.
METRICS = ("hter", "hter_test_eer", "auc", "tpr_at_fpr_1pct", "tpr_at_fpr_5pct")
# Paired differences are taken of these; the running_bn_* ones exist only in runs evaluated with
# recomputed BatchNorm statistics (eval.bn_statistics='recomputed'): the same networks scored with
# the running averages.
PAIRED_METRICS = ("auc", "hter", "hter_test_eer", "running_bn_auc", "running_bn_hter",
                  "running_bn_hter_test_eer")
_READ = METRICS + PAIRED_METRICS[3:]
EPOCH_KEYS = ("grad_cosine_first_second", "grad_norm_ratio_first_second")


def interval(values, confidence: float = 0.95) -> dict:
    """n, mean, sample std (ddof 1) and the Student-t interval of the mean; NaN where n < 2."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "lo": math.nan, "hi": math.nan}
    mean = float(x.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "std": math.nan, "lo": math.nan, "hi": math.nan}
    std = float(x.std(ddof=1))
    if std == 0.0:
        return {"n": n, "mean": mean, "std": 0.0, "lo": mean, "hi": mean}
    lo, hi = stats.t.interval(confidence, n - 1, loc=mean, scale=std / math.sqrt(n))
    return {"n": n, "mean": mean, "std": std, "lo": float(lo), "hi": float(hi)}


def run_values(results: list[dict], last_n: int) -> dict[str, dict[str, float]]:
    """A run's target metrics: at the final evaluation, averaged over its last `last_n`
    evaluations, and at the best checkpoint by source validation (the last record marked
    is_best; ties already went to the later checkpoint)."""
    if not results:
        return {}
    tail = results[-last_n:]
    marked = [r for r in results if r.get("is_best")]
    best = marked[-1] if marked else None
    out = {"final": {m: results[-1].get(m) for m in _READ},
           f"last{last_n}": {m: _mean([r.get(m) for r in tail]) for m in _READ}}
    if best is not None:
        out["best"] = {m: best.get(m) for m in _READ}
    return out


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _read_json(path: str, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def epoch_diagnostics(records: list[dict]) -> dict[int, dict[str, float]]:
    """Per epoch, over its logged training steps: mean and minimum of the first/second-order
    gradient cosine, mean of their norm ratio, median images per second."""
    by_epoch = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("kind") != "train":
            continue
        for key in EPOCH_KEYS + ("images_per_s",):
            if r.get(key) is not None:
                by_epoch[int(r["epoch"])][key].append(float(r[key]))
    out = {}
    for epoch, values in sorted(by_epoch.items()):
        row = {}
        cos = values.get("grad_cosine_first_second")
        if cos:
            row["cosine_mean"], row["cosine_min"] = float(np.mean(cos)), float(np.min(cos))
        ratio = values.get("grad_norm_ratio_first_second")
        if ratio:
            row["norm_ratio_mean"] = float(np.mean(ratio))
        out[epoch] = row
    return out


def step_seconds(records: list[dict], images_per_step: int) -> float | None:
    """Median seconds per training step from the logged images/s, the first record (it holds the
    compile) left out."""
    rates = [r["images_per_s"] for r in records if r.get("kind") == "train"][1:]
    return float(images_per_step / np.median(rates)) if rates else None


# ----------------------------------------------------------------------------- a grid


def collect(grid, directory: str, seeds: int, last_n: int) -> list[dict]:
    """One dict per row: its runs' values (per seed), failures, seconds, per-epoch diagnostics."""
    rows = []
    for row in grid.rows:
        entry = {"row": row.name, "paper": row.paper, "values": defaultdict(dict), "failed": [],
                 "seconds": 0.0, "done": 0, "epochs": defaultdict(list), "step_s": [],
                 "peak_rss_bytes": []}
        for seed in range(seeds):
            workdir = run_dir(directory, row.name, seed)
            status = _read_json(os.path.join(workdir, "run.json"), {})
            entry["seconds"] += float(status.get("seconds", 0.0))
            if status.get("status") != "done":
                entry["failed"].append((seed, status.get("status", "not run"),
                                        status.get("error", "")))
                continue
            entry["done"] += 1
            results = _read_json(os.path.join(workdir, "results.json"), [])
            for which, values in run_values(results, last_n).items():
                entry["values"][which][seed] = values
            records = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            for epoch, diag in epoch_diagnostics(records).items():
                entry["epochs"][epoch].append(diag)
            config = _read_json(os.path.join(workdir, "config.json"), {})
            images = config.get("meta", {}).get("num_domains", 0) * \
                config.get("meta", {}).get("per_domain_batch", 0)
            entry["step_s"].append(step_seconds(records, images) if images else None)
            entry["peak_rss_bytes"].append(status.get("peak_rss_bytes"))
        rows.append(entry)
    return rows


def run_dir(directory: str, row: str, seed: int) -> str:
    return os.path.join(directory, row, f"seed_{seed}")


def _held(per_seed: dict) -> tuple[str, ...]:
    """METRICS, and the running_bn_* metrics where these runs hold them."""
    return METRICS + tuple(m for m in _READ[len(METRICS):]
                           if any(v.get(m) is not None for v in per_seed.values()))


def table(rows: list[dict]) -> list[dict]:
    """The long table of summary.csv: one line per row × evaluation × metric."""
    out = []
    for entry in rows:
        for which, per_seed in entry["values"].items():
            for metric in _held(per_seed):
                values = [per_seed[s][metric] for s in sorted(per_seed)]
                paper = entry["paper"].get(metric)
                out.append({"row": entry["row"], "evaluation": which, "metric": metric,
                            **interval(values), "paper": paper,
                            "paper_table": entry["paper"].get("table") if paper else None,
                            "seeds_done": entry["done"], "seeds_failed": len(entry["failed"]),
                            "row_seconds": round(entry["seconds"], 1)})
    return out


def per_seed(rows: list[dict]) -> list[dict]:
    """summary_seeds.csv: one line per row × seed × evaluation × metric, the value itself."""
    return [{"row": entry["row"], "seed": seed, "evaluation": which, "metric": metric,
             "value": values[metric]}
            for entry in rows for which, by_seed in entry["values"].items()
            for seed, values in sorted(by_seed.items()) for metric in _held(by_seed)]


def paired(rows: list[dict], which: str = "final", pairs=()) -> list[dict]:
    """Each (row, reference) of `pairs` seed by seed (the same seeds: paired), for AUC and both
    HTERs at evaluation `which` (and their running_bn_* values where the runs hold them): the
    mean difference row − reference and its interval. Empty `pairs`: every row against the
    first; a pair with a row not collected (a --rows subset) is left out."""
    if not rows:
        return []
    by_name = {entry["row"]: entry for entry in rows}
    pairs = pairs or [(entry["row"], rows[0]["row"]) for entry in rows[1:]]
    out = []
    for name, reference in pairs:
        if name not in by_name or reference not in by_name:
            continue
        a = by_name[reference]["values"].get(which, {})
        b = by_name[name]["values"].get(which, {})
        seeds = sorted(set(a) & set(b))
        for metric in PAIRED_METRICS:
            diffs = [b[s][metric] - a[s][metric] for s in seeds
                     if a[s][metric] is not None and b[s][metric] is not None]
            if not diffs and metric.startswith("running_bn_"):
                continue
            out.append({"row": name, "reference": reference, "evaluation": which,
                        "metric": metric, **interval(diffs)})
    return out


def pooled(rows: list[dict], which: str = "final", pairs=(), metric: str = "auc",
           confidence: float = 0.95) -> dict | None:
    """The grid's pooled interval of each pair's difference: rows as treatments and seeds as
    blocks of a randomised complete block design. Over the rows that hold every seed any row
    holds, fit value = row effect + seed effect + noise; σ² = residual sum of squares /
    ((R − 1)(S − 1)), and a pair's interval is its mean difference ± t · σ · √(2 / S) with t at
    (R − 1)(S − 1) degrees of freedom instead of the S − 1 of one pair's own interval. With two
    rows it is exactly the paired Student-t interval. It assumes every row's noise is the same
    size; `levene_p` (Levene's test, median-centred, of the residuals by row) checks that. None
    where fewer than 2 rows or 2 seeds qualify; pairs with a row left out are left out."""
    values = {}
    for entry in rows:
        by_seed = entry["values"].get(which, {})
        values[entry["row"]] = {s: v[metric] for s, v in by_seed.items()
                                if v.get(metric) is not None and math.isfinite(v[metric])}
    seeds = sorted(set().union(*values.values())) if values else []
    names = [name for name, by_seed in values.items() if seeds and set(by_seed) == set(seeds)]
    if len(names) < 2 or len(seeds) < 2:
        return None
    y = np.array([[values[name][s] for s in seeds] for name in names], np.float64)
    r, s = y.shape
    residual = y - y.mean(1, keepdims=True) - y.mean(0, keepdims=True) + y.mean()
    df = (r - 1) * (s - 1)
    sigma = float(math.sqrt((residual ** 2).sum() / df))
    # Levene's statistic divides by the spread of |residual − row median| within rows: with 2
    # seeds a row's residuals are ±e and that spread is 0, so the test says nothing there.
    deviation = np.abs(residual - np.median(residual, axis=1, keepdims=True))
    within = ((deviation - deviation.mean(1, keepdims=True)) ** 2).sum()
    levene_p = (float(stats.levene(*residual, center="median").pvalue)
                if s >= 3 and within > 1e-12 * max(float((deviation ** 2).sum()), 1e-300)
                else math.nan)
    half = float(stats.t.ppf(0.5 + confidence / 2, df) * sigma * math.sqrt(2 / s))
    index = {name: i for i, name in enumerate(names)}
    pairs = pairs or [(name, rows[0]["row"]) for name in values if name != rows[0]["row"]]
    out = []
    for name, reference in pairs:
        if name in index and reference in index:
            mean = float((y[index[name]] - y[index[reference]]).mean())
            out.append({"row": name, "reference": reference, "evaluation": which,
                        "metric": metric, "rows_pooled": r, "seeds": s, "df": df,
                        "sigma": sigma, "mean": mean, "lo": mean - half, "hi": mean + half,
                        "levene_p": levene_p})
    return {"rows": names, "left_out": [n for n in values if n not in index], "seeds": seeds,
            "df": df, "sigma": sigma, "half_width": half, "levene_p": levene_p, "pairs": out}


def all_pooled(grid, rows: list[dict], last_n: int) -> list[dict]:
    """`pooled` for AUC and both HTERs at the final evaluation, the last N and the best
    checkpoint; one dict per evaluation × metric with a pool of at least 3 rows (of 2 it is
    the paired interval already reported)."""
    out = []
    for which in ("final", f"last{last_n}", "best"):
        for metric in PAIRED_METRICS[:3]:
            pool = pooled(rows, which, grid.pairs, metric)
            if pool and len(pool["rows"]) >= 3:
                out.append({"evaluation": which, "metric": metric, **pool})
    return out


def all_paired(grid, rows: list[dict], last_n: int) -> list[dict]:
    """`paired` at the final evaluation, the mean of the last N and the best checkpoint."""
    return [p for which in ("final", f"last{last_n}", "best")
            for p in paired(rows, which, grid.pairs)]


def _fmt(stat: dict, scale: float = 100.0) -> str:
    if stat["n"] == 0:
        return "—"
    mean = f"{scale * stat['mean']:.2f}"
    if stat["n"] < 2:
        return f"{mean} (n=1)"
    return (f"{mean} ± {scale * stat['std']:.2f} [{scale * stat['lo']:.2f}, "
            f"{scale * stat['hi']:.2f}]")


def markdown(grid, rows: list[dict], seeds: int, last_n: int, command: str) -> str:
    """summary.md: per evaluation (final, last N, best) a table of rows × metrics in %, the
    paper's numbers, paired differences, failures, time and the per-epoch diagnostics."""
    lines = [f"# {grid.name}: {grid.description}", "", f"Command: `{command}`", "",
             f"Seeds 0–{seeds - 1} per row (paired: every row uses the same seeds). Values in %: "
             "mean ± std [95 % Student-t interval of the mean] over the seeds that finished. "
             "`hter`: threshold at the source-validation EER (nothing of the target used); "
             "`hter_test_eer`: threshold at the target's own EER (what published tables report).",
             ""]
    long = table(rows)
    for which in ("final", f"last{last_n}", "best"):
        header = {"final": "final evaluation", f"last{last_n}": f"mean of the last {last_n} "
                  "evaluations", "best": "best checkpoint by source validation (ties: later)"}
        lines += [f"## Target metrics at the {header[which]}", "",
                  "| row | " + " | ".join(METRICS) + " | paper (HTER / AUC) |",
                  "| --- | " + " | ".join("---" for _ in METRICS) + " | --- |"]
        for entry in rows:
            cells = {r["metric"]: _fmt(r) for r in long
                     if r["row"] == entry["row"] and r["evaluation"] == which}
            paper = entry["paper"]
            ref = (f"{100 * paper['hter_test_eer']:.2f} / {100 * paper['auc']:.2f} "
                   f"({paper['table']})" if paper else "—")
            lines.append(f"| {entry['row']} | " + " | ".join(cells.get(m, "—") for m in METRICS)
                         + f" | {ref} |")
        lines.append("")
    pairs = all_paired(grid, rows, last_n)
    if pairs:
        # Every evaluation side by side: a metric averaged over more evaluations can vary less
        # from seed to seed, and this is where a reader sees whether it does.
        evaluations = ("final", f"last{last_n}", "best")
        lines += ["## Paired differences, row − reference (points, the same seeds)", "",
                  f"mean ± std [95 %] at the final evaluation, at the mean of the last {last_n} "
                  "evaluations and at the best checkpoint by source validation.", "",
                  f"| row | reference | metric | final | last {last_n} | best |",
                  "| --- | --- | --- | --- | --- | --- |"]
        cell = {(p["row"], p["reference"], p["metric"], p["evaluation"]): _fmt(p) for p in pairs}
        keys = dict.fromkeys((p["row"], p["reference"], p["metric"]) for p in pairs)
        lines += [f"| {r} | {ref} | {m} | " + " | ".join(cell.get((r, ref, m, w), "—")
                                                         for w in evaluations) + " |"
                  for r, ref, m in keys]
        lines.append("")
    pools = all_pooled(grid, rows, last_n)
    if pools:
        lines += _pooled_markdown(pools, last_n)
    lines += ["## Runs and time", "", "| row | seeds done | failed or not run | row seconds "
              "| median step s | peak RSS GB |", "| --- | --- | --- | --- | --- | --- |"]
    for entry in rows:
        step = [s for s in entry["step_s"] if s is not None]
        rss = [r for r in entry["peak_rss_bytes"] if r]
        step_cell = f"{np.median(step):.3f}" if step else "—"
        rss_cell = f"{max(rss) / 1e9:.2f}" if rss else "—"
        lines.append(f"| {entry['row']} | {entry['done']} | {len(entry['failed'])} | "
                     f"{entry['seconds']:.1f} | {step_cell} | {rss_cell} |")
    failures = [(e["row"], *f) for e in rows for f in e["failed"]]
    if failures:
        lines += ["", "## Failed or unfinished runs", ""]
        lines += [f"- {row} seed {seed}: **{status}** — {error}"
                  for row, seed, status, error in failures]
    diag = epoch_table(rows)
    if diag:
        lines += ["", "## Per epoch: cosine and norm ratio ‖first‖/‖second‖ of the two "
                  "meta-gradients (same batch), over steps and seeds", "",
                  "| row | epoch | cosine mean | cosine min | norm ratio mean |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {d['row']} | {d['epoch']} | {d['cosine_mean']:.4f} | "
                  f"{d['cosine_min']:.4f} | {d['norm_ratio_mean']:.4f} |" for d in diag]
    return "\n".join(lines) + "\n"


def p_value(p: float) -> str:
    """A p-value for a table: two decimals, or — where the test had nothing to test."""
    return "—" if not math.isfinite(p) else f"{p:.2f}"


def _pooled_markdown(pools: list[dict], last_n: int) -> list[str]:
    evaluations = ("final", f"last{last_n}", "best")
    lines = ["## Paired differences, the grid's pooled interval (points)", "",
             "The same differences, with the seed-to-seed noise pooled over the whole grid: rows "
             "as treatments and seeds as blocks, value = row effect + seed effect + noise, fitted "
             "over the rows that finished every seed; σ is the noise's standard deviation, a "
             "pair's 95 % interval its mean difference ± t(df) · σ · √(2 / seeds). With many rows "
             "its t quantile is near 2 (against 2.78 for one pair at 5 seeds) and σ is better "
             "estimated. It assumes every row's noise is the same size: where Levene's p is small "
             "they are not, and the per-pair intervals above are the ones to read; so too for a "
             "pair whose own spread (the std above) is well over √2 · σ.", "",
             "| evaluation | metric | rows pooled | seeds | σ | df | half-width | Levene p | "
             "left out |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in pools:
        lines.append(f"| {p['evaluation']} | {p['metric']} | {len(p['rows'])} | "
                     f"{len(p['seeds'])} | {100 * p['sigma']:.2f} | {p['df']} | "
                     f"{100 * p['half_width']:.2f} | {p_value(p['levene_p'])} | "
                     f"{', '.join(p['left_out']) or '—'} |")
    cell = {(q["row"], q["reference"], q["metric"], q["evaluation"]):
            f"{100 * q['mean']:.2f} [{100 * q['lo']:.2f}, {100 * q['hi']:.2f}]"
            for p in pools for q in p["pairs"]}
    keys = dict.fromkeys((q["row"], q["reference"], q["metric"]) for p in pools
                         for q in p["pairs"])
    lines += ["", f"| row | reference | metric | final | last {last_n} | best |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r} | {ref} | {m} | " + " | ".join(cell.get((r, ref, m, w), "—")
                                                     for w in evaluations) + " |"
              for r, ref, m in keys]
    return lines + [""]


def epoch_table(rows: list[dict]) -> list[dict]:
    """Per row and epoch: the seeds' mean cosine, their minimum cosine, the mean norm ratio."""
    out = []
    for entry in rows:
        for epoch, per_seed in sorted(entry["epochs"].items()):
            have = [d for d in per_seed if "cosine_mean" in d]
            if not have:
                continue
            out.append({"row": entry["row"], "epoch": epoch,
                        "cosine_mean": float(np.mean([d["cosine_mean"] for d in have])),
                        "cosine_min": float(np.min([d["cosine_min"] for d in have])),
                        "norm_ratio_mean": float(np.mean([d["norm_ratio_mean"] for d in have]))})
    return out


def write(grid, directory: str, seeds: int, last_n: int, command: str) -> list[dict]:
    """Writes summary.md, summary.csv, summary_paired.csv, summary_paired_pooled.csv,
    summary_seeds.csv (and summary_epochs.csv when there are gradient diagnostics) into
    `directory`; returns the collected rows."""
    rows = collect(grid, directory, seeds, last_n)
    with open(os.path.join(directory, "summary.md"), "w") as f:
        f.write(markdown(grid, rows, seeds, last_n, command))
    _write_csv(os.path.join(directory, "summary.csv"), table(rows))
    _write_csv(os.path.join(directory, "summary_paired.csv"), all_paired(grid, rows, last_n))
    _write_csv(os.path.join(directory, "summary_seeds.csv"), per_seed(rows))
    _write_csv(os.path.join(directory, "summary_paired_pooled.csv"),
               [q for p in all_pooled(grid, rows, last_n) for q in p["pairs"]])
    diag = epoch_table(rows)
    if diag:
        _write_csv(os.path.join(directory, "summary_epochs.csv"), diag)
    return rows


def _write_csv(path: str, records: list[dict]) -> None:
    if not records:
        open(path, "w").close()
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
