"""Faces and their 3D shape: BlazeFace detection and the 468-landmark Face Mesh (MediaPipe's
.tflite files, run by OpenCV's dnn module), and live depth maps rasterised from the mesh.

Host-only (numpy, OpenCV). The two model files ship in d2am_jax/data/models/ (models/README.md
says where they come from); nothing is downloaded. Boxes are (x, y, w, h) in frame pixels.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading

import cv2
import numpy as np

from d2am_jax.data.faces import BadItem
from d2am_jax.errors import MissingFileError

MODEL_DIR = os.path.join(os.path.dirname(__file__), "models")
DETECTOR_PATH = os.path.join(MODEL_DIR, "face_detection_short_range.tflite")
MESH_PATH = os.path.join(MODEL_DIR, "face_landmark.tflite")
TRIANGLES_PATH = os.path.join(MODEL_DIR, "face_mesh_triangles.txt")

DETECT_SIZE = 128     # BlazeFace (short range) input side
MESH_SIZE = 192       # Face Mesh input side
MIN_SCORE = 0.5       # MediaPipe's own threshold for the short-range detector
NMS_IOU = 0.3
# MediaPipe's detection-to-ROI rule for the mesh: a square 1.5 × the detector box, turned so the
# eyes are level.
ROI_SCALE = 1.5
MIN_PRESENCE = 0.5    # the mesh model's face-presence probability below which it has no face


class MeshError(BadItem):
    """A face crop on which the Face Mesh finds no face (the depth map cannot be made)."""


@dataclasses.dataclass(frozen=True)
class Face:
    """A BlazeFace detection: box (x, y, w, h) and six keypoints (x, y) in frame pixels (right
    eye, left eye, nose tip, mouth, right ear, left ear, as seen by the person), and its score."""

    box: tuple[float, float, float, float]
    keypoints: np.ndarray
    score: float

    def int_box(self) -> tuple[int, int, int, int]:
        return tuple(int(round(v)) for v in self.box)


def model_available() -> bool:
    """True where the model files are present and this OpenCV can read TFLite (≥ 4.8)."""
    return (all(os.path.isfile(p) for p in (DETECTOR_PATH, MESH_PATH, TRIANGLES_PATH))
            and hasattr(cv2.dnn, "readNetFromTFLite"))


_local = threading.local()


def _net(path: str):
    # A cv2.dnn.Net keeps per-call state: one per thread, like the Haar cascade in faces.py.
    nets = getattr(_local, "nets", None)
    if nets is None:
        nets = _local.nets = {}
    if path not in nets:
        if not os.path.isfile(path):
            raise MissingFileError(f"face model file {path} is missing; reinstall d2am_jax "
                                    "(it ships in d2am_jax/data/models/)")
        nets[path] = cv2.dnn.readNetFromTFLite(path)
    return nets[path]


@functools.cache
def blazeface_anchors() -> np.ndarray:
    """The 896 anchor centres (x, y) in [0, 1] of the short-range BlazeFace: strides 8 and 16,
    2 and 6 anchors per cell (MediaPipe's SsdAnchorsCalculator options for this model)."""
    out = []
    for stride, per_cell in ((8, 2), (16, 6)):
        g = DETECT_SIZE // stride
        ys, xs = np.meshgrid((np.arange(g) + 0.5) / g, (np.arange(g) + 0.5) / g, indexing="ij")
        cells = np.stack([xs.ravel(), ys.ravel()], 1)
        out.append(np.repeat(cells, per_cell, axis=0))
    return np.concatenate(out).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -80.0, 80.0)))


def detect_faces(rgb: np.ndarray, min_score: float = MIN_SCORE) -> list[Face]:
    """Every face BlazeFace finds in an RGB uint8 frame, best score first (after NMS)."""
    h, w = rgb.shape[:2]
    side = max(h, w)
    # Letterbox to a square, as MediaPipe does, so faces keep their shape.
    top, left = (side - h) // 2, (side - w) // 2
    square = cv2.copyMakeBorder(rgb, top, side - h - top, left, side - w - left,
                                cv2.BORDER_CONSTANT, value=(0, 0, 0))
    x = cv2.resize(square, (DETECT_SIZE, DETECT_SIZE), interpolation=cv2.INTER_AREA
                   if side > DETECT_SIZE else cv2.INTER_LINEAR)
    blob = (x.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None]
    net = _net(DETECTOR_PATH)
    net.setInput(np.ascontiguousarray(blob))
    cls, reg = net.forward(["classificators", "regressors"])
    scores = _sigmoid(cls[0, :, 0])
    keep = np.flatnonzero(scores >= min_score)
    if keep.size == 0:
        return []
    anchors = blazeface_anchors()[keep]
    r = reg[0, keep] / DETECT_SIZE
    centre = r[:, :2] + anchors
    size = r[:, 2:4]
    kps = r[:, 4:].reshape(-1, 6, 2) + anchors[:, None, :]
    to_px = lambda v: v * side - np.array([left, top], np.float32)  # noqa: E731
    boxes = np.concatenate([to_px(centre - size / 2), size * side], 1)
    picked = cv2.dnn.NMSBoxes(boxes.tolist(), scores[keep].tolist(), min_score, NMS_IOU)
    picked = sorted(np.asarray(picked).ravel().tolist(), key=lambda i: -scores[keep][i])
    return [Face(tuple(float(v) for v in boxes[i]), to_px(kps[i]), float(scores[keep][i]))
            for i in picked]


