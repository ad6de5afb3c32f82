"""Reads a built FAS dataset (ArrayRecord via tfds' `as_data_source`) into a host-side `FasData`:
labels, video, domain, attack arrays in memory; frames and depth maps decoded on demand (OpenCV
for the builders' 8-bit PNG, PIL for anything else: the same pixels, in about two thirds of the
time, tests/test_decode.py).

Host-only: numpy, OpenCV, PIL and tensorflow-datasets' data sources; no jax, no TensorFlow.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from d2am_jax.data import builders
from d2am_jax.data.dataset import FasData
from d2am_jax.data.depth import face_depth_prior
from d2am_jax.errors import MissingFileError, UserError

log = logging.getLogger(__name__)

_CHUNK = 512  # records read per data-source call while collecting the metadata


class Records:
    """Global index → (data source, local index): the examples of one or more built splits.

    With `blobs` (encoded image and depth bytes per example, read once at load) frames decode
    without touching the ArrayRecord files again; without, each access re-reads the record.
    """

    def __init__(self, sources: list, source_id: np.ndarray, local: np.ndarray,
                 blobs: dict[str, np.ndarray] | None = None):
        self.sources = sources
        self.source_id = np.asarray(source_id, np.int32)
        self.local = np.asarray(local, np.int64)
        self.blobs = blobs

    def __len__(self) -> int:
        return len(self.local)

    def bytes_of(self, i: int, field: str) -> bytes:
        """The encoded 'image' or 'depth' of example i."""
        if self.blobs is not None:
            return self.blobs[field][i]
        return self.sources[self.source_id[i]][int(self.local[i])][field]

    def take(self, idx: np.ndarray) -> Records:
        blobs = None if self.blobs is None else {k: v[idx] for k, v in self.blobs.items()}
        return Records(self.sources, self.source_id[idx], self.local[idx], blobs)

    @staticmethod
    def concat(parts: list[Records]) -> Records:
        sources, ids, local = [], [], []
        for p in parts:
            ids.append(p.source_id + len(sources))
            sources.extend(p.sources)
            local.append(p.local)
        blobs = None
        if all(p.blobs is not None for p in parts):
            blobs = {k: np.concatenate([p.blobs[k] for p in parts]) for k in ("image", "depth")}
        return Records(sources, np.concatenate(ids), np.concatenate(local), blobs)


def decode_png_or_jpeg(blob: bytes, what: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(blob)) as img:
            img.load()
            return np.asarray(img)
    except (OSError, ValueError) as e:
        raise UserError(f"{what}: stored image bytes cannot be decoded ({e})") from e


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# RGB order as PIL gives it (recent OpenCV decodes straight to RGB; older ones decode BGR, then
# converted), and no EXIF rotation (PIL applies none).
_CV_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)


def png_header(blob: bytes) -> tuple[int, int, int, int] | None:
    """(height, width, bit depth, colour type) from a PNG's IHDR; None if `blob` is not a PNG or
    its IHDR fails its checksum."""
    if len(blob) < 33 or blob[:8] != _PNG_SIGNATURE or blob[12:16] != b"IHDR" \
            or zlib.crc32(blob[12:29]) != int.from_bytes(blob[29:33], "big"):
        return None
    return (int.from_bytes(blob[20:24], "big"), int.from_bytes(blob[16:20], "big"),
            blob[24], blob[25])


def _cv_decode(blob: bytes, flags: int) -> np.ndarray | None:
    # OpenCV's decoders release the GIL, so decoding threads run side by side.
    return cv2.imdecode(np.frombuffer(blob, np.uint8), flags)


def _cv_rgb(blob: bytes) -> np.ndarray | None:
    if _CV_RGB is not None:
        return _cv_decode(blob, _CV_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    bgr = _cv_decode(blob, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_rgb(blob: bytes, shape: tuple[int, int], what: str) -> np.ndarray:
    """uint8 [H, W, 3] RGB of a stored frame of `shape` (H, W); UserError naming `what` if it
    does not decode to that. What the builders write (8-bit RGB PNG) goes through OpenCV; JPEG
    and every other PNG through PIL (JPEG decoders differ in their last bits). PNG is lossless,
    so both give the same pixels; a PNG that OpenCV rejects is handed to PIL, which either
    decodes it or words the error."""
    if png_header(blob) == (shape[0], shape[1], 8, 2):
        rgb = _cv_rgb(blob)
        if rgb is not None and rgb.shape == (*shape, 3):
            return rgb
    rgb = decode_png_or_jpeg(blob, what)
    if rgb.shape != (*shape, 3) or rgb.dtype != np.uint8:
        raise UserError(f"{what}: stored frame has shape {rgb.shape} {rgb.dtype}, expected "
                        f"{(*shape, 3)} uint8")
    return rgb


def decode_gray(blob: bytes, what: str) -> np.ndarray:
    """A stored depth map as PIL reads it: [h, w] uint8 from an 8-bit gray PNG (OpenCV, the same
    pixels), anything else as PIL gives it."""
    header = png_header(blob)
    if header is not None and header[2:] == (8, 0):
        gray = _cv_decode(blob, cv2.IMREAD_UNCHANGED)
        if gray is not None and gray.shape == header[:2]:
            return gray
    return decode_png_or_jpeg(blob, what)


class BadRecords:
    """The stored frames and depth maps of a run that failed to decode, with what stood in for
    each (`data.skip_bad`): shared by a run's stores and written from their decoding threads.
    Each is warned about once, naming its dataset, split, record, video and frame."""

    def __init__(self):
        self._lock = threading.Lock()
        self._messages: dict[str, str] = {}   # the failed item's name → what was done instead

    def add(self, name: str, message: str) -> None:
        with self._lock:
            if name in self._messages:
                return
            self._messages[name] = message
        log.warning("%s", message)

    def __len__(self) -> int:
        return len(self._messages)

    def messages(self) -> list[str]:
        """One line per bad item, in the order they were met."""
        with self._lock:
            return list(self._messages.values())


class EncodedFrames:
    """The frames of a FasData: `decode_one(i)` → uint8 [H, W, 3]; `frames[idx]` → [n, H, W, 3].

    A frame that does not decode to that is a UserError naming it; with a `bad` registry
    (`with_bad`, data.skip_bad) it is replaced instead by the next frame, in record order, of
    its video that decodes (else of its class and domain: `group`), and reported there. The
    choice depends on the stored bytes alone, so every run and every resume makes the same one.
    """

    def __init__(self, records: Records, shape: tuple[int, int], names: np.ndarray,
                 video: np.ndarray | None = None, group: np.ndarray | None = None,
                 bad: BadRecords | None = None):
        self.records = records
        self.shape = tuple(shape)
        self._names = names  # "dataset/split record k (video v, frame f)", for error messages
        n = len(records)
        self._video = np.arange(n) if video is None else np.asarray(video)
        self._group = np.zeros(n, np.int64) if group is None else np.asarray(group)
        self.bad = bad
        self._replaced: dict[int, int] = {}  # bad frame → the frame that stands in for it

    def __len__(self) -> int:
        return len(self.records)

    def with_bad(self, bad: BadRecords) -> EncodedFrames:
        """These frames, replacing the ones that do not decode and reporting them to `bad`."""
        return EncodedFrames(self.records, self.shape, self._names, self._video, self._group, bad)

    def _decode(self, i: int) -> np.ndarray:
        return decode_rgb(self.records.bytes_of(i, "image"), self.shape, self._names[i])

    def decode_one(self, i: int) -> np.ndarray:
        i = int(i)
        j = self._replaced.get(i, i)
        try:
            return self._decode(j)
        except UserError as err:
            if self.bad is None:
                raise
            return self._stand_in(i, err)

    def _stand_in(self, i: int, err: UserError) -> np.ndarray:
        n = len(self)
        after = lambda members: members[np.argsort((members - i - 1) % n, kind="stable")]
        video = np.flatnonzero(self._video == self._video[i])
        kin = np.flatnonzero((self._group == self._group[i]) & (self._video != self._video[i]))
        for j in np.concatenate([after(video), after(kin)]).tolist():
            if j == i:
                continue
            try:
                frame = self._decode(j)
            except UserError as other:
                self.bad.add(self._names[j], f"{other} (data.skip_bad)")
                continue
            self._replaced[i] = j
            self.bad.add(self._names[i], f"{err}; replaced by {self._names[j]} (data.skip_bad)")
            return frame
        raise UserError(f"{err}; no other frame of its video, class and domain decodes to stand "
                        f"in for it (data.skip_bad)") from err

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.atleast_1d(np.asarray(idx, np.int64))
        out = np.empty((len(idx),) + self.shape + (3,), np.uint8)
        for k, i in enumerate(idx):
            out[k] = self.decode_one(i)
        return out

    def take(self, idx: np.ndarray) -> EncodedFrames:
        return EncodedFrames(self.records.take(idx), self.shape, self._names[idx],
                             self._video[idx], self._group[idx], self.bad)


class DepthStore:
    """Depth targets (Eq. 10): the stored map for a live frame that has one, the face-shaped
    prior for other live frames, zeros for spoof; float32 in [0, 1], `size` × `size`.

    `with_options(workers, bad)`: the maps of one call decoded by `workers` threads; with a `bad`
    registry (data.skip_bad) a stored map that does not decode is replaced by the prior and
    reported there, else it is a UserError naming the example."""

    def __init__(self, records: Records, labels: np.ndarray, has_map: np.ndarray, size: int,
                 names: np.ndarray | None = None, bad: BadRecords | None = None,
                 pool: ThreadPoolExecutor | None = None):
        self.records, self.labels, self.has_map, self.size = records, labels, has_map, int(size)
        self._names = names
        self.bad = bad
        self._pool = pool

    def __len__(self) -> int:
        return len(self.labels)

    def with_options(self, workers: int = 1, bad: BadRecords | None = None) -> DepthStore:
        pool = ThreadPoolExecutor(workers, "depth") if workers > 1 else None
        return DepthStore(self.records, self.labels, self.has_map, self.size, self._names, bad,
                          pool)

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.atleast_1d(np.asarray(idx, np.int64))
        out = np.zeros((len(idx), self.size, self.size), np.float32)
        live = np.flatnonzero(self.labels[idx] == 1)
        rows = idx[live].tolist()
        maps = self._pool.map(self._target, rows) if self._pool is not None and len(rows) > 1 \
            else map(self._target, rows)
        for k, target in zip(live.tolist(), maps):
            out[k] = target
        return out

    def _target(self, i: int) -> np.ndarray:
        if not self.has_map[i]:
            return _prior(self.size)
        try:
            return self._map(i)
        except UserError as err:
            if self.bad is None:
                raise
            self.bad.add(f"{self._name(i)}: depth", f"{err}; the face-shaped prior stands in "
                         f"(data.skip_bad)")
            return _prior(self.size)

    def _name(self, i: int) -> str:
        return f"example {i}" if self._names is None else str(self._names[i])

    def _map(self, i: int) -> np.ndarray:
        what = f"{self._name(i)}: depth map"
        gray = decode_gray(self.records.bytes_of(int(i), "depth"), what)
        gray = gray if gray.ndim == 2 else gray[..., 0]
        if gray.dtype == np.uint8:
            img = Image.fromarray(gray)
            if img.size != (self.size, self.size):
                img = img.resize((self.size, self.size), Image.BILINEAR)
            return np.asarray(img, np.float32) / 255.0
        if gray.dtype != np.uint16:
            raise UserError(f"{what}: stored depth map has dtype {gray.dtype}; expected 8-bit or "
                            "16-bit gray")
        # 16-bit maps span [0, 65535]; resized as floats (PIL resizes mode F, not I;16, exactly).
        img = Image.fromarray(gray.astype(np.float32) / 65535.0)
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BILINEAR)
        return np.clip(np.asarray(img, np.float32), 0.0, 1.0)

    def take(self, idx: np.ndarray) -> DepthStore:
        names = None if self._names is None else self._names[idx]
        return DepthStore(self.records.take(idx), self.labels[idx], self.has_map[idx], self.size,
                          names, self.bad, self._pool)


@functools.lru_cache(maxsize=8)
def _prior(size: int) -> np.ndarray:
    return face_depth_prior(size)


def concat(parts: list[FasData]) -> FasData:
    """Built datasets' examples pooled into one FasData (frames and depth stay encoded records)."""
    if not parts:
        raise ValueError("concat: nothing to concatenate")
    shapes = {p.frames.shape for p in parts}
    sizes = {p.depth.size for p in parts}
    if len(shapes) > 1 or len(sizes) > 1:
        raise UserError(f"pooled datasets differ in frame shape {sorted(shapes)} or depth size "
                        f"{sorted(sizes)}; build them at one resolution")
    records = Records.concat([p.frames.records for p in parts])
    labels = np.concatenate([p.labels for p in parts])
    cat = lambda f: np.concatenate([getattr(p, f) for p in parts])  # noqa: E731
    names = np.concatenate([p.frames._names for p in parts])
    has_map = np.concatenate([p.depth.has_map for p in parts])
    video, domain = cat("video"), cat("domain")
    return FasData(
        EncodedFrames(records, parts[0].frames.shape, names, video, _groups(labels, domain)),
        labels, DepthStore(records, labels, has_map, parts[0].depth.size, names),
        video, domain, cat("attack"), cat("frame"), cat("origin"),
        [s for p in parts for s in p.skipped])


