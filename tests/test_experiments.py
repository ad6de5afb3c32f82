"""The experiments: summary statistics against hand-computed values, the grids, bad input refused
before anything trains, the runner end to end on the smoke config (a failed run reported, finished
runs skipped; `--summarize` runs nothing) and the figures from its workdir; the spread of paired
differences; records with both HTERs and TPR@FPR 5 %; the source-validation floor; the host side
imports no jax.
"""

import json
import math
import os
import sys
import tempfile

import numpy as np
import pytest

from d2am_jax import config_check, metrics
from d2am_jax.data import sources
from d2am_jax.data.dataset import FasData

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import grids  # noqa: E402
import run as runner  # noqa: E402
import spread  # noqa: E402
import summary  # noqa: E402

CACHE = os.path.join(tempfile.gettempdir(), "d2am_jax-test-xla-cache")
SMOKE = "d2am_jax/configs/smoke.py"
SMALL = {"num_epochs": 1, "steps_per_epoch": 2, "jax_cache_dir": CACHE, "progress": False}


# ----------------------------------------------------------------------------- statistics


def test_interval_is_student_t_of_the_mean():
    # mean 0.9, sample std 0.1, t(0.975, df=2) = 4.302653 → half-width 4.302653·0.1/√3 = 0.248414
    stat = summary.interval([0.8, 0.9, 1.0])
    assert stat["n"] == 3
    assert stat["mean"] == pytest.approx(0.9)
    assert stat["std"] == pytest.approx(0.1)
    assert stat["lo"] == pytest.approx(0.651586, abs=1e-6)
    assert stat["hi"] == pytest.approx(1.148414, abs=1e-6)
    one = summary.interval([0.5, None])
    assert one["n"] == 1 and one["mean"] == 0.5 and math.isnan(one["lo"])


def test_run_values_final_last_n_and_best():
    results = [{"auc": a, "hter": h, "is_best": b} for a, h, b in
               ((0.6, 0.4, True), (0.8, 0.3, True), (0.7, 0.2, False), (0.9, 0.1, False))]
    values = summary.run_values(results, last_n=3)
    assert values["final"]["auc"] == 0.9
    assert values["last3"]["auc"] == pytest.approx(0.8)      # (0.8 + 0.7 + 0.9) / 3
    assert values["best"]["hter"] == 0.3                     # the later of the two marked best
    assert values["final"]["tpr_at_fpr_5pct"] is None        # absent from these records


def _fake_run(directory, row, seed, status, results=(), error=""):
    workdir = summary.run_dir(directory, row, seed)
    os.makedirs(workdir)
    with open(os.path.join(workdir, "run.json"), "w") as f:
        json.dump({"status": status, "error": error, "seconds": 10.0}, f)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(list(results), f)


def test_summary_sets_paper_values_beside_and_reports_failures(tmp_path):
    grid = grids.get("table3", "d2am,erm")
    record = lambda auc: {m: 0.5 for m in summary.METRICS} | {"auc": auc, "is_best": True}  # noqa
    _fake_run(tmp_path, "d2am", 0, "done", [record(0.9)])
    _fake_run(tmp_path, "d2am", 1, "done", [record(0.8)])
    _fake_run(tmp_path, "erm", 0, "done", [record(0.7)])
    _fake_run(tmp_path, "erm", 1, "failed", error="UserError: config.data.target: no domain 9")
    rows = summary.write(grid, str(tmp_path), seeds=2, last_n=1, command="cmd")
    text = (tmp_path / "summary.md").read_text()
    assert "erm seed 1: **failed** — UserError: config.data.target: no domain 9" in text
    assert "15.43 / 91.22 (Table 3 (O&C&M→I))" in text                # the paper's D²AM row
    assert "85.00 ± 7.07" in text                                     # d2am AUC over 2 seeds
    lines = (tmp_path / "summary.csv").read_text().splitlines()
    auc = [line for line in lines if line.startswith("d2am,final,auc,")]
    assert auc and ",0.9122,Table 3" in auc[0]
    pairs = summary.paired(rows)
    erm_auc = [p for p in pairs if p["row"] == "erm" and p["metric"] == "auc"][0]
    assert erm_auc["n"] == 1 and erm_auc["mean"] == pytest.approx(-0.2)   # seed 0 only


