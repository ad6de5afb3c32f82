"""The input pipeline: uint8 frames converted on the device equal the host conversion, the
prefetch queue keeps order, stays bounded and hands a producer's error to the step that would
have used its batch, and decoding threads change no frame."""

import threading
import time

import jax
import numpy as np
import pytest

from d2am_jax import models
from d2am_jax.data.color import rgb_to_model_input
from d2am_jax.data.pipeline import Prefetcher
from d2am_jax.data.sampler import CachedFrames
from d2am_jax.errors import UserError


def _frames(n=6, res=12, seed=0):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (n, res, res, 3), dtype=np.uint8)
    # The hue formula's corner cases: gray, black, white, each primary and a two-way maximum.
    frames[0, 0, :8] = [[7, 7, 7], [0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0],
                        [0, 0, 255], [200, 200, 10], [10, 200, 200]]
    return frames


def test_device_conversion_equals_the_host_conversion_within_float32_rounding():
    frames = _frames()
    on_device = np.asarray(jax.jit(models.model_input)(frames))
    on_host = rgb_to_model_input(frames)
    assert on_device.shape == on_host.shape == frames.shape[:3] + (6,)
    np.testing.assert_allclose(on_device, on_host, rtol=0, atol=4e-7)
    # A float RGB+HSV input (what tests and notebooks pass) goes through unchanged.
    np.testing.assert_array_equal(np.asarray(models.model_input(on_host)), on_host)


def test_depth_crosses_as_uint8_and_arrives_as_k_over_255():
    depth = np.array([[0, 128, 255]], np.uint8)
    np.testing.assert_allclose(np.asarray(models.depth_input(depth, np.float32)),
                               [[0.0, 128 / 255, 1.0]], rtol=1e-7)


def test_prefetcher_yields_in_order_and_runs_at_most_depth_ahead():
    produced = []

    def produce(i):
        produced.append(i)
        return i * 10

    with Prefetcher(produce, range(8), depth=2) as batches:
        time.sleep(0.2)                   # the producer fills the queue, then must block
        assert len(produced) <= 3         # two queued and one waiting to be put
        assert list(batches) == [i * 10 for i in range(8)]


def test_a_producer_error_reaches_the_step_that_would_have_used_the_batch():
    def produce(i):
        if i == 3:
            raise UserError("fas_manifest: record 3 (frames/3.png) cannot be decoded")
        return i

    batches = Prefetcher(produce, range(6), depth=2)
    assert [next(batches) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(UserError, match="record 3 .*frames/3.png"):
        next(batches)
    assert not batches._thread.is_alive()


def test_close_stops_a_producer_blocked_on_a_full_queue():
    batches = Prefetcher(lambda i: i, range(1000), depth=1)
    next(batches)
    batches.close()
    assert not batches._thread.is_alive()


def test_wait_time_counts_only_waiting_for_batches():
    slow = Prefetcher(lambda i: time.sleep(0.05) or i, range(3), depth=1)
    list(slow)
    assert slow.wait_seconds >= 0.1
    fast = Prefetcher(lambda i: i, range(3), depth=3)
    time.sleep(0.5)                       # all three are queued before the consumer asks
    list(fast)
    assert fast.wait_seconds < 0.05


def test_decoding_threads_change_no_frame_and_decode_each_once():
    frames = _frames(n=40, res=8, seed=1)
    calls, lock = [], threading.Lock()

    def decode(i):
        with lock:
            calls.append(i)
        return frames[i]

    idx = np.array([5, 3, 5, 39, 0, 3, 17])
    serial = CachedFrames(len(frames), lambda i: frames[i], 1 << 20)[idx]
    threaded = CachedFrames(len(frames), decode, 1 << 20, workers=3)
    np.testing.assert_array_equal(threaded[idx], serial)
    np.testing.assert_array_equal(threaded[idx], frames[idx])
    assert sorted(calls) == sorted(set(idx.tolist()))      # the repeats came from the cache


def test_a_cache_smaller_than_the_data_streams_every_frame_again():
    frames = _frames(n=10, res=8, seed=2)
    calls = []
    store = CachedFrames(len(frames), lambda i: calls.append(i) or frames[i],
                         budget_bytes=3 * frames[0].nbytes, workers=2)
    for _ in range(2):
        np.testing.assert_array_equal(store[np.arange(10)], frames)
    assert store.num_cached == 3
    assert len(calls) == 10 + 7           # the second pass decodes the 7 frames not kept
