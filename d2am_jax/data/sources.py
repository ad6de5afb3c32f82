"""Where a run's examples come from: the config's data (synthetic, a manifest, a paper protocol)
loaded into `FasData`, and the source split by video into training and source validation.

Host-only: numpy, the builders and tfds' ArrayRecord reader (imported only for built data).
"""

from __future__ import annotations

import logging
import os
from typing import Any, NamedTuple

import numpy as np

from d2am_jax.data.dataset import FasData, depth_size
from d2am_jax.data.pipeline import default_workers
from d2am_jax.data.sampler import CachedFrames, InMemoryFrames
from d2am_jax.errors import UserError

log = logging.getLogger(__name__)

DATA_NAMES = ("synthetic", "manifest", "protocol")


class RunData(NamedTuple):
    """A run's examples: the source's training part, its held-out validation part (threshold and
    best checkpoint, never the target), the unseen target, and a one-line description. `bad`:
    with data.skip_bad and built data, the stored frames and maps that failed to decode so far
    (loader.BadRecords), else None."""

    train: FasData
    val: FasData
    target: FasData
    description: str
    bad: Any = None


def load(config, workdir: str) -> RunData:
    """The config's source (split by video into train and validation) and target."""
    bad = None
    if config.data.name == "synthetic":
        source, target, description = _synthetic(config)
    else:
        source, target, description, bad = _built(config, workdir)
    d = config.data
    # The held-out videos: drawn by the run's seed, or fixed across seeds (data.source_val_seed ≥
    # 0), as a dataset's published split is, so that seeds vary training alone.
    split_seed = config.seed if d.source_val_seed < 0 else d.source_val_seed
    train_rows, val_rows = source_val_split(source, d.source_val_fraction, split_seed,
                                            d.source_val_min_videos, d.source_val_min_frames)
    data = RunData(source.take(train_rows), source.take(val_rows), target, description, bad)
    log.info("%s: %d source frames (%d train, %d source validation), %d target frames",
             description, len(source), len(data.train), len(data.val), len(target))
    return data


def _names(text: str, field: str) -> list[str]:
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise UserError(f"config.{field}: expected comma-separated domain names, got {text!r}")
    return names


def _synthetic(config) -> tuple[FasData, FasData, str]:
    from d2am_jax.data import synthetic
    sc = config.data.synthetic
    syn = synthetic.SyntheticConfig(
        resolution=int(config.data.resolution), num_domains=int(sc.num_domains),
        per_domain=int(sc.per_domain), frames_per_video=int(sc.frames_per_video),
        seed=int(sc.seed))
    all_domains = [str(d) for d in range(syn.num_domains)]
    target = _names(config.data.target or all_domains[-1], "data.target")
    source = _names(config.data.source, "data.source") if config.data.source else \
        [d for d in all_domains if d not in target]
    for field, names in (("data.source", source), ("data.target", target)):
        bad = [d for d in names if d not in all_domains]
        if bad:
            raise UserError(f"config.{field}: synthetic domain(s) {bad} do not exist; expected "
                            f"names from {all_domains} (data.synthetic.num_domains)")
    if set(source) & set(target):
        raise UserError(f"config.data.source {source} and data.target {target} overlap")
    raw = synthetic.generate(syn)
    domain = raw["domain"].astype(str)

    def rows(names):
        idx = np.flatnonzero(np.isin(domain, names))
        return FasData(InMemoryFrames(raw["image"][idx]), raw["label"][idx].astype(np.int32),
                       raw["depth"][idx], raw["video"][idx].astype(str), domain[idx],
                       raw["attack"][idx].astype(str))

    return rows(source), rows(target), \
        f"fas_synthetic (in memory): {'&'.join(source)}→{'&'.join(target)}"