def test_summarize_writes_what_finished_and_runs_nothing(tmp_path, monkeypatch, capsys):
    record = {m: 0.5 for m in summary.METRICS} | {"auc": 0.9, "is_best": True}
    _fake_run(tmp_path, "second_timing", 0, "done", [record])
    monkeypatch.setattr(runner, "execute", lambda run: pytest.fail(f"--summarize ran {run.name}"))
    argv = ["order_study", "--rows", "second_timing,first_timing", "--base", SMOKE, "--seeds",
            "2", "--summarize"]
    assert runner.main(argv + ["--workdir", str(tmp_path)]) == 0
    assert "1 of 4 runs done" in capsys.readouterr().out
    text = (tmp_path / "summary.md").read_text()
    assert "| second_timing | 1 | 1 |" in text and "| first_timing | 0 | 2 |" in text
    assert "first_timing seed 0: **not run**" in text
    assert "second_timing seed 1: **not run**" in text
    assert "90.00" in text                                          # seed 0's AUC, reported
    assert sorted(os.listdir(tmp_path / "second_timing")) == ["seed_0"]   # nothing created
    assert not (tmp_path / "first_timing").exists()
    assert runner.main(argv + ["--workdir", str(tmp_path / "nope")]) == 2
    assert "--summarize: " in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()


def test_order_study_pairs_each_order_with_the_other_at_every_evaluation(tmp_path):
    grid = grids.get("order_study", "second_a0.1,first_a0.1,second_a0.01")
    rec = lambda auc, best: {m: 0.5 for m in summary.METRICS} | {"auc": auc, "is_best": best}  # noqa
    # Per seed: AUC at epochs 1, 2, 3; the best checkpoint is the last one marked.
    for row, seed, aucs, best in (("second_a0.1", 0, (0.6, 0.8, 0.7), (1, 0, 0)),
                                  ("second_a0.1", 1, (0.5, 0.9, 0.9), (1, 1, 0)),
                                  ("first_a0.1", 0, (0.7, 0.6, 0.5), (1, 1, 0)),
                                  ("first_a0.1", 1, (0.8, 0.8, 0.6), (1, 0, 0))):
        _fake_run(tmp_path, row, seed, "done", [rec(a, bool(b)) for a, b in zip(aucs, best)])
    _fake_run(tmp_path, "second_a0.01", 0, "done", [rec(0.9, True)])
    rows = summary.write(grid, str(tmp_path), seeds=2, last_n=2, command="cmd")
    auc = {p["evaluation"]: p for p in summary.all_paired(grid, rows, 2) if p["metric"] == "auc"}
    # first − second, seed 0 and 1: final 0.5−0.7, 0.6−0.9; last 2: 0.55−0.75, 0.7−0.9;
    # best: 0.6−0.6, 0.8−0.9. second_a0.01 has no first-order partner here: no pair.
    assert set(auc) == {"final", "last2", "best"}
    assert {p["row"] for p in summary.all_paired(grid, rows, 2)} == {"first_a0.1"}
    assert auc["final"]["mean"] == pytest.approx(-0.25) and auc["final"]["n"] == 2
    assert auc["last2"]["mean"] == pytest.approx(-0.2)
    assert auc["best"]["mean"] == pytest.approx(-0.05)
    assert auc["best"]["std"] == pytest.approx(math.sqrt(0.005))   # diffs 0.0 and −0.1
    text = (tmp_path / "summary.md").read_text()
    assert "| first_a0.1 | second_a0.1 | auc | -25.00 ± 7.07" in text
    paired_csv = (tmp_path / "summary_paired.csv").read_text().splitlines()
    assert paired_csv[0].startswith("row,reference,evaluation,metric,n,mean")
    assert len(paired_csv) == 1 + 3 * 3                  # 3 evaluations × 3 metrics, one pair
    assert "running_bn" not in (tmp_path / "summary.csv").read_text()   # none in these runs
    seeds_csv = (tmp_path / "summary_seeds.csv").read_text().splitlines()
    assert seeds_csv[0] == "row,seed,evaluation,metric,value"
    assert "first_a0.1,1,last2,auc,0.7" in seeds_csv                # (0.8 + 0.6) / 2


