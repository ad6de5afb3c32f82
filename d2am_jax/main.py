"""Command line of the training program: an absl app that reads an ml_collections config file
(locked: a misspelled --config.FIELD fails with its name) and runs `train.train_and_evaluate`.

  python -m d2am_jax.main --config d2am_jax/configs/synthetic.py --workdir DIR [--config.F=V ...]

A mistake in the user's config, data or files (`errors.UserError`) or a non-finite loss prints one
line; anything else is a bug and keeps its traceback.
"""

import json
import logging as std_logging
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from d2am_jax import errors, logs, runtime, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (d2am_jax/configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, results. The same "
                    "workdir resumes the run.")
flags.DEFINE_string("coordinator_address", None, "Multi-process runs: HOST:PORT of process 0 "
                    "(jax.distributed); omit on SLURM / TPU VMs, where jax finds the cluster.")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: the number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Our progress lines at INFO; the libraries' (orbax logs every save) only from WARNING on.
    logging.set_verbosity(logging.WARNING)
    std_logging.getLogger("d2am_jax").setLevel(std_logging.INFO)
    try:
        runtime.start_processes(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (errors.UserError, logs.NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() != 0:
        return 0
    status = "preempted (SIGTERM): checkpoint saved" if summary["preempted"] else "done"
    print(json.dumps({"status": status, "workdir": summary["workdir"],
                      "global_step": summary["global_step"], "last": summary["last"]}))
    return 0


if __name__ == "__main__":
    app.run(main)
