"""Checkpoints: exact round trip of the train state and host arrays, last-N retention, the best
slot, and half-written directories ignored on restart."""


import jax
import numpy as np
import pytest
from conftest import tiny_config

from d2am_jax import checkpointing
from d2am_jax import state as state_lib


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