def test_spread_of_the_paired_difference_final_and_last_n(tmp_path, capsys):
    grid = grids.get("table3", "d2am,erm")
    # running_bn_auc (runs evaluated with recomputed BatchNorm statistics): D²AM's 0.05 above its
    # auc, ERM's equal to it.
    rec = lambda auc, up: {m: 0.5 for m in summary.METRICS} | {  # noqa: E731
        "auc": auc, "running_bn_auc": auc + up}
    for row, up, per_seed in (("d2am", 0.05, ((0.8, 0.9), (0.7, 0.8), (0.9, 0.9))),
                              ("erm", 0.0, ((0.9, 0.8), (0.8, 0.9), (0.9, 1.0)))):
        for seed, aucs in enumerate(per_seed):
            _fake_run(tmp_path, row, seed, "done", [rec(a, up) for a in aucs])
    running = {r["last"]: r for r in spread.spreads(grid, str(tmp_path), 3, [1, 2],
                                                    "running_bn_auc")}
    assert running[2]["mean"] == pytest.approx(0.0) and running[2]["std"] == pytest.approx(5.0)
    summary.write(grid, str(tmp_path), seeds=3, last_n=2, command="cmd")
    assert "\nd2am,last2,running_bn_auc,3,0.883" in (tmp_path / "summary.csv").read_text()
    assert "d2am,2,last2,running_bn_auc,0.95" in (tmp_path / "summary_seeds.csv").read_text()
    got = {r["last"]: r for r in spread.spreads(grid, str(tmp_path), 3, [1, 2])}
    # final: erm − d2am = −0.1, 0.1, 0.1 → sd 0.11547; last 2: 0, 0.1, 0.05 → sd 0.05;
    # half-width t(0.975, 2) · sd / √3 with t = 4.302653.
    assert got[1]["std"] == pytest.approx(11.547, abs=1e-3)
    assert got[2]["mean"] == pytest.approx(5.0) and got[2]["std"] == pytest.approx(5.0)
    assert got[2]["half_width"] == pytest.approx(4.302653 * 5.0 / math.sqrt(3), abs=1e-4)
    # Seeds 1–2 only: final 0.1, 0.1 → sd 0; last 2: 0.1, 0.05 → mean 7.5, sd 3.5355.
    tail = {r["last"]: r for r in spread.spreads(grid, str(tmp_path), 3, [1, 2], first_seed=1)}
    assert tail[1]["n"] == 2 and tail[1]["std"] == pytest.approx(0.0, abs=1e-9)
    assert tail[2]["mean"] == pytest.approx(7.5)
    assert tail[2]["std"] == pytest.approx(3.5355, abs=1e-4)
    assert spread.main(["table3", "--workdir", str(tmp_path), "--seeds", "3",
                        "--rows", "d2am,erm", "--last", "1,2"]) == 0
    assert "| erm − d2am | 11.55 (28.68) | 5.00 (12.42) |" in capsys.readouterr().out
    assert spread.main(["table3", "--workdir", str(tmp_path), "--last", "0"]) == 2
    assert "--last '0': expected integers ≥ 1" in capsys.readouterr().err
    assert spread.main(["table3", "--workdir", str(tmp_path), "--seeds", "3",
                        "--first-seed", "3"]) == 2
    assert "--first-seed 3: expected 0 ≤ it < --seeds (3)" in capsys.readouterr().err


