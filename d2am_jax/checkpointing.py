"""A thin layer over orbax's CheckpointManager: the last N checkpoints under <workdir>/checkpoints
and the best one (by a source-validation metric) under <workdir>/best.

Each checkpoint holds three items: 'state' (the TrainState: params, BatchNorm statistics, Adam
state, step, root key), 'domains' (pseudo_domain [n]: the labels of the epoch being trained, and the
previous labels that the next assignment aligns to) and 'meta' (JSON: the config and the run's
record, `train.RunState`). Saves are synchronous, so a state about to be donated to the next step
is never read while it is written. Orbax writes into a temporary directory and renames it when
complete; a directory left half-written by a killed process is never taken as a checkpoint (see
`finalized_steps`). A complete checkpoint that no longer restores (a truncated or deleted file) is
skipped for the newest one that does, and moved aside like a half-written one (`<step>.incomplete`).
A save the file system refuses (a full disk: OSError, or tensorstore's ValueError with the OS
error code) is one `UserError` naming the directory, orbax's logged tracebacks held back; the
checkpoints already written stay.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import logging
import os
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from d2am_jax.errors import MissingFileError, UserError

log = logging.getLogger(__name__)

LATEST_DIR = "checkpoints"
BEST_DIR = "best"


class CheckpointWriteError(UserError):
    """The file system refused a checkpoint (full disk, quota, permission); earlier ones stay."""


@dataclasses.dataclass
class Restored:
    """One checkpoint read back: the train state, host arrays and the JSON metadata."""

    step: int
    state: Any
    pseudo_domain: np.ndarray
    meta: dict


def _manager(directory: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(
        directory, options=options, item_names=("state", "domains", "meta")
    )


def _read_manager(directory: str) -> ocp.CheckpointManager:
    """A manager that only reads (prediction): creates no directory, and knows each item's handler
    so that a partial restore of the state and its metadata need no saved-handler record."""
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "domains": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _move_aside(path: str) -> str:
    """Renames a step directory to `<step>.incomplete` (or `.incompleteN` if taken): kept for a
    look, but neither listed by orbax nor in the way of a later save of the same step."""
    target = path + ".incomplete"
    suffix = 0
    while os.path.exists(target):
        suffix += 1
        target = f"{path}.incomplete{suffix}"
    os.rename(path, target)
    return target


def _reason(error: BaseException) -> str:
    """An exception as one short line: orbax's messages run over many lines."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return f"{type(error).__name__}: {text[:300]}"


def _storage_error(error: BaseException) -> bool:
    """A write the file system refused (full disk, quota, lost mount, permission): an OSError, or
    tensorstore's ValueError that carries the OS error code."""
    return isinstance(error, OSError) or "os_error_code=" in str(error)


def _storage_reason(error: BaseException) -> str:
    text = str(error)
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or \
            "No space left on device" in text:
        return "no space left on device"
    return _reason(error)


class _HeldErrors(logging.Filter):
    """What orbax and tensorstore report besides the exception while a save fails: ERROR records
    with tracebacks from orbax's writer threads (through absl's logger) and, from tensorstore's
    callbacks into orbax's closed event loops, "Event loop is closed" unraisable exceptions (about
    200 lines on a full disk). Held while the save runs; `release` passes them on, otherwise they
    are dropped with the save's one-line error."""

    def __init__(self, logger: logging.Logger):
        super().__init__()
        self.logger, self.records, self.unraisable = logger, [], []
        self.previous_hook = sys.unraisablehook

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            self.records.append(record)
            return False
        return True

    def release(self) -> None:
        self.logger.removeFilter(self)
        sys.unraisablehook = self.previous_hook
        records, self.records = self.records, []
        unraisable, self.unraisable = self.unraisable, []
        for record in records:
            self.logger.handle(record)
        for item in unraisable:
            self.previous_hook(item)


def _settle(manager: ocp.CheckpointManager) -> None:
    """After a failed save: lets orbax's writer threads end and collects their abandoned
    coroutines now, while their reports are held, rather than at exit, where they would print."""
    try:
        manager.wait_until_finished()
    except Exception:  # the same failure again, already being reported
        pass
    gc.collect()


@contextlib.contextmanager
def _held_library_errors():
    logger = logging.getLogger("absl")  # orbax logs through absl
    held = _HeldErrors(logger)
    logger.addFilter(held)
    sys.unraisablehook = held.unraisable.append
    try:
        yield held
    finally:
        logger.removeFilter(held)
        sys.unraisablehook = held.previous_hook


