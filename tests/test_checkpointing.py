"""Checkpoints: exact round trip of the train state and host arrays, last-N retention, the best
slot, half-written directories ignored on restart, a damaged newest checkpoint skipped for the
previous one, a full disk as one clear error, prediction's partial read."""

import errno
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import tiny_config

from d2am_jax import checkpointing
from d2am_jax import state as state_lib
from d2am_jax.errors import MissingFileError, UserError


@pytest.fixture(scope="module")
def state():
    return state_lib.init_state(tiny_config(resolution=16, width=0.0625, adaptation_dim=4),
                           jax.random.PRNGKey(3))


def _same(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x),
                                                                        np.asarray(y)), a, b)))


def test_round_trip_is_exact(state, tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2)
    pseudo = np.array([0, 2, 1, 1, 0], np.int32)
    meta_json = {"k": 3, "steps_per_epoch": 2, "results": [{"hter": 0.25}]}
    ckpt.save(4, state, pseudo, meta_json)
    restored = ckpt.restore(state)
    assert restored.step == 4
    assert type(restored.state) is type(state) and _same(restored.state, state)
    np.testing.assert_array_equal(restored.pseudo_domain, pseudo)
    assert restored.meta == meta_json
    ckpt.close()


def test_keeps_last_n_and_the_best(state, tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2)
    for step in (1, 2, 3, 4):
        ckpt.save(step, state, np.zeros(3, np.int32), {"step": step},
                  best=step == 2)
    assert checkpointing.finalized_steps(ckpt.latest_dir) == [3, 4]
    assert ckpt.best_step() == 2
    assert ckpt.read_meta("best") == (2, {"step": 2})
    ckpt.close()


def test_half_written_checkpoints_are_ignored(state, tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=3)
    ckpt.save(2, state, np.zeros(3, np.int32), {"step": 2})
    ckpt.close()
    latest = tmp_path / checkpointing.LATEST_DIR
    # What a process killed while saving leaves: orbax's temporary directory, and a step
    # directory without the completion marker.
    (latest / "5.orbax-checkpoint-tmp-1700000000" / "state").mkdir(parents=True)
    (latest / "7" / "state").mkdir(parents=True)
    (latest / "7" / "state" / "garbage").write_text("partial")

    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=3)
    assert ckpt.latest_step() == 2
    assert ckpt.restore(state).meta == {"step": 2}
    ckpt.save(7, state, np.ones(3, np.int32), {"step": 7})
    assert ckpt.latest_step() == 7 and ckpt.restore(state).meta == {"step": 7}
    assert (latest / "7.incomplete" / "state" / "garbage").exists()  # moved aside, not deleted
    ckpt.close()


