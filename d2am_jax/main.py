"""Command line of the training program: an absl app that reads an ml_collections config file
(locked: a misspelled --config.FIELD fails with its name) and runs `train.train_and_evaluate`.

  python -m d2am_jax.main --config d2am_jax/configs/synthetic.py --workdir DIR [--config.F=V ...]

A mistake in the user's config, data or files (`errors.UserError`) or a non-finite loss prints one
line, as do a misspelled --config.FIELD and a config file that cannot be loaded (absl parses those
before main runs: `parse_flags`); anything else is a bug and keeps its traceback.
"""

import json
import logging as std_logging
import os
import sys

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from d2am_jax import checkpointing, errors, logs, runtime, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (d2am_jax/configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, results. The same "
                    "workdir resumes the run.")
flags.DEFINE_string("coordinator_address", None, "Multi-process runs: HOST:PORT of process 0 "
                    "(jax.distributed); omit on SLURM / TPU VMs, where jax finds the cluster.")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: the number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.")
flags.DEFINE_integer("initialization_timeout", 300, "Multi-process runs: seconds the coordinator "
                     "(process 0) waits for all --num_processes processes to join.")
flags.mark_flags_as_required(["config", "workdir"])


def _innermost(error: BaseException) -> str:
    """The message of an exception that may wrap another as its argument (ml_collections wraps
    a KeyError in an AttributeError)."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    return str(error.args[0]) if error.args else str(error)


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def _unknown_field(argv: list[str], error: BaseException) -> str | None:
    """'--config.meta.inner_lrr: the config has no field 'inner_lrr' (Did you mean ...?)', or
    None when no --config.FIELD override names the missing field (then it is not the user's)."""
    lines = [line.strip().strip("'\"") for line in _innermost(error).splitlines() if line.strip()]
    field, hint = (lines[0] if lines else "?"), " ".join(lines[1:])
    names = [arg.split("=")[0] for arg in argv if arg.startswith("--config.")]
    flag = next((n for n in names if field in n.split(".")), None)
    if flag is None:
        return None
    return f"{flag}: the config has no field {field!r}" + (f" ({hint})" if hint else "")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (its own usage errors unchanged), with the config's mistakes as one line:
    ml_collections raises a plain AttributeError for a --config.FIELD the config lacks, and leaves
    a stand-in that raises OSError in place of a config file it could not load."""
    try:
        rest = app.parse_flags_with_usage(argv)
        config = FLAGS.config
        if not isinstance(config, ml_collections.ConfigDict):
            config.lock()  # the stand-in: raises the loading error
    except (AttributeError, KeyError) as e:
        message = _unknown_field(argv, e)
        if message is None:
            raise  # e.g. a bug inside the config file's get_config: its traceback says where
        _fail(message)
    except OSError as e:
        last = str(e.__cause__ or e).strip().splitlines()[-1].strip()
        _fail(f"--config: cannot load the config file: {last}")
    return rest


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Our progress lines at INFO; the libraries' (orbax logs every save) only from WARNING on.
    logging.set_verbosity(logging.WARNING)
    std_logging.getLogger("d2am_jax").setLevel(std_logging.INFO)
    try:
        runtime.start_processes(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                FLAGS.initialization_timeout)
        summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except checkpointing.CheckpointWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        # Ends here, not through the interpreter's shutdown: orbax's writer coroutines that the
        # failed save abandoned would print a traceback each (hundreds of lines) as it closes them.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
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
    app.run(main, flags_parser=parse_flags)