def _auc_runs(directory, table):
    """One finished run per (row, seed) whose every evaluation has AUC table[row][seed]."""
    rec = lambda auc: {m: 0.5 for m in summary.METRICS} | {"auc": auc, "is_best": True}  # noqa
    for row, per_seed in table.items():
        for seed, auc in enumerate(per_seed):
            if auc is not None:
                _fake_run(directory, row, seed, "done", [rec(auc)])


def test_grid_pooled_interval_by_hand_and_equal_to_the_paired_one_for_two_rows(tmp_path):
    grid = grids.get("table3", "d2am,erm,k2,k4")
    # Row means 0.01, 0.01, 0.04; seed means 0.01, 0.03; grand mean 0.02. Residuals
    # y − row mean − seed mean + grand: d2am 0, 0; erm +0.01, −0.01; k2 −0.01, +0.01 → residual
    # sum of squares 4e-4 over (3 − 1)(2 − 1) = 2 degrees of freedom: σ = 0.01 · √2. k2 − d2am:
    # mean 0.03 ± t(0.975, 2) · σ · √(2 / 2) = 4.302653 · 0.0141421 = 0.060849. k4 misses seed 1:
    # left out of the pool, and its pair with it.
    _auc_runs(tmp_path, {"d2am": (0.00, 0.02), "erm": (0.01, 0.01), "k2": (0.02, 0.06),
                         "k4": (0.5, None)})
    rows = summary.collect(grid, str(tmp_path), 2, 1)
    pool = summary.pooled(rows, "final", grid.pairs, "auc")
    assert sorted(pool["rows"]) == ["d2am", "erm", "k2"] and pool["left_out"] == ["k4"]
    assert pool["df"] == 2 and pool["sigma"] == pytest.approx(0.01 * math.sqrt(2))
    k2 = {q["row"]: q for q in pool["pairs"]}["k2"]
    assert set(q["row"] for q in pool["pairs"]) == {"erm", "k2"}
    assert k2["mean"] == pytest.approx(0.03)
    assert k2["hi"] - k2["mean"] == pytest.approx(0.060849, abs=1e-6)
    assert math.isnan(pool["levene_p"])      # 2 seeds: residuals ±e, Levene has no spread
    summary.write(grid, str(tmp_path), seeds=2, last_n=1, command="cmd")
    text = (tmp_path / "summary.md").read_text()
    assert "| final | auc | 3 | 2 | 1.41 | 2 | 6.08 | — | k4 |\n" in text
    assert "| k2 | d2am | auc | 3.00 [-3.08, 9.08] |" in text
    pooled_csv = (tmp_path / "summary_paired_pooled.csv").read_text().splitlines()
    assert pooled_csv[0].startswith("row,reference,evaluation,metric,rows_pooled,seeds,df,sigma")
    # Two rows: the pool's σ · √2 is the paired differences' own std, t has S − 1 degrees of
    # freedom, so the interval is the paired Student-t one.
    two = summary.collect(grids.get("table3", "d2am,k2"), str(tmp_path), 2, 1)
    alone = summary.pooled(two, "final", (("k2", "d2am"),), "auc")["pairs"][0]
    paired = [p for p in summary.paired(two, "final") if p["metric"] == "auc"][0]
    assert (alone["lo"], alone["hi"]) == pytest.approx((paired["lo"], paired["hi"]))
    assert summary.all_pooled(grids.get("table3", "d2am,k2"), two, 1) == []   # not repeated


def test_grid_pooled_levene_flags_a_row_with_larger_noise():
    rng = np.random.default_rng(0)

    def rows(scales):
        return [{"row": f"r{i}", "values": {"final": {s: {"auc": 0.8 + scale * e} for s, e in
                                                      enumerate(rng.standard_normal(12))}}}
                for i, scale in enumerate(scales)]

    assert summary.pooled(rows((0.01,) * 4), "final")["levene_p"] > 0.05
    assert summary.pooled(rows((0.01, 0.01, 0.01, 0.2)), "final")["levene_p"] < 0.01