def test_restore_without_checkpoint_names_the_directory(state, tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=1)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ckpt.restore(state)
    ckpt.close()


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(max(1, path.stat().st_size // 2))


def _damage(step_dir, kind):
    """What a crash, a full disk or a careless `rm` leaves in a checkpoint orbax had finalized."""
    if kind == "truncated array data":
        for path in (step_dir / "state" / "d").iterdir():
            _truncate(path)
    elif kind == "deleted tree metadata":
        (step_dir / "state" / "_METADATA").unlink()
    elif kind == "truncated meta JSON":
        _truncate(step_dir / "meta" / "metadata")


@pytest.mark.parametrize("kind", ["truncated array data", "deleted tree metadata",
                                  "truncated meta JSON"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(state, tmp_path, caplog,
                                                                    kind):
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=3)
    for step in (2, 4):
        ckpt.save(step, state, np.full(3, step, np.int32), {"step": step})
    ckpt.close()
    latest = tmp_path / checkpointing.LATEST_DIR
    _damage(latest / "4", kind)

    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=3)
    # The metadata alone (what a resume checks the config with) reads unless it is the damage.
    meta_step = 2 if kind == "truncated meta JSON" else 4
    assert ckpt.read_meta("latest") == (meta_step, {"step": meta_step})
    with caplog.at_level("WARNING", logger="d2am_jax.checkpointing"):
        restored = ckpt.restore(state)
    assert restored.step == 2 and restored.meta == {"step": 2} and _same(restored.state, state)
    assert "step 4" in caplog.text and "does not restore" in caplog.text
    assert (latest / "4.incomplete").is_dir() and ckpt.latest_step() == 2  # moved aside
    ckpt.save(4, state, np.ones(3, np.int32), {"step": 4})  # the step can be written again
    assert ckpt.restore(state).meta == {"step": 4}
    ckpt.close()


def test_when_no_checkpoint_restores_the_error_lists_them_and_nothing_moves(state, tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=3)
    for step in (2, 4):
        ckpt.save(step, state, np.zeros(3, np.int32), {"step": step})
    latest = tmp_path / checkpointing.LATEST_DIR
    for step in (2, 4):
        _damage(latest / str(step), "truncated array data")
    with pytest.raises(UserError, match="no checkpoint in .* restores .*step 4: .*step 2: "):
        ckpt.restore(state)
    assert checkpointing.finalized_steps(str(latest)) == [2, 4]
    ckpt.close()


TENSORSTORE_FULL = ValueError(
    'RESOURCE_EXHAUSTED: Error writing "params.E.Conv_0.kernel/0" in OCDBT database at local file '
    '"/run/checkpoints/3.orbax-checkpoint-tmp/state/": Failed to write 229869 bytes to file 14: '
    "No space left on device [os_error_code='28']")


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                   TENSORSTORE_FULL], ids=["OSError", "tensorstore"])
def test_a_full_disk_is_one_clear_error_and_the_last_checkpoint_stays(state, tmp_path,
                                                                      monkeypatch, caplog, error):
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=1)
    ckpt.save(2, state, np.zeros(3, np.int32), {"step": 2})

    def full_disk(*args, **kwargs):
        # What orbax does on a full disk: its writer thread logs the error with a traceback.
        logging.getLogger("absl").error("_SignalingThread.run() raised an exception",
                                        exc_info=error)
        raise error

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    with caplog.at_level("WARNING"), pytest.raises(UserError) as info:
        ckpt.save(3, state, np.zeros(3, np.int32), {"step": 3}, best=True)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / checkpointing.BEST_DIR) in message
    assert "no space left on device" in message and "step 2" in message
    assert "raised an exception" not in caplog.text  # orbax's traceback is held back
    monkeypatch.undo()
    assert ckpt.latest_step() == 2 and ckpt.restore(state).meta == {"step": 2}
    ckpt.close()


def test_a_failing_save_that_is_not_the_disk_keeps_its_traceback(state, tmp_path, monkeypatch,
                                                                  caplog):
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=1)

    def bug(*args, **kwargs):
        logging.getLogger("absl").error("orbax says why")
        raise TypeError("an unserialisable leaf")

    monkeypatch.setattr(ocp.CheckpointManager, "save", bug)
    with caplog.at_level("WARNING"), pytest.raises(TypeError, match="unserialisable"):
        ckpt.save(3, state, np.zeros(3, np.int32), {"step": 3})
    assert "orbax says why" in caplog.text  # released, not dropped
    monkeypatch.undo()
    ckpt.close()


def test_prediction_reads_params_and_statistics_only_and_writes_nothing(state, tmp_path, caplog):
    ckpt = checkpointing.Checkpointer(str(tmp_path), keep=2)
    ckpt.save(2, state, np.zeros(3, np.int32), {"step": 2}, best=True)
    ckpt.save(4, state, np.zeros(3, np.int32), {"step": 4})
    ckpt.close()
    which, restored = checkpointing.read_for_prediction(str(tmp_path))
    assert (which, restored.step, restored.meta) == ("best", 2, {"step": 2})
    assert set(restored.state) == {"params", "batch_stats"}  # no Adam moments read
    assert _same(restored.state["params"], state.params)
    assert _same(restored.state["batch_stats"], state.batch_stats)

    best = tmp_path / checkpointing.BEST_DIR
    _damage(best / "2", "truncated array data")
    before = sorted(p.name for p in best.iterdir())
    with caplog.at_level("WARNING", logger="d2am_jax.checkpointing"):
        which, restored = checkpointing.read_for_prediction(str(tmp_path))
    assert (which, restored.step) == ("latest", 4)
    assert str(best) in caplog.text and "step 2" in caplog.text
    assert sorted(p.name for p in best.iterdir()) == before  # a reader moves nothing
    with pytest.raises(MissingFileError, match="train first"):
        checkpointing.read_for_prediction(str(tmp_path / "elsewhere"))
    assert not (tmp_path / "elsewhere").exists()