def detect_face(rgb: np.ndarray, min_score: float = MIN_SCORE) -> Face | None:
    """The largest face BlazeFace finds in an RGB frame (the subject, not a bystander), or None."""
    found = detect_faces(rgb, min_score)
    return max(found, key=lambda f: f.box[2] * f.box[3]) if found else None


def roi_transform(face: Face | None, shape) -> np.ndarray:
    """The 2×3 affine map from frame pixels to the mesh's 192×192 input: MediaPipe's ROI around
    a detection, or (face None) the frame's centred square ROI_SCALE / 1.25 its side, level —
    for a face crop made with a 25% margin, which is where the face is."""
    if face is None:
        h, w = shape[:2]
        centre, side, angle = (w / 2.0, h / 2.0), max(h, w) * ROI_SCALE / 1.25, 0.0
    else:
        x, y, bw, bh = face.box
        centre, side = (x + bw / 2.0, y + bh / 2.0), max(bw, bh) * ROI_SCALE
        (rx, ry), (lx, ly) = face.keypoints[0], face.keypoints[1]
        angle = float(np.degrees(np.arctan2(ly - ry, lx - rx)))
    m = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), angle, MESH_SIZE / side)
    m[:, 2] += (MESH_SIZE / 2.0 - centre[0], MESH_SIZE / 2.0 - centre[1])
    return m


def mesh_landmarks(rgb: np.ndarray, face: Face | None) -> tuple[np.ndarray, float]:
    """The 468 Face Mesh landmarks of a face as float32 [468, 3] — x, y in frame pixels, z in the
    same units, smaller z nearer the camera — and the model's face-presence probability."""
    m = roi_transform(face, rgb.shape)
    roi = cv2.warpAffine(rgb, m, (MESH_SIZE, MESH_SIZE), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT)
    net = _net(MESH_PATH)
    net.setInput(np.ascontiguousarray((roi.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]))
    flag, points = net.forward(["conv2d_31", "conv2d_21"])
    pts = points.reshape(468, 3).astype(np.float64)
    inv = cv2.invertAffineTransform(m)
    xy = pts[:, :2] @ inv[:, :2].T + inv[:, 2]
    z = pts[:, 2] * np.hypot(inv[0, 0], inv[0, 1])  # the ROI's scale, back to frame pixels
    return np.concatenate([xy, z[:, None]], 1).astype(np.float32), float(_sigmoid(flag.ravel()[0]))


@functools.cache
def mesh_triangles() -> np.ndarray:
    """The Face Mesh's triangles as int [T, 3] (models/face_mesh_triangles.txt)."""
    return np.loadtxt(TRIANGLES_PATH, dtype=np.int64, comments="#").reshape(-1, 3)


