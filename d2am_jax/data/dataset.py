"""The one host-side dataset type: `FasData`, n examples with their frames, labels, depth, video,
domain and attack type, whatever they were loaded from (synthetic, manifest, protocol).

Host-only numpy; frames and depth are stores (`store[idx]` → arrays) so data need not fit in memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from d2am_jax.errors import UserError


def depth_size(resolution: int) -> int:
    """The side of every depth target: the depth head's grid, after E's three stride-2 pools."""
    size = int(resolution)
    for _ in range(3):
        size = (size + 1) // 2
    return size


class Subset:
    """Rows `idx` of a frame or depth store, as a store (for stores without their own `take`)."""

    def __init__(self, store, idx: np.ndarray):
        self.store, self.idx = store, np.asarray(idx, np.int64)

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, idx) -> np.ndarray:
        return self.store[self.idx[np.asarray(idx)]]


def take_rows(store, idx: np.ndarray):
    """Rows `idx` of a store: its own `take` (cheap, e.g. records), numpy indexing, or a view."""
    if store is None:
        return None
    if hasattr(store, "take") and not isinstance(store, np.ndarray):
        return store.take(idx)
    if isinstance(store, np.ndarray):
        return store[idx]
    return Subset(store, idx)


@dataclasses.dataclass
class FasData:
    """n examples on the host.

    frames: a store, `frames[idx]` → uint8 [len(idx), H, W, 3] RGB. depth: None (the face-shaped
    prior for live, zeros for spoof) or a store, `depth[idx]` → float32 [len(idx), h, w] in [0, 1].
    `domain` is for analysis and the 'w/ d' ablation only; `video` ids are unique across pooled
    datasets; `attack` names each spoof's attack type (APCER is the worst type's), unused for live.
    """

    frames: Any
    labels: np.ndarray        # int32 [n], 1 live, 0 spoof
    depth: Any
    video: np.ndarray         # str [n]
    domain: np.ndarray        # str [n]
    attack: np.ndarray        # str [n]
    frame: np.ndarray | None = None   # int32 [n], frame index within its video (built data)
    origin: np.ndarray | None = None  # str [n], '<dataset>/<split>' (built data)
    skipped: list = dataclasses.field(default_factory=list)  # items the builds skipped

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx) -> FasData:
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False)
        opt = lambda a: None if a is None else a[idx]
        return FasData(take_rows(self.frames, idx), self.labels[idx], take_rows(self.depth, idx),
                       self.video[idx], self.domain[idx], self.attack[idx], opt(self.frame),
                       opt(self.origin), list(self.skipped))

    def class_counts(self) -> dict[str, int]:
        return {"live": int((self.labels == 1).sum()), "spoof": int((self.labels == 0).sum())}

    def require_both_classes(self, what: str) -> None:
        """Fail before training when a set lacks live or spoof examples."""
        counts = self.class_counts()
        empty = [k for k, v in counts.items() if v == 0]
        if empty:
            where = "" if self.origin is None else f"; from {sorted(set(self.origin))}"
            raise UserError(f"{what}: no {' and no '.join(empty)} examples ({counts}{where})")
