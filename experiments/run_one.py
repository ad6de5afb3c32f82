"""One (row, seed) run of a grid, in its own process: builds the row's config, trains (or resumes)
in the workdir, and writes child.json (status, error, peak memory) for the runner.

  python experiments/run_one.py --base CONFIG --overrides JSON --seed S --workdir DIR
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]  # this checkout's d2am_jax

import grids  # noqa: E402


def _peak_device_bytes() -> int | None:
    """The accelerator's peak bytes in use, where the backend reports it (CPU: None)."""
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", required=True)
    parser.add_argument("--overrides", default="{}")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    status = {"status": "failed", "error": "", "global_step": None}
    t0 = time.time()
    try:
        from d2am_jax import errors, logs, train
        config = grids.build_config(args.base, json.loads(args.overrides), args.seed)
        try:
            summary = train.train_and_evaluate(config, args.workdir)
            status.update(status="preempted" if summary["preempted"] else "done",
                          global_step=summary["global_step"])
        except (errors.UserError, logs.NonFiniteLossError) as err:
            status["error"] = f"{type(err).__name__}: {err}"
        status["peak_device_bytes"] = _peak_device_bytes()
    except Exception as err:  # a bug or a crash: reported to the summary, traceback in the log
        traceback.print_exc()
        status["error"] = f"{type(err).__name__}: {err}"
    # ru_maxrss is in KiB on Linux: the process's peak resident memory, compile included.
    status["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    status["seconds"] = time.time() - t0
    with open(os.path.join(args.workdir, "child.json"), "w") as f:
        json.dump(status, f)
    return 0 if status["status"] != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