def zbuffer(xy: np.ndarray, height: np.ndarray, triangles: np.ndarray, size: int) -> np.ndarray:
    """Rasterise a triangle mesh onto a size×size grid with a z-buffer, vectorised.

    xy: [N, 2] vertex positions in grid pixels; height: [N] per-vertex value, larger = nearer.
    Returns float32 [size, size]: at each pixel centre covered by the mesh, the nearest surface's
    linearly interpolated height; NaN where no triangle covers the pixel.
    """
    v = xy[triangles].astype(np.float64)                                # [T, 3, 2]
    hz = height[triangles].astype(np.float64)                           # [T, 3]
    lo = np.clip(np.floor(v.min(1) - 0.5).astype(np.int64), 0, size - 1)
    hi = np.clip(np.ceil(v.max(1) - 0.5).astype(np.int64), 0, size - 1)
    (ax, ay), (bx, by), (cx, cy) = v[:, 0].T, v[:, 1].T, v[:, 2].T
    area = (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)
    on_grid = (np.abs(area) > 1e-9) & (v.max(1) >= 0).all(1) & (v.min(1) <= size).all(1)
    t = np.flatnonzero(on_grid)
    wx = hi[t, 0] - lo[t, 0] + 1
    wy = hi[t, 1] - lo[t, 1] + 1
    counts = wx * wy
    # One row per (triangle, pixel of its bounding box): the per-pixel loop, as array ops.
    tri = np.repeat(t, counts)
    local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    width = np.repeat(wx, counts)
    px = lo[tri, 0] + local % width
    py = lo[tri, 1] + local // width
    qx, qy = px + 0.5, py + 0.5
    inv = 1.0 / area[tri]
    l1 = ((qx - ax[tri]) * (cy[tri] - ay[tri]) - (qy - ay[tri]) * (cx[tri] - ax[tri])) * inv
    l2 = ((bx[tri] - ax[tri]) * (qy - ay[tri]) - (by[tri] - ay[tri]) * (qx - ax[tri])) * inv
    l0 = 1.0 - l1 - l2
    inside = (l0 >= -1e-9) & (l1 >= -1e-9) & (l2 >= -1e-9)
    value = l0 * hz[tri, 0] + l1 * hz[tri, 1] + l2 * hz[tri, 2]
    buf = np.full(size * size, -np.inf)
    np.maximum.at(buf, (py * size + px)[inside], value[inside])
    buf[np.isinf(buf)] = np.nan
    return buf.reshape(size, size).astype(np.float32)


def depth_from_landmarks(points: np.ndarray, size: int, scale: float = 1.0) -> np.ndarray:
    """A [size, size] float32 depth map in [0, 1] from Face Mesh landmarks: the mesh's surface,
    nearest landmark = 1, farthest = 0, and 0 outside the face.

    points: [468, 3] as from mesh_landmarks, in the pixels of an image that the depth grid
    covers at `scale` grid pixels per image pixel.
    """
    near = -points[:, 2].astype(np.float64)
    span = float(near.max() - near.min())
    if not np.isfinite(span) or span <= 0:
        raise MeshError("the face mesh is flat (all landmarks at one depth)")
    height = (near - near.min()) / span
    grid = zbuffer(points[:, :2].astype(np.float64) * scale, height, mesh_triangles(), size)
    return np.nan_to_num(grid, nan=0.0).clip(0.0, 1.0).astype(np.float32)


def crop_depth(crop: np.ndarray, size: int | None = None,
               min_presence: float = MIN_PRESENCE) -> np.ndarray:
    """The depth map of the face in a face crop (RGB uint8), on a size×size grid (default: the
    crop's side). Raises MeshError when the mesh finds no face there."""
    h, w = crop.shape[:2]
    size = size or max(h, w)
    face = detect_face(crop)
    points, presence = mesh_landmarks(crop, face)
    if presence < min_presence:
        raise MeshError(f"the face mesh finds no face in the crop (presence {presence:.2f} < "
                        f"{min_presence})")
    return depth_from_landmarks(points, size, size / max(h, w))


DETECTORS = ("auto", "blazeface", "haar")


def find_face_box(rgb: np.ndarray, detector: str = "auto"):
    """(box (x, y, w, h) of the largest face, the detector that found it) or (None, '').

    'auto': BlazeFace, and the Haar cascade for a frame BlazeFace misses or where the model is
    not installed; 'blazeface' or 'haar': that one only.
    """
    from d2am_jax.data import faces
    if detector not in DETECTORS:
        raise ValueError(f"detector: expected one of {DETECTORS}, got {detector!r}")
    if detector in ("auto", "blazeface") and (detector == "blazeface" or model_available()):
        face = detect_face(rgb)
        if face is not None:
            return face.int_box(), "blazeface"
        if detector == "blazeface":
            return None, ""
    box = faces.detect_face(rgb)
    return (box, "haar") if box is not None else (None, "")


def looks_upside_down(rgb: np.ndarray) -> bool | None:
    """Whether a frame shows its face turned by 180°: BlazeFace scores the frame as it is and
    turned, and the better score wins (it still finds upside-down faces, less surely, and its
    keypoints then follow an upright face's layout, so they cannot tell). None: no face either
    way."""
    up = detect_faces(rgb)
    down = detect_faces(np.ascontiguousarray(rgb[::-1, ::-1]))
    if not up and not down:
        return None
    return max((f.score for f in down), default=0.0) > max((f.score for f in up), default=0.0)


def video_upside_down(images: list[np.ndarray]) -> bool | None:
    """Whether a video is stored turned by 180°: the majority of looks_upside_down over up to
    three of its frames, evenly spread; None when none of them shows a face either way."""
    step = max(1, len(images) // 3)
    votes = [v for v in (looks_upside_down(rgb) for rgb in images[::step][:3]) if v is not None]
    return 2 * sum(votes) > len(votes) if votes else None