def test_replicate_check_flags_a_pair_that_moved_between_halves(tmp_path, capsys):
    grid = grids.get("table3", "d2am,erm,k2")
    noise = (0.01, -0.01, 0.02, -0.02)
    base = {"d2am": 0.80, "erm": 0.82, "k2": 0.84}
    # Seeds 2–3 repeat seeds 0–1: every pair's mean difference is the same in both halves.
    same = {row: tuple(b + noise[(s + i) % 2] for s in (0, 1, 0, 1)) for i, (row, b)
            in enumerate(base.items())}
    _auc_runs(tmp_path / "same", same)
    check = spread.replicate_check(grid, str(tmp_path / "same"), 4, 1)
    assert check["pairs"] == 3 and check["pooled_z_variance"] == pytest.approx(0.0, abs=1e-12)
    assert check["pooled_outside"] == 0.0
    # k2 is 0.20 higher in seeds 2–3, far beyond the noise: its two pairs fall outside ±1.96.
    moved = dict(same, k2=same["k2"][:2] + tuple(v + 0.2 for v in same["k2"][2:]))
    _auc_runs(tmp_path / "moved", moved)
    check = spread.replicate_check(grid, str(tmp_path / "moved"), 4, 1)
    assert check["pooled_outside"] == pytest.approx(2 / 3)
    assert spread.main(["table3", "--workdir", str(tmp_path / "moved"), "--seeds", "4",
                        "--rows", "d2am,erm,k2", "--last", "1", "--replicate-check"]) == 0
    out = capsys.readouterr().out
    assert "| grid-pooled √2·σ (half-width) |" in out
    assert "3 pairs of rows" in out and "66.7 % outside" in out
    # Halves of one seed have no seed-to-seed noise to pool.
    assert spread.main(["table3", "--workdir", str(tmp_path / "moved"), "--seeds", "2",
                        "--rows", "d2am,erm,k2", "--last", "1", "--replicate-check"]) == 2
    assert "seeds 0–0 give no pool" in capsys.readouterr().err


# ----------------------------------------------------------------------------- grids and input


def test_grids_rows_build_and_pass_the_checks():
    assert [r.name for r in grids.get("table1").rows] == ["OCI_M", "OCM_I", "OMI_C", "ICM_O"]
    assert grids.get("table2").rows[1].paper == {"table": "Table 2", "hter_test_eer": 0.277,
                                                 "auc": 0.7536}
    assert len(grids.get("order_study").rows) == 2 * len(grids.ALPHAS) + 2
    for name in ("table3", "order_study"):
        for row in grids.get(name).rows:
            config = grids.build_config(SMOKE, row.overrides, seed=1)
            config_check.check(config)
    config = grids.build_config("d2am_jax/configs/protocols.py:MI_O",
                                grids.get("table2").rows[1].overrides, 0)
    assert config.data.protocol == "MI_O"


def test_command_line_overrides_take_the_type_of_the_field():
    """A string field keeps the text as written, whatever it looks like; others are literals."""
    base = grids.load_base("d2am_jax/configs/benchmark.py")
    user = grids.parse_overrides(["--config.data.source=0,1,2,4,5,6,32", "--config.data.target=3",
                                  "--config.data.synthetic.num_domains=38",
                                  "--config.meta.inner_lr=1e-3"], base)
    assert user == {"data.source": "0,1,2,4,5,6,32", "data.target": "3",
                    "data.synthetic.num_domains": 38, "meta.inner_lr": 1e-3}
    config = grids.build_config("d2am_jax/configs/benchmark.py", user, seed=0)
    config_check.check(config)
    assert (config.data.source, config.data.target) == ("0,1,2,4,5,6,32", "3")


