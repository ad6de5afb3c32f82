"""The stats pass: a jitted, forward-only run of the feature extractor E over the whole source set,
returning each sample's DRLM attention and F⁻ instance statistics (Eq. 2–4, 6) as host arrays.

Algorithm 1 line 4: these statistics give df(x) and the bank that `domains.assign` clusters. One
compile per run: every batch has the same shape (the last one is zero-padded, its padded rows are
dropped on the host), and only the small [B, C] arrays come back, never feature maps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from d2am_jax import domains, models
from d2am_jax import state as state_lib

# What domains.domain_features reads from each DRLM; p_logit (for L_p) is not needed here.
STATS_KEYS = ("attention", "mean", "std")

DrlmStats = list[dict[str, np.ndarray]]

# Inside one device call the batch runs as a loop over micro-batches of at most this many images:
# smaller temporaries stay in cache and are not returned to the OS and faulted in again on every
# layer. Measured at 64×64, width 1.0, batch 96 on 2 cores: CPU time per batch 13.3 s whole,
# 10.3 s in micro-batches of 24, 9.3 s in micro-batches of 8 (see experiments/bench/stats_pass.py).
MAX_MICRO_BATCH = 8


def make_stats_pass(config, batch_size: int, micro_batch: int | None = None,
                    placement=None) -> Callable[..., DrlmStats]:
    """`stats_pass(params_E, batch_stats_E, source)` → 3 × {'attention','mean','std'} [n, C_j].

    Three dicts (one per DRLM) of numpy float arrays, one row per sample.

    E runs in evaluation mode: BatchNorm normalizes with the running statistics the outer step
    accumulates, not with the batch's own, so each sample's statistics are the network's
    deterministic view of that sample alone — independent of its batch neighbours and of padding.

    `source` is either
      * a frame store — any object with `__len__` and `__getitem__(idx)` returning uint8
        [len(idx), H, W, 3] RGB (`InMemoryFrames`, `CachedFrames`, a uint8 numpy array); it is read
        in index order, batch_size frames at a time, uint8 to the device (converted there); or
      * an iterable (list, tuple, generator, iterator) of model-input batches: float arrays
        [m, H, W, 6], or dicts with 'x' and optionally a boolean 'mask' marking real rows (what
        `MetaBatchSampler.eval_batches` yields); rows are taken in order, masked-out rows dropped.
    H = W = config.data.resolution. The result holds one row per sample, in that order.

    micro_batch (a divisor of batch_size; default: the largest one ≤ MAX_MICRO_BATCH) only sets how
    the device loops over one batch; since evaluation-mode samples are independent, it changes no
    number beyond float rounding.

    placement (`runtime.Placement`): over a mesh each batch is sharded over its rows, each process
    reads only its rows and the statistics come back whole on every process.

    The jitted forward is traced once for any number of calls, batches and epochs:
    `stats_pass.trace_count()` says how often it was.
    """
    batch_size = _checked_batch_size(batch_size)
    if placement is not None and placement.sharded and micro_batch is None:
        # Micro-batches are a CPU cache trick; over a mesh each device takes its rows at once
        # (a loop over micro-batches would run over the sharded axis).
        micro_batch = batch_size
    micro_batch = _checked_micro_batch(micro_batch, batch_size)
    E, _, _ = models.build_modules(config.model)
    resolution = int(config.data.resolution)

    def forward(params_e, batch_stats_e, x):
        dtype = models.compute_dtype(config.model, params_e)

        def micro(xs):
            variables = {"params": params_e, "batch_stats": batch_stats_e}
            _, _, drlm = E.apply(variables, models.model_input(xs, dtype), False)
            # Only the [B, C] statistics leave the device; XLA drops everything else unused.
            return [{key: stats[key] for key in STATS_KEYS} for stats in drlm]

        out = jax.lax.map(micro, x.reshape((batch_size // micro_batch, micro_batch) + x.shape[1:]))
        return jax.tree.map(lambda a: a.reshape((batch_size,) + a.shape[2:]), out)

    jitted = state_lib.jit_step(forward)

    def stats_pass(params_E, batch_stats_E, source) -> DrlmStats:
        parts: list[DrlmStats] = []
        pending = None
        for x, num_real in device_batches(source, batch_size, resolution, placement):
            # Dispatch is asynchronous: fetching the previous batch's results while this one runs
            # lets the host prepare the next batch during the device's work.
            out = jitted(params_E, batch_stats_E, x)
            if pending is not None:
                parts.append(_real_rows(*pending, placement))
            pending = (out, num_real)
        if pending is None:
            raise ValueError("stats pass: the source holds no samples; expected at least one")
        parts.append(_real_rows(*pending, placement))
        return [{key: np.concatenate([p[j][key] for p in parts]) for key in STATS_KEYS}
                for j in range(len(parts[0]))]

    stats_pass.trace_count = jitted.trace_count
    stats_pass.batch_size = batch_size
    stats_pass.micro_batch = micro_batch
    stats_pass.jitted = jitted
    return stats_pass


def compute_bank(stats_fn: Callable[..., DrlmStats], params_E, batch_stats_E, frames,
                 mode: str = "dataset", fraction: float = 0.5) -> np.ndarray:
    """The bank [n, d] of df(x) for every sample of `frames` (any source `make_stats_pass` takes).

    mode: 'dataset' | 'sample' | 'none' channel selection of F_d⁻, see `domains.select_channels`.
    """
    return domains.domain_features(stats_fn(params_E, batch_stats_E, frames), mode, fraction)


def device_batches(source, batch_size: int, resolution: int, placement=None):
    """(x on the device(s), number of real rows of the global batch) for each padded batch; with a
    sharded `placement` each process reads only its rows of each batch (`Placement.local_rows`)
    and x is the global batch, sharded over its first axis."""
    if placement is None or not placement.sharded:
        yield from padded_batches(source, batch_size, resolution)
        return
    rows = placement.local_rows(batch_size)
    for x, num_real in padded_batches(source, batch_size, resolution, rows):
        yield placement.batch({"x": x}, axis=0)["x"], num_real


def padded_batches(source, batch_size: int, resolution: int,
                   rows: slice | None = None) -> Iterator[tuple[np.ndarray, int]]:
    """(x [batch_size, r, r, C], number of real rows) in order (uint8 RGB from a frame store,
    float32 RGB+HSV from model-input batches); padded rows are zeros.

    Rows of an input iterable are regrouped into full batches, so only the very last is padded.
    `rows`: only these rows of each padded batch are returned (and, from a frame store, read);
    the count is still the whole batch's.
    """
    if rows is not None and _is_frame_store(source):
        yield from _frame_store_rows(source, batch_size, resolution, rows)
        return
    for x, num_real in _regrouped(source, batch_size, resolution):
        yield (x if rows is None else x[rows]), num_real


def _regrouped(source, batch_size: int, resolution: int) -> Iterator[tuple[np.ndarray, int]]:
    held: list[np.ndarray] = []
    num_held = 0
    for x in _model_inputs(source, batch_size, resolution):
        held.append(x)
        num_held += len(x)
        while num_held >= batch_size:
            rows = np.concatenate(held) if len(held) > 1 else held[0]
            yield rows[:batch_size], batch_size
            held, num_held = [rows[batch_size:]], num_held - batch_size
    if num_held:
        rows = np.concatenate(held)
        pad = np.zeros((batch_size - num_held,) + rows.shape[1:], rows.dtype)
        yield np.concatenate([rows, pad]), num_held


def _frame_store_rows(frames, batch_size: int, resolution: int,
                      rows: slice) -> Iterator[tuple[np.ndarray, int]]:
    """`rows` of each padded batch of a frame store, reading only those frames."""
    n = len(frames)
    local = np.arange(batch_size)[rows]
    for start in range(0, n, batch_size):
        idx = start + local
        real = idx < n
        x = np.zeros((len(local), resolution, resolution, 3), np.uint8)
        if real.any():
            x[real] = next(_frame_store_inputs(_Rows(frames, idx[real]), len(idx), resolution))
        yield x, min(batch_size, n - start)


class _Rows:
    """Rows `idx` of a frame store, as a frame store."""

    def __init__(self, frames, idx):
        self.frames, self.idx = frames, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i):
        return self.frames[self.idx[np.asarray(i)]]


def _model_inputs(source, batch_size: int, resolution: int) -> Iterator[np.ndarray]:
    """Unpadded input arrays (m ≥ 1): uint8 RGB [m, r, r, 3] from a frame store (converted on the
    device), float32 RGB+HSV [m, r, r, 6] from an iterable of model-input batches."""
    if _is_frame_store(source):
        yield from _frame_store_inputs(source, batch_size, resolution)
        return
    if isinstance(source, (str, bytes, Mapping)) or not isinstance(source, Iterable):
        raise ValueError(
            f"stats pass: source of type {type(source).__name__} is neither a frame store (__len__ "
            f"and __getitem__(idx) → uint8 [n, H, W, 3]) nor an iterable of model-input batches"
        )
    for i, batch in enumerate(source):
        x = _checked_input_batch(batch, i, resolution)
        if len(x):
            yield x


def _is_frame_store(source) -> bool:
    if isinstance(source, (list, tuple, str, bytes, Mapping)):
        return False
    return hasattr(source, "__len__") and hasattr(source, "__getitem__")


def _frame_store_inputs(frames, batch_size: int, resolution: int) -> Iterator[np.ndarray]:
    n = len(frames)
    expected = f"uint8 [m, {resolution}, {resolution}, 3] RGB (data.resolution={resolution})"
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        rgb = np.asarray(frames[idx])
        if rgb.shape != (len(idx), resolution, resolution, 3) or rgb.dtype != np.uint8:
            raise ValueError(
                f"stats pass: frames {idx[0]}–{idx[-1]} came back with shape {rgb.shape} and dtype "
                f"{rgb.dtype}; expected {expected} with m = {len(idx)}"
            )
        yield rgb


def _checked_input_batch(batch, i: int, resolution: int) -> np.ndarray:
    """Batch i of an input iterable (uint8 RGB or float32 RGB+HSV), masked-out rows removed."""
    mask = None
    if isinstance(batch, Mapping):
        if "x" not in batch:
            raise ValueError(f"stats pass: input batch {i} has keys {sorted(batch)}; expected 'x' "
                             f"(and optionally 'mask')")
        x, mask = np.asarray(batch["x"]), batch.get("mask")
    else:
        x = np.asarray(batch)
    if x.ndim != 4 or not models.input_ok(x.shape, x.dtype, resolution):
        raise ValueError(
            f"stats pass: input batch {i} field 'x' has shape {x.shape} and dtype {x.dtype}; "
            f"expected [m, r, r, C] with {models.INPUT_FORMS} (data.resolution={resolution})"
        )
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != (len(x),) or mask.dtype != np.bool_:
            raise ValueError(f"stats pass: input batch {i} field 'mask' has shape {mask.shape} and "
                             f"dtype {mask.dtype}; expected bool [{len(x)}]")
        x = x[mask]
    return x if x.dtype == np.uint8 else x.astype(np.float32, copy=False)


def _real_rows(out: Any, num_real: int, placement=None) -> DrlmStats:
    host = jax.device_get(out) if placement is None else placement.fetch(out)
    return [{key: np.asarray(stats[key][:num_real]) for key in STATS_KEYS} for stats in host]


def _checked_micro_batch(micro_batch, batch_size: int) -> int:
    if micro_batch is None:
        return max(d for d in range(1, min(batch_size, MAX_MICRO_BATCH) + 1) if batch_size % d == 0)
    if (isinstance(micro_batch, bool) or not isinstance(micro_batch, (int, np.integer))
            or micro_batch < 1 or batch_size % micro_batch):
        raise ValueError(f"stats pass: micro_batch must be a divisor of batch_size={batch_size}, "
                         f"got {micro_batch!r}")
    return int(micro_batch)


def _checked_batch_size(batch_size) -> int:
    if (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
            or batch_size < 1):
        raise ValueError(f"stats pass: batch_size must be an integer ≥ 1, got {batch_size!r}")
    return int(batch_size)