def _groups(labels: np.ndarray, domain: np.ndarray) -> np.ndarray:
    """An integer per example, equal for examples of the same class and domain."""
    keys = np.char.add(np.char.add(labels.astype(str), "|"), np.asarray(domain).astype(str))
    return np.unique(keys, return_inverse=True)[1].reshape(-1)


def load(name: str, split: str, data_dir: str, config: dict | None = None, *,
         depth_size: int | None = None, in_memory: bool = True) -> FasData:
    """The built split `split` of dataset `name` (with the same config overrides as its build).

    depth_size: side of the depth targets (default: the frames' resolution).
    in_memory: keep the encoded frames in memory (about the dataset's size on disk; decoding then
      skips the record read); False re-reads each record from the ArrayRecord files."""
    builder = builders.builder(name, data_dir, config)
    if not builder.is_prepared():
        overrides = " ".join(f"--config {k}={v}" for k, v in (config or {}).items())
        raise MissingFileError(
            f"{name} (config {builder.builder_config.name}) is not built in {data_dir}; run: "
            f"python -m d2am_jax.data.build {name} --data_dir {data_dir} "
            f"--manual_dir <release folder> {overrides}".rstrip())
    return from_builder(builder, split, depth_size=depth_size, in_memory=in_memory)


def load_directory(path: str, split: str, *, depth_size: int | None = None,
                   in_memory: bool = True) -> FasData:
    """A split of the dataset built in `path` (…/<name>/<config>/<version>)."""
    return from_builder(tfds.builder_from_directory(path), split, depth_size=depth_size,
                        in_memory=in_memory)