@pytest.mark.parametrize("argv, message", [
    (["nogrid"], "unknown grid 'nogrid'"),
    (["table3", "--rows", "d2am,nope"], "no row(s) ['nope']"),
    (["table3", "--config.meta.nope=1"], "config.meta.nope is not a field"),
    (["table3", "--config.meta.inner_lr=abc"], "config.meta.inner_lr='abc' rejected"),
    (["table3", "--config.meta.lambda_p=-1"], "row 'd2am': config.meta.lambda_p: expected"),
])
def test_bad_input_is_one_error_before_anything_trains(argv, message, tmp_path, capsys):
    code = runner.main(argv + ["--base", SMOKE, "--seeds", "1", "--workdir", str(tmp_path)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_a_workdir_holding_another_config_is_refused(tmp_path, capsys):
    other = grids.build_config(SMOKE, {"meta.lambda_m": 0.5}, seed=0)  # not a resumable field
    os.makedirs(tmp_path / "d2am" / "seed_0")
    (tmp_path / "d2am" / "seed_0" / "config.json").write_text(other.to_json_best_effort())
    code = runner.main(["table3", "--rows", "d2am", "--base", SMOKE, "--seeds", "1",
                        "--workdir", str(tmp_path)])
    assert code == 2
    assert "holds a run with a different config" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "d2am" / "seed_0")) == ["config.json"]


# ----------------------------------------------------------------------------- records


def test_records_hold_both_hters_and_tpr_at_5pct():
    # Target: live scores .9 .8 .4, spoof .7 .3 .2 .1; source validation sets threshold 0.85.
    labels, scores = [1, 1, 1, 0, 0, 0, 0], [0.9, 0.8, 0.4, 0.7, 0.3, 0.2, 0.1]
    result = metrics.evaluate(labels, scores, val_labels=[1, 1, 0, 0],
                              val_scores=[0.9, 0.85, 0.5, 0.1])
    assert result["threshold"] == 0.85
    assert result["hter"] == pytest.approx((0 + 2 / 3) / 2)        # only .9 accepted
    # The target's own EER threshold (0.7 or 0.8) leaves one error per class or fewer.
    assert result["hter_test_eer"] == pytest.approx(metrics.hter(labels, scores,
                                                                 metrics.eer(labels, scores)[1]))
    assert result["hter_test_eer"] < result["hter"]
    assert result["tpr_at_fpr_5pct"] == pytest.approx(2 / 3)       # FPR 0 at threshold .8


def test_source_validation_floor():
    videos = np.repeat([f"v{i}" for i in range(40)], 2)           # 40 videos of 2 frames
    labels = np.repeat(np.arange(40) % 2, 2).astype(np.int32)     # 20 videos per class
    data = FasData(None, labels, None, videos, np.full(80, "d"), np.full(80, ""))
    held = lambda val: len(np.unique(videos[val]))                 # noqa: E731
    _, val = sources.source_val_split(data, 0.1, seed=0)          # share only: 2 per class
    assert held(val) == 4
    _, val = sources.source_val_split(data, 0.1, 0, min_videos=5)
    assert held(val) == 10
    _, val = sources.source_val_split(data, 0.1, 0, min_videos=1, min_frames=13)
    assert held(val) == 14                                         # 7 videos = 14 frames ≥ 13
    _, val = sources.source_val_split(data, 0.1, 0, min_videos=50)
    assert held(val) == 20                                         # the floor yields at half


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory):
    """A two-row grid on the smoke config, 2 seeds: D²AM, and a row whose runs fail (a target
    domain that does not exist), run by the runner as the command line does."""
    directory = str(tmp_path_factory.mktemp("grid"))
    grid = grids.Grid("smoke_grid", (grids.Row("d2am", {}, {}),
                                     grids.Row("bad_target", {"data.target": "9"}, {})), "test")
    runs = runner.plan(grid, SMOKE, 2, directory, SMALL)
    code = runner.run_grid(grid, runs, directory, 2, 1, 1, "test")
    return grid, runs, directory, code


