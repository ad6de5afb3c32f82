"""Runs an experiment grid over seeds, each (row, seed) an ordinary resumable training workdir, and
writes DIR/summary.md and the CSVs beside it (experiments/summary.py).

  python experiments/run.py GRID --base CONFIG --seeds N --workdir DIR [--rows a,b]
      [--last 3] [--jobs 1] [--summarize] [--config.FIELD=VALUE ...]

GRID: table1, table2, table3, order_study (experiments/grids.py). Runs live in DIR/ROW/seed_S;
finished ones are skipped (also when asked for from a moved DIR or with other input settings:
config_check.NOT_A_RESULT), interrupted ones resume, failed ones are retried; a failed run is
reported in the summary and the other runs still go on. Every row's config is built and checked
(d2am_jax/config_check.py, and against the config of any run already in its workdir) before
anything trains. Each run is its own process (experiments/run_one.py): a crash or out-of-memory
in one run cannot take the grid down, its peak memory is its own, and no jax state leaks between
runs; the price is a process start and jax import per run (BENCHMARKS.md, "Experiment runner").
`--summarize` writes the summary of the runs finished so far and runs nothing (a grid still
running elsewhere, or rows run with different --seeds: the unfinished ones are listed as such).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]  # this checkout's d2am_jax, and the experiments' modules

import grids  # noqa: E402
import summary  # noqa: E402

from d2am_jax import config_check  # noqa: E402
from d2am_jax.errors import UserError  # noqa: E402

# SIGTERM to the runner goes on to the running runs (each saves a checkpoint and stops, reported
# as preempted) and no further run starts; rerunning the command resumes them.
_STOP = threading.Event()
_ACTIVE: set = set()


def _forward_sigterm(signum, frame) -> None:
    _STOP.set()
    for proc in list(_ACTIVE):
        proc.send_signal(signal.SIGTERM)


class Run:
    """One (row, seed): its config overrides, its workdir and its config as plain data."""

    def __init__(self, row: grids.Row, seed: int, overrides: dict, directory: str, base: str):
        self.row, self.seed, self.overrides, self.base = row, seed, overrides, base
        self.workdir = summary.run_dir(directory, row.name, seed)
        self.config = None

    @property
    def name(self) -> str:
        return f"{self.row.name}/seed_{self.seed}"


def plan(grid: grids.Grid, base: str, seeds: int, directory: str, user: dict) -> list[Run]:
    """Every run of the grid with its config built and checked; UserError before anything
    trains for a rejected override, a config that fails its checks, or a workdir holding a run
    of another config."""
    runs = []
    # One persistent XLA cache for the grid: a row's seeds (and rows of the same network and
    # shapes) compile once instead of once per run; the executables, hence results, are the same.
    user = {"jax_cache_dir": os.path.join(os.path.abspath(directory), "xla_cache"), **user}
    for row in grid.rows:
        for seed in range(seeds):
            run = Run(row, seed, {**user, **row.overrides}, directory, base)
            try:
                run.config = grids.build_config(base, run.overrides, seed)
                config_check.check(run.config)
            except UserError as err:
                raise UserError(f"grid {grid.name!r} row {row.name!r}: {err}") from None
            _check_workdir(run)
            runs.append(run)
    return runs


def _check_workdir(run: Run) -> None:
    saved = os.path.join(run.workdir, "config.json")
    if os.path.exists(saved):
        with open(saved) as f:
            config_check.resumable_changes(json.load(f), run.config, run.workdir)


def _status(run: Run) -> dict:
    path = os.path.join(run.workdir, "run.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def finished(run: Run) -> bool:
    """Done, with the same config (a resumable change such as more epochs reopens the run; a
    field that changes no result, such as the compile cache's path, does not)."""
    status = _status(run)
    # A field added to the project since counts as its default (the run's behaviour then).
    return status.get("status") == "done" and "config" in status and \
        config_check.same_results(status["config"], run.config)


def execute(run: Run) -> dict:
    """Runs (or resumes) one run in its own process; run.json accumulates its attempts."""
    if _STOP.is_set():
        return {"status": "not started", "seconds": 0.0, "error": "the runner was stopped"}
    os.makedirs(run.workdir, exist_ok=True)
    child = os.path.join(run.workdir, "child.json")
    if os.path.exists(child):
        os.remove(child)
    command = [sys.executable, os.path.join(HERE, "run_one.py"), "--base", run.base,
               "--overrides", json.dumps(run.overrides), "--seed", str(run.seed),
               "--workdir", run.workdir]
    t0 = time.time()
    with open(os.path.join(run.workdir, "run.log"), "a") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _ACTIVE.add(proc)
        proc.wait()
        _ACTIVE.discard(proc)
    seconds = time.time() - t0
    result = {"status": "failed", "error": f"the run's process exited with code "
              f"{proc.returncode} and no report (see {run.workdir}/run.log)"}
    if proc.returncode in (-signal.SIGTERM, -signal.SIGINT):
        # Stopped before it could report (e.g. while starting): nothing of it failed, and the
        # next invocation resumes it from its last checkpoint like any preempted run.
        result = {"status": "preempted", "error": f"stopped by signal {-proc.returncode} "
                  f"before it reported (see {run.workdir}/run.log)"}
    if os.path.exists(child):
        with open(child) as f:
            result = json.load(f)
    previous = _status(run)
    attempts = previous.get("attempts", []) + [{"seconds": seconds, **result}]
    status = {"status": result["status"], "error": result.get("error", ""),
              "seconds": sum(a["seconds"] for a in attempts),
              "peak_rss_bytes": max((a.get("peak_rss_bytes") or 0) for a in attempts) or None,
              "peak_device_bytes": result.get("peak_device_bytes"),
              "config": config_check.as_dict(run.config), "attempts": attempts}
    with open(os.path.join(run.workdir, "run.json"), "w") as f:
        json.dump(status, f, indent=1)
    return status


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)  # a misspelled option is an error, never another option
    parser.add_argument("grid", help=f"one of {sorted(grids.GRIDS)}")
    parser.add_argument("--base", required=True, help="config file[:arg], e.g. "
                        "d2am_jax/configs/synthetic.py or d2am_jax/configs/protocols.py:OCM_I")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per row")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--rows", default="", help="comma-separated subset of the grid's rows")
    parser.add_argument("--last", type=int, default=3, help="N of 'mean of the last N evaluations'")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (processes)")
    parser.add_argument("--summarize", action="store_true",
                        help="write the summary of the finished runs; run nothing")
    args, rest = parser.parse_known_args(argv)
    if args.seeds < 1 or args.last < 1 or args.jobs < 1:
        raise UserError("--seeds, --last and --jobs: expected integers ≥ 1")
    return args, grids.parse_overrides(rest, grids.load_base(args.base))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, user = parse_args(argv)
        grid = grids.get(args.grid, args.rows)
        directory = os.path.abspath(args.workdir)
        runs = plan(grid, args.base, args.seeds, directory, {"progress": False, **user})
        if args.summarize and not os.path.isdir(directory):
            raise UserError(f"--summarize: {directory}: no such workdir (nothing has run there)")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    command = "python experiments/run.py " + shlex.join(argv)
    if args.summarize:
        rows = summary.write(grid, directory, args.seeds, args.last, command)
        done = sum(entry["done"] for entry in rows)
        print(f"{grid.name}: {done} of {len(runs)} runs done; wrote {directory}/summary.md and "
              "its CSVs (nothing run)", flush=True)
        return 0
    return run_grid(grid, runs, directory, args.seeds, args.last, args.jobs, command)


def run_grid(grid: grids.Grid, runs: list[Run], directory: str, seeds: int, last: int,
             jobs: int, command: str) -> int:
    """Runs what is not finished (`jobs` side by side), then writes the summary; 1 if any run
    failed (the summary says which and why), else 0."""
    os.makedirs(directory, exist_ok=True)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _forward_sigterm) if main_thread else None
    todo = [r for r in runs if not finished(r)]
    print(f"{grid.name}: {len(runs)} runs, {len(runs) - len(todo)} already finished",
          flush=True)
    try:
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            for run, status in zip(todo, pool.map(execute, todo)):
                print(f"{run.name}: {status['status']} ({status['seconds']:.1f} s) "
                      f"{status.get('error', '')}", flush=True)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    summary.write(grid, directory, seeds, last, command)
    print(f"wrote {directory}/summary.md and its CSVs", flush=True)
    failed = [r for r in runs if _status(r).get("status") != "done"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