def newest_that_restores(directory: str, read, *, move_aside: bool, warn: bool = True):
    """(step, read(step)) for the newest complete checkpoint in `directory` that `read` restores.

    Newer ones that fail are skipped with a warning (warn=True) naming the step and the error,
    and with move_aside=True moved to `<step>.incomplete`. When none restores nothing is moved
    (the cause may be the program or the config, not the files) and UserError lists each failure.
    """
    steps = finalized_steps(directory)
    if not steps:
        raise MissingFileError(f"no complete checkpoint in {directory}")
    failures = []
    for step in reversed(steps):
        try:
            value = read(step)
        # Orbax reports a damaged file as whatever its reader hit (ValueError, OSError, KeyError,
        # JSONDecodeError, tensorstore's errors): any Exception means "does not restore".
        except Exception as e:
            failures.append((step, _reason(e)))
            continue
        for bad, reason in failures:
            path = os.path.join(directory, str(bad))
            where = f"moved to {_move_aside(path)}" if move_aside else "skipped"
            if warn:
                log.warning("checkpoint step %d in %s does not restore (%s); %s, using step %d",
                            bad, directory, reason, where, step)
        return step, value
    listed = "; ".join(f"step {step}: {reason}" for step, reason in failures)
    raise UserError(f"no checkpoint in {directory} restores ({listed}); use a new workdir, or "
                    f"move the damaged step directories away")


def finalized_steps(directory: str, *, warn: bool = True) -> list[int]:
    """Steps of the complete checkpoints in `directory`, ascending. Temporary directories of an
    interrupted save, and step directories without orbax's completion marker, are skipped (and
    logged, with warn=True)."""
    if not os.path.isdir(directory):
        return []
    steps = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not os.path.isdir(path):
            continue
        if not name.isdigit():
            if warn and ocp.step.is_tmp_checkpoint(path):
                log.warning("ignoring the half-written checkpoint directory %s", path)
            continue
        if not ocp.step.is_path_finalized(path) or not os.path.exists(
            os.path.join(path, "_CHECKPOINT_METADATA")
        ):
            if warn:
                log.warning("ignoring the incomplete checkpoint directory %s (no completion "
                            "marker)", path)
            continue
        steps.append(int(name))
    return sorted(steps)