def from_builder(builder, split: str, *, depth_size: int | None = None,
                 in_memory: bool = True) -> FasData:
    if split not in builder.info.splits:
        raise UserError(f"{builder.name}: no split {split!r}; it has "
                         f"{sorted(builder.info.splits.keys())}")
    source = builder.as_data_source(split)
    n = len(source)
    if n == 0:
        raise UserError(f"{builder.name}/{split} in {builder.data_dir} is empty")
    meta = {k: [] for k in ("label", "video", "domain", "attack", "frame", "has_depth", "image",
                            "depth")}
    for start in range(0, n, _CHUNK):
        for rec in source.__getitems__(range(start, min(n, start + _CHUNK))):
            meta["label"].append(int(rec["label"]))
            meta["video"].append(_text(rec["video"]))
            meta["domain"].append(_text(rec["domain"]))
            meta["attack"].append(_text(rec["attack"]))
            meta["frame"].append(int(rec["frame"]))
            meta["has_depth"].append(len(rec["depth"]) > 0)
            if in_memory:
                meta["image"].append(rec["image"])
                meta["depth"].append(rec["depth"])
    labels = np.asarray(meta["label"], np.int32)
    bad = sorted(set(labels.tolist()) - {0, 1})
    if bad:
        raise UserError(f"{builder.name}/{split}: labels {bad} outside {{0 spoof, 1 live}}")
    blobs = None
    if in_memory:
        blobs = {k: np.empty(n, object) for k in ("image", "depth")}
        for k in blobs:
            blobs[k][:] = meta[k]
    records = Records([source], np.zeros(n, np.int32), np.arange(n), blobs)
    shape = _frame_shape(records, f"{builder.name}/{split}")
    video = np.asarray([f"{builder.name}:{v}" for v in meta["video"]])
    # Errors about a frame name its dataset, split, record index, video and frame.
    names = np.asarray([f"{builder.name}/{split} record {k} (video {v}, frame {f})"
                        for k, (v, f) in enumerate(zip(video, meta["frame"]))])
    report = builders.read_report(builder.data_dir) or {}
    if report.get("num_skipped"):
        log.warning("%s: its build skipped %d bad item(s); see %s", builder.name,
                    report["num_skipped"], os.path.join(builder.data_dir, builders.REPORT_FILE))
    domain = np.asarray(meta["domain"])
    return FasData(
        frames=EncodedFrames(records, shape, names, video, _groups(labels, domain)),
        labels=labels,
        depth=DepthStore(records, labels, np.asarray(meta["has_depth"]), depth_size or shape[0],
                         names),
        video=video, domain=domain, attack=np.asarray(meta["attack"]),
        frame=np.asarray(meta["frame"], np.int32),
        origin=np.full(n, f"{builder.name}/{split}"),
        skipped=[dict(s, dataset=builder.name) for s in report.get("skipped", [])])


def _frame_shape(records: Records, what: str) -> tuple[int, int]:
    """The frames' (H, W): from the first PNG header, else the first frame that decodes (so one
    damaged record fails where it is used, under data.skip_bad not at all)."""
    first_error = None
    for i in range(len(records)):
        blob = records.bytes_of(i, "image")
        header = png_header(blob)
        if header is not None:
            return header[:2]
        try:
            return decode_png_or_jpeg(blob, f"{what} record {i}").shape[:2]
        except UserError as err:
            first_error = first_error or err
    raise UserError(f"{what}: no stored frame decodes (the first: {first_error})")


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