def _cached(data: FasData, config, what: str, bad) -> FasData:
    """Built frames decoded once into a bounded cache (data.cache_bytes), at the run's size, by
    data.workers threads (depth maps too); with data.skip_bad (`bad` a loader.BadRecords) a
    frame or map that fails to decode is replaced and reported there."""
    r = int(config.data.resolution)
    if tuple(data.frames.shape) != (r, r):
        raise UserError(
            f"{what}: frames were built at {tuple(data.frames.shape)}, but "
            f"config.data.resolution={r}; rebuild at that resolution (--config resolution={r}) "
            f"or set --config.data.resolution={data.frames.shape[0]}")
    workers = int(config.data.workers) or default_workers()
    encoded = data.frames if bad is None else data.frames.with_bad(bad)
    frames = CachedFrames(len(data), encoded.decode_one, int(config.data.cache_bytes), workers)
    depth = data.depth.with_options(workers, bad)
    return FasData(frames, data.labels.astype(np.int32), depth, data.video.astype(str),
                   data.domain.astype(str), data.attack.astype(str), data.frame, data.origin,
                   data.skipped)


def _built(config, workdir: str) -> tuple[FasData, FasData, str, Any]:
    from d2am_jax.data import loader, protocols
    data_dir = config.data.data_dir or os.path.join(workdir, "tfds")
    r = int(config.data.resolution)
    if config.data.name == "manifest":
        if not config.data.manifest:
            raise UserError("config.data.manifest: expected the path of manifest.csv "
                            "(path,label[,video][,domain][,depth]) for data.name='manifest'")
        from d2am_jax.data import build
        overrides = {"manifest": os.path.abspath(config.data.manifest), "resolution": r,
                     "face_crop": config.data.face_crop}
        summary = build.build("fas_manifest", data_dir, config=overrides)
        log.info("manifest data: %s", summary)
        protocol = protocols.domain_protocol(
            "fas_manifest", _names(config.data.source, "data.source"),
            _names(config.data.target, "data.target"))
        configs = {"fas_manifest": overrides}
    else:
        protocol = protocols.get(config.data.protocol, config.data.splits)
        names = {p.dataset for p in protocol.source + protocol.target}
        configs = {name: {"resolution": r} for name in names}
    source, target = protocols.load(protocol, data_dir, configs, depth_size=depth_size(r),
                                    in_memory=bool(config.data.encoded_in_memory))
    bad = loader.BadRecords() if config.data.skip_bad else None
    return (_cached(source, config, f"{protocol.name} source", bad),
            _cached(target, config, f"{protocol.name} target", bad), protocol.name, bad)


def source_val_split(data: FasData, fraction: float, seed: int, min_videos: int = 1,
                     min_frames: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows) of the source: whole videos, `fraction` of each class's
    videos held out, seeded by (seed, 7), with a floor per class of `min_videos` videos and
    `min_frames` frames; the floor never takes more than half a class's videos (at least one)."""
    rng = np.random.default_rng((seed, 7))
    val = np.zeros(len(data), bool)
    for label in (0, 1):
        in_class = data.labels == label
        videos, frames = np.unique(data.video[in_class], return_counts=True)
        if len(videos) < 2:
            raise UserError(
                f"source validation needs ≥ 2 {'live' if label else 'spoof'} videos in the source "
                f"(one to hold out, one to train on), found {len(videos)}")
        order = rng.permutation(len(videos))
        count = _held_out_count(frames[order], fraction, min_videos, min_frames)
        val |= np.isin(data.video, videos[order[:count]]) & in_class
    return np.flatnonzero(~val), np.flatnonzero(val)


def _held_out_count(frames: np.ndarray, fraction: float, min_videos: int, min_frames: int) -> int:
    """How many of a class's videos (frame counts in hold-out order) to hold out: the share, raised
    to the floor; a few validation scores make a noisy threshold and a tie-prone best checkpoint,
    but training keeps at least half the videos (the floor yields there, the share never does)."""
    n = len(frames)
    share = min(n - 1, max(1, int(round(fraction * n))))
    by_frames = int(np.searchsorted(np.cumsum(frames), min_frames)) + 1
    floor = min(max(min_videos, by_frames), max(1, n // 2))
    return max(share, floor)