def test_runner_runs_the_grid_reports_the_failure_and_skips_finished_runs(grid_dir):
    grid, runs, directory, code = grid_dir
    assert code == 1                                               # a row failed
    text = open(os.path.join(directory, "summary.md")).read()
    assert "bad_target seed 0: **failed** — UserError: config.data.target" in text
    rows = summary.collect(grid, directory, 2, 1)
    assert rows[0]["done"] == 2 and rows[1]["done"] == 0
    for seed in (0, 1):
        with open(os.path.join(summary.run_dir(directory, "d2am", seed), "results.json")) as f:
            record = json.load(f)[-1]
        for key in ("hter", "hter_test_eer", "tpr_at_fpr_1pct", "tpr_at_fpr_5pct", "is_best",
                    "val_num_live", "val_frames_spoof"):
            assert key in record
    assert runner.finished(runs[0]) and not runner.finished(runs[2])
    before = json.load(open(os.path.join(runs[0].workdir, "run.json")))
    runner.run_grid(grid, runs[:2], directory, 2, 1, 1, "test")  # the finished D²AM runs
    after = json.load(open(os.path.join(runs[0].workdir, "run.json")))
    assert after["attempts"] == before["attempts"]                 # skipped, not rerun
    more = grids.build_config(SMOKE, {**SMALL, "num_epochs": 2}, seed=0)
    runs[0].config = more                                          # a resumable change
    assert not runner.finished(runs[0])                            # reopens the run


def test_figures_from_a_finished_workdir(grid_dir, tmp_path):
    import figures
    _, runs, _, _ = grid_dir
    assert figures.main(["--workdir", runs[0].workdir, runs[1].workdir,
                         "--out", str(tmp_path)]) == 0
    made = set(os.listdir(tmp_path))
    for name in ("fig3_roc", "fig4ab_h_tsne", "fig4cd_d2am_seed_0", "fig5_d2am_seed_0",
                 "fig6_d2am_seed_0", "fig7_d2am_seed_0"):
        assert f"{name}.png" in made
    roc = (tmp_path / "fig3_roc.csv").read_text().splitlines()
    assert roc[0] == "run,fpr,tpr,threshold" and len({line.split(",")[0] for line in roc[1:]}) == 2
    fig7 = (tmp_path / "fig7_d2am_seed_0.csv").read_text().splitlines()
    assert fig7[0].startswith("epoch,mmd2_h_pseudo,mmd2_h_true,nmi_previous")
    measured = [line.split(",") for line in fig7[1:] if line.split(",")[1]]
    assert measured and all(math.isfinite(float(cells[1])) for cells in measured)
    h = np.load(tmp_path / "fig4ab_h_tsne.npz")
    assert h["run0_xy"].shape[1] == 2 and len(h["run0_xy"]) == len(h["run0_live"])


def test_figures_pool_the_colours_of_many_target_domains():
    import figures
    few = np.array(["0", "1", "target 3", "target 7"])
    assert figures.plotted_domains(few).tolist() == few.tolist()
    many = np.array(["0", "target 3"] + [f"target {d}" for d in range(7, 12)] + ["target 3"])
    assert figures.plotted_domains(many).tolist() == ["0"] + ["target (6 domains)"] * 7


def test_benchmark_config_is_locked_valid_and_documented():
    from d2am_jax.configs import benchmark, synthetic
    config = benchmark.get_config()
    config_check.check(config)
    with pytest.raises(AttributeError, match="nope"):
        config.nope = 1
    # Six sources and 26 pooled unseen targets (RESULTS.md: the paired spread over seeds falls
    # from 9.9 AUC points with two targets to 2.0 with 26).
    sources, targets = config.data.source.split(","), config.data.target.split(",")
    assert len(sources) == 6 and len(targets) == 26 and not set(sources) & set(targets)
    assert config.data.synthetic.num_domains == len(sources) + len(targets)
    assert config.model.to_dict() == synthetic.get_config().model.to_dict()  # the main job's net
    assert "python -m d2am_jax.main --config d2am_jax/configs/benchmark.py" in benchmark.__doc__
    assert "Expected run time" in benchmark.__doc__


