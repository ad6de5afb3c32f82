"""Video frames and face crops for the dataset builders: evenly spaced frame sampling, Haar or
annotation face boxes, square crops with a margin, resizing and image encoding (OpenCV + PIL).

Host-only (numpy, OpenCV, PIL). Boxes are (x, y, w, h) in pixels of the frame they belong to.
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading

import cv2
import numpy as np
from PIL import Image

# A detector box narrower than this fraction of the frame's shorter side is taken for a false
# positive (background texture); real FAS faces fill a large part of the frame.
MIN_FACE_FRACTION = 0.08
# Haar runs on a copy whose longer side is at most this; 1080p frames are slow and gain nothing.
DETECT_MAX_SIDE = 640


class BadItem(ValueError):
    """An input file (video, image, annotation, manifest row) that cannot become examples."""


_local = threading.local()


def haar_detector() -> cv2.CascadeClassifier:
    """OpenCV's frontal-face Haar cascade (shipped inside opencv-python-headless), one per
    thread: a CascadeClassifier shared by threads gives wrong detections."""
    cascade = getattr(_local, "cascade", None)
    if cascade is None:
        path = os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
        cascade = cv2.CascadeClassifier(path)
        if cascade.empty():
            raise RuntimeError(f"could not load the Haar cascade from {path}")
        _local.cascade = cascade
    return cascade


def detect_face(rgb: np.ndarray) -> tuple[int, int, int, int] | None:
    """The largest frontal face in an RGB uint8 frame as (x, y, w, h), or None."""
    h, w = rgb.shape[:2]
    scale = min(1.0, DETECT_MAX_SIDE / max(h, w))
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if scale < 1.0:
        gray = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    gray = cv2.equalizeHist(gray)
    min_side = max(12, int(MIN_FACE_FRACTION * min(gray.shape)))
    faces = haar_detector().detectMultiScale(
        gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side))
    if len(faces) == 0:
        return None
    x, y, bw, bh = max(faces, key=lambda b: b[2] * b[3])
    return tuple(int(round(v / scale)) for v in (x, y, bw, bh))


def box_from_eyes(left: tuple[float, float],
                  right: tuple[float, float]) -> tuple[int, int, int, int]:
    """A detector-like square face box from two eye centres (OULU-NPU's annotations).

    Assumption, from average face proportions: a Haar/MTCNN face box is about 2.2 interocular
    distances wide and places the eyes 0.38 of its height from the top.
    """
    (lx, ly), (rx, ry) = left, right
    d = float(np.hypot(rx - lx, ry - ly))
    if d <= 0:
        raise ValueError(f"box_from_eyes: the two eye positions coincide ({left}, {right})")
    side = 2.2 * d
    cx, cy = (lx + rx) / 2.0, (ly + ry) / 2.0
    return (int(round(cx - side / 2)), int(round(cy - 0.38 * side)), int(round(side)),
            int(round(side)))


def crop_face(rgb: np.ndarray, box, margin: float, size: int) -> np.ndarray:
    """A size×size uint8 crop: the square around `box` enlarged by `margin` (0.25 = 25% wider).

    Parts of the square outside the frame are filled by replicating the border, so the face stays
    centred and unscaled near frame edges.
    """
    x, y, w, h = box
    side = max(w, h) * (1.0 + margin)
    cx, cy = x + w / 2.0, y + h / 2.0
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    s = max(1, int(round(side)))
    fh, fw = rgb.shape[:2]
    pad = (max(0, -y0), max(0, y0 + s - fh), max(0, -x0), max(0, x0 + s - fw))
    if any(pad):
        rgb = cv2.copyMakeBorder(rgb, *pad, borderType=cv2.BORDER_REPLICATE)
        x0, y0 = x0 + pad[2], y0 + pad[0]
    return resize_square(rgb[y0:y0 + s, x0:x0 + s], size)


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize to size×size (area interpolation when shrinking, cubic when enlarging)."""
    h, w = rgb.shape[:2]
    if (h, w) == (size, size):
        return np.ascontiguousarray(rgb)
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_CUBIC
    return cv2.resize(rgb, (size, size), interpolation=interp)


def sample_indices(total: int, n: int) -> np.ndarray:
    """n evenly spaced frame indices in [0, total): the centres of n equal segments.

    Centres rather than the ends skip the first and last frames, which are often transitions.
    Short videos give every frame once (fewer than n).
    """
    if total <= 0:
        return np.zeros((0,), np.int64)
    if total <= n:
        return np.arange(total, dtype=np.int64)
    return ((np.arange(n) + 0.5) * total / n).astype(np.int64)


# Decoders recover after a corrupt frame (grab() fails once, the next frame decodes): a run of
# failures this long is taken for the end of the file rather than a bad patch.
MAX_BAD_RUN = 16


@dataclasses.dataclass
class VideoFrames:
    """Sampled frames of one video, (frame index, RGB uint8) in order, and the indices of frames
    that failed to decode on the way (skipped, for the caller to count and list)."""

    frames: list[tuple[int, np.ndarray]]
    bad: list[int]


def _count_frames(path: str) -> int:
    """The number of frames, by decoding: one past the last frame that decodes."""
    cap = cv2.VideoCapture(path)
    i, run, count = 0, 0, 0
    while run <= MAX_BAD_RUN:
        if cap.grab():
            run, count = 0, i + 1
        else:
            run += 1
        i += 1
    cap.release()
    return count


def frame_indices(total: int, n: int | None = None, every: int | None = None) -> np.ndarray:
    """The frames to sample: n evenly spaced (sample_indices) or every `every`-th from 0."""
    if every is not None:
        if every < 1:
            raise ValueError(f"frame sampling: every must be ≥ 1, got {every}")
        return np.arange(0, max(total, 0), every, dtype=np.int64)
    if n is None or n < 1:
        raise ValueError(f"frame sampling: n must be ≥ 1, got {n}")
    return sample_indices(total, n)


def sample_video(path: str, n: int | None = None, every: int | None = None) -> VideoFrames:
    """Frames of a video, n evenly spaced or every `every`-th, with the undecodable ones skipped
    and listed. Trusts the container's frame count, and counts by decoding when it is missing or
    the video ends early (common for .mov). Raises BadItem for a video OpenCV cannot read."""
    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise BadItem(f"{path}: OpenCV cannot open this video")
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.release()
    if total <= 0:
        total = _count_frames(path)
    frames, bad, end = _read_at(path, frame_indices(total, n, every), total)
    if end is not None and end < total:
        frames, bad, _ = _read_at(path, frame_indices(end, n, every), end)
    if not frames:
        raise BadItem(f"{path}: no frame could be decoded"
                      + (f" ({len(bad)} frame(s) failed: {bad[:8]})" if bad else ""))
    return VideoFrames(frames, bad)


def read_video_frames(path: str, n: int) -> list[tuple[int, np.ndarray]]:
    """n evenly spaced frames of a video as (frame index, RGB uint8), in order (sample_video
    without the list of undecodable frames)."""
    return sample_video(path, n).frames


def _read_at(path: str, wanted: np.ndarray, total: int):
    """(frames at `wanted`, undecodable frame indices, index where decoding ended for good or
    None). A failed frame is skipped and decoding goes on; a run of MAX_BAD_RUN failures, or any
    failure at or past `total`, is the end of the video."""
    cap = cv2.VideoCapture(path)
    out, bad, want = [], [], set(int(k) for k in wanted)
    last, i, run, end = (max(want) if want else -1), 0, 0, None
    while i <= last:
        if cap.grab():
            run = 0
            if i in want:
                ok, bgr = cap.retrieve()
                if ok and bgr is not None:
                    out.append((i, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
                else:
                    bad.append(i)
        else:
            run += 1
            if i >= total or run > MAX_BAD_RUN:
                end = i - run + 1
                break
            bad.append(i)
        i += 1
    cap.release()
    if end is not None:
        bad = [b for b in bad if b < end]
    return out, bad, end


def nearest_boxes(boxes: list) -> list:
    """Fill None entries with the box of the nearest frame that has one (faces move little)."""
    have = [i for i, b in enumerate(boxes) if b is not None]
    if not have:
        return boxes
    return [b if b is not None else boxes[min(have, key=lambda j: abs(j - i))]
            for i, b in enumerate(boxes)]


def encode_image(rgb: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """PIL-encoded PNG or JPEG bytes of an RGB (H, W, 3) or gray (H, W) uint8 array."""
    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(rgb))
    if fmt == "png":
        # Level 1 encodes ~1.5x faster than PIL's default 6 for ~2% more bytes on FAS frames.
        img.save(buf, format="PNG", compress_level=1)
    elif fmt == "jpeg":
        img.save(buf, format="JPEG", quality=int(quality))
    else:
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {fmt!r}")
    return buf.getvalue()


def encode_depth(depth: np.ndarray) -> bytes:
    """8-bit grayscale PNG of a depth map in [0, 1] (values outside are clipped)."""
    d = np.clip(np.asarray(depth, np.float32), 0.0, 1.0)
    return encode_image(np.round(d * 255.0).astype(np.uint8), "png")


def read_depth_image(path: str, size: int) -> np.ndarray:
    """A depth map file (any 8-bit image; colour is averaged to gray) as uint8 [size, size]."""
    try:
        with Image.open(path) as img:
            img.load()
            gray = np.asarray(img.convert("L"))
    except (OSError, ValueError) as e:
        raise BadItem(f"{path}: cannot read the depth map ({e})") from e
    return cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA
                      if size < min(gray.shape) else cv2.INTER_LINEAR)
