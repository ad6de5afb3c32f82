"""A thin layer over orbax's CheckpointManager: the last N checkpoints under <workdir>/checkpoints
and the best one (by a source-validation metric) under <workdir>/best.

Each checkpoint holds three items: 'state' (the TrainState: params, BatchNorm statistics, Adam
state, step, root key), 'domains' (pseudo_domain [n]: the labels of the epoch being trained, and the
previous labels that the next assignment aligns to) and 'meta' (JSON: the config and the run's
record, `train.RunState`). Saves are synchronous, so a state about to be donated to the next step
is never read while it is written. Orbax writes into a temporary directory and renames it when
complete; a directory left half-written by a killed process is never taken as a checkpoint (see
`finalized_steps`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from d2am_jax.errors import MissingFileError

log = logging.getLogger(__name__)

LATEST_DIR = "checkpoints"
BEST_DIR = "best"


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


def finalized_steps(directory: str) -> list[int]:
    """Steps of the complete checkpoints in `directory`, ascending. Temporary directories of an
    interrupted save, and step directories without orbax's completion marker, are skipped (and
    logged)."""
    if not os.path.isdir(directory):
        return []
    steps = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if not os.path.isdir(path):
            continue
        if not name.isdigit():
            if ocp.step.is_tmp_checkpoint(path):
                log.warning("ignoring the half-written checkpoint directory %s", path)
            continue
        if not ocp.step.is_path_finalized(path) or not os.path.exists(
            os.path.join(path, "_CHECKPOINT_METADATA")
        ):
            log.warning(
                "ignoring the incomplete checkpoint directory %s (no completion marker)", path
            )
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
                target = path + ".incomplete"
                suffix = 0
                while os.path.exists(target):
                    suffix += 1
                    target = f"{path}.incomplete{suffix}"
                os.rename(path, target)

    def save(
        self, step: int, state, pseudo_domain: np.ndarray, meta: dict, *, best: bool = False
    ) -> None:
        """Writes checkpoint `step` (and, with best=True, also replaces the best one)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            domains=ocp.args.StandardSave({"pseudo_domain": np.asarray(pseudo_domain, np.int32)}),
            meta=ocp.args.JsonSave(meta),
        )
        managers = [self._latest] + ([self._best] if best else [])
        for manager in managers:
            if step in manager.all_steps():
                manager.delete(step)  # a re-save of the same step (e.g. after evaluation)
            manager.save(step, args=args, force=True)
            manager.wait_until_finished()

    def latest_step(self) -> int | None:
        steps = finalized_steps(self.latest_dir)
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        steps = finalized_steps(self.best_dir)
        return steps[-1] if steps else None

    def restore(self, state_target, *, which: str = "latest", step: int | None = None) -> Restored:
        """The checkpoint `step` (default: the newest complete one) of 'latest' or 'best'.

        state_target: a TrainState of the right structure (e.g. `state.init_state`), or None.
        """
        manager = {"latest": self._latest, "best": self._best}[which]
        directory = {"latest": self.latest_dir, "best": self.best_dir}[which]
        if step is None:
            steps = finalized_steps(directory)
            if not steps:
                raise MissingFileError(f"no complete checkpoint in {directory}")
            step = steps[-1]
        # Without a target the state comes back as nested dicts of arrays (enough to predict).
        abstract = None if state_target is None else _abstract(state_target)
        out = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                domains=ocp.args.StandardRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return Restored(
            step=int(step),
            state=out["state"],
            pseudo_domain=np.asarray(out["domains"]["pseudo_domain"], np.int32),
            meta=dict(out["meta"]),
        )

    def read_meta(self, which: str = "best") -> tuple[int, dict]:
        """(step, meta JSON) of the newest complete checkpoint of 'best' (or 'latest'), without
        reading arrays (prediction needs the config before it can build a state)."""
        manager = {"latest": self._latest, "best": self._best}[which]
        directory = {"latest": self.latest_dir, "best": self.best_dir}[which]
        steps = finalized_steps(directory)
        if not steps:
            raise MissingFileError(f"no complete checkpoint in {directory}")
        out = manager.restore(steps[-1], args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return steps[-1], dict(out["meta"])

    def close(self) -> None:
        self._latest.close()
        self._best.close()


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
