"""Meta-batches of fixed shape for D²AM: per step, K−1 meta-train pseudo domains and one meta-test.

Host-only numpy (no jax): frame stores (in memory, or decoded once and cached), balanced sampling.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import cv2
import numpy as np

from d2am_jax.data.depth import face_depth_prior

log = logging.getLogger(__name__)


class FrameStore(Protocol):
    """What the sampler reads frames from: `store[idx]` → uint8 [len(idx), H, W, 3]."""

    def __len__(self) -> int: ...

    def __getitem__(self, idx: np.ndarray) -> np.ndarray: ...


def _frame_error(owner: str, index: int, frame: np.ndarray, expected: str) -> ValueError:
    return ValueError(f"{owner}: frame {index} has shape {tuple(frame.shape)} and dtype "
                      f"{frame.dtype}, expected {expected}")


def _as_index(idx, n: int, owner: str) -> np.ndarray:
    idx = np.asarray(idx)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise ValueError(f"{owner}: indices must be a 1-D integer array, got shape {idx.shape} "
                         f"and dtype {idx.dtype}")
    bad = np.flatnonzero((idx < 0) | (idx >= n))
    if bad.size:
        raise ValueError(f"{owner}: index {idx[bad[0]].item()} (position {bad[0]}) is outside "
                         f"[0, {n})")
    return idx.astype(np.int64, copy=False)


class InMemoryFrames:
    """Frames already decoded: a uint8 [N, H, W, 3] array, or a sequence of [H, W, 3] frames."""

    def __init__(self, images):
        if isinstance(images, np.ndarray):
            if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
                raise ValueError(f"InMemoryFrames: expected uint8 [N, H, W, 3] RGB frames, got "
                                 f"shape {images.shape} and dtype {images.dtype}")
            self._images = images
            return
        frames = [np.asarray(f) for f in images]
        if not frames:
            raise ValueError("InMemoryFrames: no frames given")
        h, w = frames[0].shape[:2]
        for i, f in enumerate(frames):
            if f.shape != (h, w, 3) or f.dtype != np.uint8:
                raise _frame_error("InMemoryFrames", i, f,
                                   f"uint8 ({h}, {w}, 3) RGB like frame 0")
        self._images = np.stack(frames)

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        return self._images[_as_index(idx, len(self), "InMemoryFrames")]


class CachedFrames:
    """Frames decoded on first use by `decode_one(i)` and kept while they fit in `budget_bytes`.

    Frames that do not fit are decoded again whenever asked for (logged once). Every decoded frame
    is checked to be uint8 [H, W, 3] with frame 0's H and W; the error names the frame. The frames
    one call misses are decoded by `workers` threads (OpenCV's and PIL's decoders release the GIL);
    the cache itself is only written by the calling thread.
    """

    def __init__(self, n: int, decode_one: Callable[[int], np.ndarray], budget_bytes: int,
                 workers: int = 1):
        if n < 1:
            raise ValueError(f"CachedFrames: n must be ≥ 1, got {n}")
        if budget_bytes < 0:
            raise ValueError(f"CachedFrames: budget_bytes must be ≥ 0, got {budget_bytes}")
        self._n = int(n)
        self._decode_one = decode_one
        self._budget = int(budget_bytes)
        self._slot = np.full(self._n, -1, np.int64)  # frame → row of self._store, -1 = not cached
        self._store: np.ndarray | None = None
        self._cached = 0
        self._shape: tuple[int, int, int] | None = None
        self._warned = False
        self._pool = ThreadPoolExecutor(workers, "decode") if workers > 1 else None

    def __len__(self) -> int:
        return self._n

    @property
    def num_cached(self) -> int:
        return self._cached

    def _decode(self, i: int) -> np.ndarray:
        frame = np.asarray(self._decode_one(int(i)))
        if self._shape is None:
            if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
                raise _frame_error("CachedFrames", i, frame, "uint8 [H, W, 3] RGB")
            self._shape = frame.shape
            capacity = min(self._n, self._budget // frame.nbytes)
            # np.empty only reserves address space; pages are touched as frames arrive.
            self._store = np.empty((capacity,) + frame.shape, np.uint8)
        elif frame.shape != self._shape or frame.dtype != np.uint8:
            raise _frame_error("CachedFrames", i, frame,
                               f"uint8 {self._shape} RGB like the first decoded frame")
        return frame

    def _keep(self, i: int, frame: np.ndarray) -> None:
        if self._cached < len(self._store):
            self._store[self._cached] = frame
            self._slot[i] = self._cached
            self._cached += 1
        elif not self._warned:
            self._warned = True
            log.warning("CachedFrames: the %d-byte budget holds %d of %d frames; the others are "
                        "decoded again on every use", self._budget, len(self._store), self._n)

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        idx = _as_index(idx, self._n, "CachedFrames")
        if self._shape is None and idx.size:
            self._keep(int(idx[0]), self._decode(int(idx[0])))
        out = np.empty((len(idx),) + (self._shape or (0, 0, 3)), np.uint8)
        if not idx.size:
            return out
        slots = self._slot[idx]
        hit = slots >= 0
        out[hit] = self._store[slots[hit]]
        missed = np.unique(idx[~hit])          # a frame asked for twice is decoded once
        positions = np.flatnonzero(~hit)
        decoded = (self._pool.map(self._decode, missed.tolist()) if self._pool is not None
                   else map(self._decode, missed.tolist()))
        for i, frame in zip(missed.tolist(), decoded):
            out[positions[idx[positions] == i]] = frame
            self._keep(i, frame)
        return out

    def warm(self) -> int:
        """Decodes every frame once (caching what fits, checking all); returns how many decoded."""
        decoded = 0
        for i in np.flatnonzero(self._slot < 0):
            self._keep(int(i), self._decode(int(i)))
            decoded += 1
        return decoded


def _balanced(rng: np.random.Generator, live: np.ndarray, spoof: np.ndarray,
              size: int) -> np.ndarray:
    """`size` indices, half from `live` and half from `spoof`, shuffled; with replacement only
    where a pool has fewer than size / 2 examples (MetaBatchSampler.domain_pools warns of it)."""
    half = size // 2
    picks = [rng.choice(pool, half, replace=len(pool) < half) for pool in (live, spoof)]
    return rng.permutation(np.concatenate(picks))


class MetaBatchSampler:
    """Fixed-shape batches for the meta step (Alg. 1, lines 10–15), the ERM baseline and eval.

    frames: a FrameStore of N uint8 RGB frames; labels: [N] in {0, 1} (1 = live); depth: None (the
    face-shaped prior for live, zeros for spoof) or a store with `depth[idx]` → float32 [n, h, w],
    resized to depth_size × depth_size (the depth head's grid, resolution // 8). Spoof targets are
    zero whatever the store holds (Eq. 10: "set zeros for fake face").
    """

    def __init__(self, frames: FrameStore, labels, depth=None, *, num_domains: int,
                 per_domain_batch: int, depth_size: int, seed: int):
        n = len(frames)
        if n < 1:
            raise ValueError("MetaBatchSampler: the frame store is empty")
        # K ≥ 2, an even per-domain batch and the seed are checked with the config
        # (config_check); the depth grid is derived from the resolution.
        self.frames = frames
        self.labels = self._checked_labels(labels, n)
        if depth is not None and len(depth) != n:
            raise ValueError(f"MetaBatchSampler: the depth store has {len(depth)} maps, the "
                             f"frame store {n} frames")
        self.depth = depth
        self.num_domains = int(num_domains)
        self.per_domain_batch = int(per_domain_batch)
        self.depth_size = int(depth_size)
        self.seed = int(seed)
        first = np.asarray(frames[np.array([0])])
        if first.ndim != 4 or first.shape[0] != 1 or first.shape[-1] != 3 \
                or first.dtype != np.uint8:
            raise _frame_error("MetaBatchSampler", 0, first[0] if first.ndim == 4 else first,
                               "uint8 [H, W, 3] RGB")
        self.image_shape = first.shape[1:3]
        self._live = np.flatnonzero(self.labels == 1)
        self._spoof = np.flatnonzero(self.labels == 0)
        if not self._live.size or not self._spoof.size:
            raise ValueError(f"MetaBatchSampler: the source needs live and spoof examples, has "
                             f"{self._live.size} live and {self._spoof.size} spoof")
        self._prior = face_depth_prior(self.depth_size)
        self._domains_key: np.ndarray | None = None
        self._pools: list[tuple[np.ndarray, np.ndarray]] = []

    @staticmethod
    def _checked_labels(labels, n: int) -> np.ndarray:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"MetaBatchSampler: labels must have shape ({n},) (one per frame), "
                             f"got {labels.shape}")
        bad = np.flatnonzero((labels != 0) & (labels != 1))
        if bad.size:
            raise ValueError(f"MetaBatchSampler: labels must be 0 (spoof) or 1 (live); label "
                             f"{labels[bad[0]].item()!r} at index {bad[0]} ({bad.size} bad in all)")
        return labels.astype(np.int32)

    # -- pseudo domains ---------------------------------------------------------------------

    def domain_pools(self, pseudo_domain) -> list[tuple[np.ndarray, np.ndarray]]:
        """(live indices, spoof indices) of each pseudo domain; errors if one lacks a class."""
        pseudo_domain = np.asarray(pseudo_domain)
        if self._domains_key is not None and np.array_equal(pseudo_domain, self._domains_key):
            return self._pools
        n, k = len(self.labels), self.num_domains
        if pseudo_domain.shape != (n,):
            raise ValueError(f"pseudo_domain must have shape ({n},) (one per frame), got "
                             f"{pseudo_domain.shape}")
        if pseudo_domain.dtype.kind not in "iu":
            raise ValueError(f"pseudo_domain must be integers, got dtype {pseudo_domain.dtype}")
        bad = np.flatnonzero((pseudo_domain < 0) | (pseudo_domain >= k))
        if bad.size:
            raise ValueError(f"pseudo_domain must lie in [0, {k}) (num_domains); value "
                             f"{pseudo_domain[bad[0]].item()} at index {bad[0]} "
                             f"({bad.size} bad in all)")
        pools, empty = [], []
        for d in range(k):
            members = pseudo_domain == d
            live = np.flatnonzero(members & (self.labels == 1))
            spoof = np.flatnonzero(members & (self.labels == 0))
            if not live.size or not spoof.size:
                empty.append(f"domain {d} has {live.size} live and {spoof.size} spoof")
            pools.append((live, spoof))
        if empty:
            raise ValueError("every pseudo domain needs live and spoof examples: "
                             + "; ".join(empty))
        self._warn_short(pools)
        self._domains_key = pseudo_domain.copy()
        self._pools = pools
        return pools

    def _warn_short(self, pools: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Says, once per assignment, which domain's class is drawn with replacement: fewer
        examples than half a domain batch means copies of the same images fill that half."""
        half = self.per_domain_batch // 2
        for d, (live, spoof) in enumerate(pools):
            for name, pool in (("live", live), ("spoof", spoof)):
                if pool.size < half:
                    log.warning("pseudo domain %d has %d %s examples for the %d %s places of "
                                "every domain batch: they are drawn with replacement, so each "
                                "batch repeats them", d, pool.size, name, half, name)

    # -- batches ----------------------------------------------------------------------------

    def meta_indices(self, pseudo_domain, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Frame indices [K, B] and their pseudo domains [K]: a random permutation of the K
        domains whose last is the meta-test domain; each row half live, half spoof."""
        pools = self.domain_pools(pseudo_domain)
        rng = np.random.default_rng((self.seed, epoch, step))
        order = rng.permutation(self.num_domains)
        idx = np.stack([_balanced(rng, *pools[d], self.per_domain_batch) for d in order])
        return idx, order.astype(np.int32)

    def meta_batch(self, pseudo_domain, epoch: int, step: int,
                   columns: slice | None = None) -> dict[str, np.ndarray]:
        """{'x': uint8 RGB [K, B, H, W, 3], 'y': float32 [K, B], 'depth': uint8 [K, B, d, d]
        (k/255), 'domains': int32 [K]}; rows 0..K−2 are meta-train, row K−1 meta-test. What
        crosses to the device stays uint8: scaling and RGB→HSV run inside the step
        (`models.model_input`). `columns`: only these columns of each domain batch are loaded
        (a process's slice of the global batch in a multi-process run)."""
        idx, order = self.meta_indices(pseudo_domain, epoch, step)
        if columns is not None:
            idx = idx[:, columns]
        batch = self._examples(idx.reshape(-1))
        k, b = idx.shape
        batch = {key: v.reshape((k, b) + v.shape[1:]) for key, v in batch.items()}
        batch["domains"] = order
        return batch

    def pooled_batch(self, epoch: int, step: int,
                     columns: slice | None = None) -> dict[str, np.ndarray]:
        """The ERM baseline's batch: K·B examples of the whole source, half live, half spoof.

        Same keys as meta_batch with a leading axis of 1; 'domains' is [-1] (all pooled).
        `columns`: only these examples are loaded, as in `meta_batch`.
        """
        rng = np.random.default_rng((self.seed, epoch, step))
        idx = _balanced(rng, self._live, self._spoof, self.num_domains * self.per_domain_batch)
        if columns is not None:
            idx = idx[columns]
        batch = {key: v[None] for key, v in self._examples(idx).items()}
        batch["domains"] = np.full(1, -1, np.int32)
        return batch

    def eval_batches(self, indices, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """{'x': uint8 [batch_size, H, W, 3], 'y': [batch_size], 'mask': bool [batch_size]} in the
        order of `indices`; the last batch is zero-padded and its mask marks the real rows, so an
        evaluation step compiles once."""
        if batch_size < 1:
            raise ValueError(f"eval_batches: batch_size must be ≥ 1, got {batch_size}")
        indices = _as_index(indices, len(self.labels), "eval_batches")
        if not indices.size:
            raise ValueError("eval_batches: no indices to evaluate")
        h, w = self.image_shape
        for start in range(0, indices.size, batch_size):
            chunk = indices[start:start + batch_size]
            m = chunk.size
            x = np.zeros((batch_size, h, w, 3), np.uint8)
            y = np.zeros(batch_size, np.float32)
            x[:m] = self._frames(chunk)
            y[:m] = self.labels[chunk]
            yield {"x": x, "y": y, "mask": np.arange(batch_size) < m}

    def check_frames(self, chunk: int = 256) -> int:
        """Reads every frame once through the store (filling a cache), so that a bad frame fails
        before training rather than mid-epoch; returns the number checked."""
        for start in range(0, len(self.labels), chunk):
            self._frames(np.arange(start, min(len(self.labels), start + chunk)))
        return len(self.labels)

    def _frames(self, idx: np.ndarray) -> np.ndarray:
        frames = np.asarray(self.frames[idx])
        expected = (len(idx),) + tuple(self.image_shape) + (3,)
        if frames.shape == expected and frames.dtype == np.uint8:
            return frames
        for i in idx:  # find the culprit to name it
            one = np.asarray(self.frames[np.array([i])])
            if one.shape != (1,) + expected[1:] or one.dtype != np.uint8:
                raise _frame_error("MetaBatchSampler", int(i), one[0] if one.ndim == 4 else one,
                                   f"uint8 {expected[1:]} RGB like frame 0")
        raise ValueError(f"MetaBatchSampler: the frame store returned shape {frames.shape} and "
                         f"dtype {frames.dtype} for {len(idx)} indices, expected {expected} uint8")

    def _examples(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        y = self.labels[idx].astype(np.float32)
        return {"x": self._frames(idx), "y": y, "depth": self._depth(idx, y)}

    def _depth(self, idx: np.ndarray, y: np.ndarray) -> np.ndarray:
        """uint8 [n, d, d] depth targets, k/255 (8-bit like the stored maps), zero for spoof."""
        return np.rint(self._depth_maps(idx, y) * 255.0).astype(np.uint8)

    def _depth_maps(self, idx: np.ndarray, y: np.ndarray) -> np.ndarray:
        d = self.depth_size
        if self.depth is None:
            return self._prior[None] * y[:, None, None]
        maps = np.asarray(self.depth[idx], np.float32)
        if maps.ndim != 3 or len(maps) != len(idx):
            raise ValueError(f"MetaBatchSampler: the depth store returned shape {maps.shape} for "
                             f"{len(idx)} indices, expected [n, h, w]")
        if maps.shape[1:] != (d, d):
            # Area averaging when shrinking (no aliasing of the face edge), bilinear when growing.
            shrink = maps.shape[1] >= d and maps.shape[2] >= d
            interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
            maps = np.stack([cv2.resize(m, (d, d), interpolation=interp) for m in maps])
        return maps * y[:, None, None]
