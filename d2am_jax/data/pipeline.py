"""The host side of the input pipeline: a bounded prefetch queue that builds the next batches on a
background thread while the current step runs, and the worker count a run decodes with.

Host-only (no jax): what "placing on the device" means is the caller's `produce` function.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

_END = object()


def default_workers() -> int:
    """Decoding threads when `data.workers` is 0: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class Prefetcher:
    """`produce(item)` for each item, run `depth` items ahead on one background thread.

    Iterating yields the results in order. An exception raised by `produce` is raised by the
    iteration at the item it was for — before the step that would have used it — with the
    producer's traceback chained; the thread never blocks forever (it stops on `close`, and a
    consumer that waits is woken by the error or the end). `wait_seconds` is the time the
    consumer spent waiting for a batch that was not ready: the input's share of the wall time.
    """

    def __init__(self, produce: Callable[[Any], Any], items: Iterable, depth: int = 2):
        if depth < 1:
            raise ValueError(f"Prefetcher: depth must be ≥ 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.wait_seconds = 0.0
        self._thread = threading.Thread(target=self._run, args=(produce, list(items)),
                                        name="prefetch", daemon=True)
        self._thread.start()

    def _run(self, produce, items) -> None:
        try:
            for item in items:
                if self._stop.is_set():
                    return
                self._put((item, produce(item), None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, never lost
            self._put((None, None, err))
            return
        self._put((None, _END, None))

    def _put(self, entry) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        item, value, err = self._queue.get()
        self.wait_seconds += time.perf_counter() - t0
        if err is not None:
            self.close()
            raise err
        if value is _END:
            raise StopIteration
        return value

    def close(self) -> None:
        """Stops the producer and waits for it (at most one batch's work)."""
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