class Checkpointer:
    """Saves and restores D²AM runs in a workdir (keep: how many recent checkpoints stay)."""

    def __init__(self, workdir: str, keep: int):
        self.workdir = workdir
        self.latest_dir = os.path.join(os.path.abspath(workdir), LATEST_DIR)
        self.best_dir = os.path.join(os.path.abspath(workdir), BEST_DIR)
        self._quarantine(self.latest_dir)
        self._quarantine(self.best_dir)
        self._latest = _manager(self.latest_dir, keep)
        self._best = _manager(self.best_dir, 1)

    @staticmethod
    def _quarantine(directory: str) -> None:
        """Moves step directories lacking the completion marker aside (to `<step>.incomplete`),
        so that orbax neither lists them nor later refuses to write the same step."""
        if not os.path.isdir(directory):
            return
        complete = set(finalized_steps(directory))
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if name.isdigit() and os.path.isdir(path) and int(name) not in complete:
                _move_aside(path)

    def save(
        self, step: int, state, pseudo_domain: np.ndarray, meta: dict, *, best: bool = False
    ) -> None:
        """Writes checkpoint `step` (and, with best=True, also replaces the best one)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            domains=ocp.args.StandardSave({"pseudo_domain": np.asarray(pseudo_domain, np.int32)}),
            meta=ocp.args.JsonSave(meta),
        )
        # best/ first: the latest checkpoint's record says which step is best, so it is written
        # only once best/ holds that step (a failed best save then redoes the steps since).
        managers = ([(self._best, self.best_dir)] if best else []) + [
            (self._latest, self.latest_dir)]
        for manager, directory in managers:
            with _held_library_errors() as held:
                try:
                    if step in manager.all_steps():
                        manager.delete(step)  # a re-save of the same step (after evaluation)
                    manager.save(step, args=args, force=True)
                    manager.wait_until_finished()
                except Exception as e:
                    if not _storage_error(e):
                        held.release()  # a bug: everything orbax said is worth reading
                        raise
                    _settle(manager)
                    raise CheckpointWriteError(
                        f"could not write checkpoint step {step} in {directory}: "
                        f"{_storage_reason(e)}; {self._kept()}") from e
                held.release()

    def _kept(self) -> str:
        steps = finalized_steps(self.latest_dir, warn=False)  # the failed save's leftovers
        kept = steps[-1] if steps else None
        if kept is None:
            return "no checkpoint had been saved before"
        return (f"the last good checkpoint, step {kept} in {self.latest_dir}, is kept: free space "
                f"and rerun with the same workdir to resume from it")

    def latest_step(self) -> int | None:
        steps = finalized_steps(self.latest_dir)
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        steps = finalized_steps(self.best_dir)
        return steps[-1] if steps else None

    def restore(self, state_target, *, which: str = "latest", step: int | None = None) -> Restored:
        """The checkpoint `step` of 'latest' or 'best'; by default the newest complete one that
        restores (newer damaged ones are moved aside, see `newest_that_restores`).

        state_target: a TrainState of the right structure (e.g. `state.init_state`), or None.
        """
        manager = {"latest": self._latest, "best": self._best}[which]
        directory = {"latest": self.latest_dir, "best": self.best_dir}[which]
        # Without a target the state comes back as nested dicts of arrays.
        abstract = None if state_target is None else _abstract(state_target)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            domains=ocp.args.StandardRestore(),
            meta=ocp.args.JsonRestore(),
        )
        if step is None:
            step, out = newest_that_restores(directory, lambda s: manager.restore(s, args=args),
                                             move_aside=True)
            manager.reload()  # forget the steps moved aside
        else:
            out = manager.restore(step, args=args)
        return Restored(
            step=int(step),
            state=out["state"],
            pseudo_domain=np.asarray(out["domains"]["pseudo_domain"], np.int32),
            meta=dict(out["meta"]),
        )

    def read_meta(self, which: str = "best") -> tuple[int, dict]:
        """(step, meta JSON) of the newest complete checkpoint of 'best' (or 'latest') whose
        metadata reads, without reading arrays (a resume checks the config before it builds the
        state to restore into). Skips damaged ones quietly: `restore` reports and moves them."""
        manager = {"latest": self._latest, "best": self._best}[which]
        directory = {"latest": self.latest_dir, "best": self.best_dir}[which]
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        step, out = newest_that_restores(directory, lambda s: manager.restore(s, args=args),
                                         move_aside=False, warn=False)
        return step, dict(out["meta"])

    def close(self) -> None:
        self._latest.close()
        self._best.close()


def read_for_prediction(workdir: str) -> tuple[str, Restored]:
    """('best' or 'latest', what prediction needs from a workdir), read without writing there:
    params and BatchNorm statistics (an orbax partial restore: not the Adam moments) and the
    metadata, from the newest checkpoint of best/ that restores, else of checkpoints/. A damaged
    one is skipped with a warning, not moved (a reader leaves a run's files alone)."""
    failures = []
    for which, name in (("best", BEST_DIR), ("latest", LATEST_DIR)):
        directory = os.path.join(workdir, name)
        if not finalized_steps(directory):
            continue
        manager = _read_manager(directory)
        try:
            step, out = newest_that_restores(
                directory, lambda s: _restore_for_prediction(manager, s), move_aside=False)
        except UserError as e:
            log.warning("%s; trying the next directory", e)
            failures.append(str(e))
            continue
        finally:
            manager.close()
        return which, Restored(step=int(step), state=out["state"],
                               pseudo_domain=np.zeros(0, np.int32), meta=dict(out["meta"]))
    if failures:
        raise UserError("; ".join(failures))
    raise MissingFileError(f"{workdir}: no checkpoint in {os.path.join(workdir, BEST_DIR)} or "
                           f"{os.path.join(workdir, LATEST_DIR)}; train first with d2am_jax.main")


def _restore_for_prediction(manager: ocp.CheckpointManager, step: int) -> dict:
    """The metadata and the state's params and batch_stats only, as host arrays."""
    saved = manager.item_metadata(step)["state"].tree
    wanted = {key: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved[key])
              for key in ("params", "batch_stats")}
    as_numpy = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(restore_type=np.ndarray), wanted)
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(wanted, restore_args=as_numpy, partial_restore=True),
        meta=ocp.args.JsonRestore()))


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