def test_runner_grids_summary_and_spread_import_no_jax():
    import subprocess
    code = ("import sys; sys.path[:0] = ['experiments']\n"
            "import grids, run, spread, summary\n"
            "print([m for m in ('jax', 'jaxlib', 'flax') if m in sys.modules])\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_bn_check_running_auc_is_the_evaluations_frame_auc(grid_dir, tmp_path, capsys):
    """bn_check's `auc_running` is the AUC of exactly the scores evaluation computes (frame level,
    same checkpoint), and it reports the batch-statistics AUC beside it for every true domain."""
    import bn_check
    import figures
    from sklearn.metrics import roc_auc_score
    _, runs, _, _ = grid_dir
    out = tmp_path / "bn.csv"
    assert bn_check.main(["--workdir", runs[0].workdir, "--out", str(out)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["split"] for r in lines] == ["val", "target"]
    view = figures.RunView(runs[0].workdir)
    state, _ = view.state("latest")
    from d2am_jax import evaluation
    target = view.data.target
    scores = evaluation.scores(figures._jitted("predict", view.config), state, target,
                               int(view.config.eval.batch_size), int(view.config.data.resolution))
    assert lines[1]["auc_running"] == pytest.approx(roc_auc_score(target.labels, scores),
                                                    abs=1e-9)
    for d in set(np.asarray(target.domain).astype(str)):
        assert 0.0 <= lines[1][f"auc_domain_batches_domain_{d}"] <= 1.0
    assert out.read_text().splitlines()[0].startswith("checkpoint,")


def test_a_finished_run_stays_finished_when_the_project_adds_a_config_field(tmp_path):
    """run.json written before a field existed still counts as done (the field at its default),
    so the runner does not start it again; a row whose value differs from it reopens it."""
    grid = grids.get("table3", "d2am,pooled_bn")
    runs = runner.plan(grid, SMOKE, 1, str(tmp_path), SMALL)
    for run in runs:
        saved = config_check.as_dict(runs[0].config)   # the d2am row's config ...
        del saved["meta"]["batch_norm"]                 # ... from before meta.batch_norm
        os.makedirs(run.workdir)
        with open(os.path.join(run.workdir, "run.json"), "w") as f:
            json.dump({"status": "done", "config": saved}, f)
    assert runner.finished(runs[0])
    assert not runner.finished(runs[1])                 # pooled_bn ≠ the default


def test_a_moved_finished_run_stays_finished_and_a_stopped_start_is_preempted(tmp_path,
                                                                               monkeypatch):
    """Asked for again from another path (another compile-cache path) or with more input
    workers, a finished run is not reopened; other values of a resumable field that changes
    results (the learning rate) reopen it. A run stopped by a signal before it could report
    is recorded as preempted (resumed next time), not failed."""
    grid = grids.get("table3", "d2am")
    (run,) = runner.plan(grid, SMOKE, 1, str(tmp_path), SMALL)
    saved = config_check.as_dict(run.config)
    saved["jax_cache_dir"] = "/elsewhere/xla_cache"
    saved["data"]["workers"] = saved["data"]["workers"] + 2
    os.makedirs(run.workdir)
    with open(os.path.join(run.workdir, "run.json"), "w") as f:
        json.dump({"status": "done", "config": saved}, f)
    assert runner.finished(run)
    saved["meta"]["outer_lr"] = 2 * saved["meta"]["outer_lr"]
    with open(os.path.join(run.workdir, "run.json"), "w") as f:
        json.dump({"status": "done", "config": saved}, f)
    assert not runner.finished(run)

    class Stopped:                                    # a child killed by SIGTERM while starting
        returncode = -15

        def __init__(self, *args, **kwargs):
            pass

        def wait(self):
            return self.returncode

    monkeypatch.setattr(runner.subprocess, "Popen", Stopped)
    status = runner.execute(run)
    assert status["status"] == "preempted" and "signal 15" in status["error"]
    assert json.load(open(os.path.join(run.workdir, "run.json")))["attempts"][-1]["status"] \
        == "preempted"
