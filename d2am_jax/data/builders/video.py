"""The video pipeline shared by the OULU-NPU, CASIA-FASD, Replay-Attack and MSU-MFSD builders:
sample frames, find the face (release annotations, BlazeFace or Haar), crop, resize, attach depth
(Face Mesh, prior or the user's maps), encode.

A dataset module only says where its videos are, what their labels and splits are, and how to
read its annotation files.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from d2am_jax.data import facemesh, faces
from d2am_jax.data.builders.common import LIVE, FasBuilder, FasConfig, check_depth, default_depth
from d2am_jax.data.faces import BadItem

SPLITS = ("train", "test")
FACE_CROP = ("auto", "annotations", "detector", "haar", "none")


@dataclasses.dataclass(eq=False)
class VideoConfig(FasConfig):
    """Frame sampling, face crop and encoding of a video dataset.

    frames_per_video: evenly spaced frames taken from each video.
    resolution: side of the square face crop stored (the paper uses 256).
    face_crop: 'auto' (the release's annotations where it has them, else the detector),
      'annotations', 'detector' (BlazeFace, Haar for the frames it misses), 'haar', or 'none'
      (frames are already face crops; just resize).
    face_margin: the square crop's side is the face box's longer side × (1 + face_margin).
    image_format / jpeg_quality: encoding of the stored frames.
    depth: live frames' depth maps: 'mesh' (from the Face Mesh on each crop; the default where
      the model is installed), 'prior' (none stored: the loader's face-shaped prior), or a folder
      of precomputed maps (e.g. PRNet) as <depth>/<video id>/<frame>.png.
    """

    frames_per_video: int = 8
    resolution: int = 256
    face_crop: str = "auto"
    face_margin: float = 0.25
    image_format: str = "jpeg"
    jpeg_quality: int = 95
    depth: str = dataclasses.field(default_factory=default_depth)

    def validate(self) -> None:
        self.check_positive("frames_per_video", "resolution", "jpeg_quality")
        self.check_choice("face_crop", FACE_CROP)
        self.check_choice("image_format", ("jpeg", "png"))
        if self.face_margin < 0:
            raise ValueError(f"{type(self).__name__}.face_margin: expected ≥ 0, "
                             f"got {self.face_margin}")
        check_depth(type(self).__name__, self.depth)


@dataclasses.dataclass(frozen=True)
class VideoItem:
    """One video of a release: where it is and what it is."""

    path: str                  # absolute path of the video file
    video_id: str              # release-relative, no extension: 'Train_files/1_1_01_1'
    split: str                 # 'train' or 'test'
    label: int                 # 1 live, 0 spoof
    attack: str                # attack type, '' for live
    annotation: str | None = None  # the release's face annotation file, if any


def files_under(folder: str, extensions: tuple[str, ...]) -> list[str]:
    """Sorted files below `folder` (recursively) whose extension is in `extensions` (any case)."""
    out = []
    for path in glob.glob(os.path.join(folder, "**", "*"), recursive=True):
        if os.path.isfile(path) and path.lower().endswith(extensions):
            out.append(path)
    return sorted(out)


def video_id(root: str, path: str) -> str:
    return os.path.splitext(os.path.relpath(path, root))[0].replace(os.sep, "/")


def read_annotation_rows(path: str, ncols: int = 5) -> np.ndarray:
    """Numeric rows of a face annotation file (comma or space separated) as float [rows, ncols].

    A malformed line fails naming the file and the line number.
    """
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = [p for p in re.split(r"[,\s]+", line.strip()) if p]
            if not parts:
                continue
            try:
                values = [float(p) for p in parts[:ncols]]
            except ValueError:
                raise BadItem(f"{path}:{lineno}: expected {ncols} numbers, "
                              f"got {line.strip()!r}") from None
            if len(values) < ncols:
                raise BadItem(f"{path}:{lineno}: expected {ncols} numbers, got {line.strip()!r}")
            rows.append(values)
    if not rows:
        raise BadItem(f"{path}: the annotation file is empty")
    return np.asarray(rows, np.float64)


def box_is_usable(box, frame_shape) -> bool:
    """A box with positive size that overlaps the frame by at least half its own area."""
    x, y, w, h = box
    if w <= 1 or h <= 1:
        return False
    fh, fw = frame_shape[:2]
    ix = max(0.0, min(x + w, fw) - max(x, 0))
    iy = max(0.0, min(y + h, fh) - max(y, 0))
    return ix * iy >= 0.5 * w * h


class VideoBuilder(FasBuilder, skip_registration=True):
    """Base of the four video builders. Subclasses define MARKERS, `discover` and, where the
    release has face annotations, `annotation_boxes`."""

    # 1.1.0 changed what the same config builds (mesh depth by default, BlazeFace crops, turned
    # videos, skipped bad frames): a new version, so a 1.0.0 build is never reused as if it were.
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "First release.",
                     "1.1.0": "depth=mesh by default (Face Mesh depth maps of live frames); "
                              "BlazeFace with Haar fallback; upside-down videos turned on every "
                              "crop path; undecodable frames skipped and listed."}
    MARKERS: tuple[str, ...] = ()          # entries that identify the release's root folder
    HAS_ANNOTATIONS = False

    def _split_generators(self, dl_manager):
        root = self.release_root(str(dl_manager.manual_dir))
        items = self.discover(root)
        by_split = {s: [it for it in items if it.split == s] for s in SPLITS}
        for split, its in by_split.items():
            if not its:
                raise BadItem(f"{self.name}: no usable {split} videos found under {root}\n"
                              f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        return {s: self._counted(s, self._examples(s, its)) for s, its in by_split.items()}

    def release_root(self, manual_dir: str) -> str:
        """The folder holding the release: manual_dir itself or one folder below it."""
        candidates = [manual_dir] + sorted(glob.glob(os.path.join(manual_dir, "*", "")))
        for c in candidates:
            if all(os.path.exists(os.path.join(c, m)) for m in self.MARKERS):
                return os.path.normpath(c)
        raise FileNotFoundError(
            f"{self.name}: {manual_dir} does not hold the release (looked for "
            f"{', '.join(self.MARKERS)} there and one folder below).\n"
            f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")

    def discover(self, root: str) -> list[VideoItem]:
        """Every video of the release under root, with split and label (each dataset's own
        layout)."""
        raise NotImplementedError(f"{type(self).__name__} must implement discover(): abstract hook")

    def annotation_boxes(self, item: VideoItem) -> dict[int, tuple]:
        """{frame index: (x, y, w, h)} from the release's annotation file (raise BadItem)."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement annotation_boxes(): abstract hook")

    # -- per video ------------------------------------------------------------------------------

    def _examples(self, split: str, items: list[VideoItem]) -> Iterator:
        return self._map_items(items, self.video_examples, lambda it: it.path,
                               f"{self.name} {split} videos")

    def video_examples(self, item: VideoItem) -> tuple[list, list[str]]:
        """The (key, example) pairs of one video, and notes for the build report."""
        cfg = self.builder_config
        sampled = faces.sample_video(item.path, cfg.frames_per_video)
        frames = sampled.frames
        notes: list = [("frames_undecodable_skipped", f"{item.path} frame {i}")
                       for i in sampled.bad]
        crops = self._crops(item, frames, notes)
        out = []
        for (index, _), crop in zip(frames, crops):
            depth = (self._depth_bytes(item, index, crop, notes) if item.label == LIVE else b"")
            out.append((f"{item.video_id}/{index}", {
                "image": faces.encode_image(crop, cfg.image_format, cfg.jpeg_quality),
                "label": item.label, "depth": depth, "video": item.video_id,
                "domain": self.name, "frame": index, "attack": item.attack}))
        return out, notes

    def _crops(self, item: VideoItem, frames, notes: list[str]) -> list[np.ndarray]:
        cfg = self.builder_config
        if cfg.face_crop == "none":
            return [faces.resize_square(rgb, cfg.resolution) for _, rgb in frames]
        detector = "haar" if cfg.face_crop == "haar" else "auto"
        # Some phone videos (six of MSU-MFSD's) are stored upside down: found out once per video,
        # whichever boxes crop it, so annotated and detected crops are both turned.
        turned = self._upside_down(frames, detector)
        if turned:
            notes.append("videos_rotated_180_to_find_the_face")
        boxes = None
        if cfg.face_crop == "annotations" or (cfg.face_crop == "auto" and self.HAS_ANNOTATIONS):
            boxes = self._annotated_boxes(item, frames, notes)
            if boxes is not None and turned:
                boxes = [rotated_box(b, rgb.shape) for (_, rgb), b in zip(frames, boxes)]
        if turned:
            frames = [(i, np.ascontiguousarray(rgb[::-1, ::-1])) for i, rgb in frames]
        if boxes is None:
            boxes = self._detected_boxes(item, frames, detector, notes)
        return [faces.crop_face(rgb, box, cfg.face_margin, cfg.resolution)
                for (_, rgb), box in zip(frames, boxes)]

    @staticmethod
    def _upside_down(frames, detector: str) -> bool:
        """Whether a video is stored turned by 180°: BlazeFace's scores upright and turned on up
        to three sampled frames (majority), or, for Haar, no face upright but one turned."""
        if detector != "haar" and facemesh.model_available():
            vote = facemesh.video_upside_down([rgb for _, rgb in frames])
            if vote is not None:
                return vote
        if any(facemesh.find_face_box(rgb, detector)[0] is not None for _, rgb in frames):
            return False
        return any(facemesh.find_face_box(np.ascontiguousarray(rgb[::-1, ::-1]), detector)[0]
                   is not None for _, rgb in frames)

    def _annotated_boxes(self, item: VideoItem, frames, notes: list[str]):
        """Boxes from the release's annotations; None (→ Haar) in 'auto' mode when unusable."""
        strict = self.builder_config.face_crop == "annotations"
        if not self.HAS_ANNOTATIONS:
            raise BadItem(f"{self.name} has no face annotations; use face_crop=haar or auto")
        try:
            if not item.annotation or not os.path.exists(item.annotation):
                raise BadItem(f"{item.path}: its face annotation file "
                              f"{item.annotation or '(none)'} is missing")
            table = self.annotation_boxes(item)
            shape = frames[0][1].shape
            table = {k: b for k, b in table.items() if box_is_usable(b, shape)}
            if not table:
                raise BadItem(f"{item.annotation}: no usable face box in the annotation file")
        except BadItem:
            if strict:
                raise
            notes.append("videos_annotation_unusable_used_detector")
            return None
        keys = np.array(sorted(table))
        boxes = []
        for index, _ in frames:
            nearest = int(keys[np.argmin(np.abs(keys - index))])
            if nearest != index:
                notes.append("frames_box_from_nearest_annotated_frame")
            boxes.append(table[nearest])
        return boxes

    def _detected_boxes(self, item: VideoItem, frames, detector: str, notes: list):
        """A box per frame from the detector ('auto': BlazeFace, Haar where it misses); a frame
        without a detection takes the nearest frame's box (counted)."""
        found = [facemesh.find_face_box(rgb, detector) for _, rgb in frames]
        boxes = [b for b, _ in found]
        if all(b is None for b in boxes):
            name = "the Haar cascade" if detector == "haar" else "BlazeFace or the Haar cascade"
            raise BadItem(f"{item.path}: no face found by {name} in any of the "
                          f"{len(frames)} sampled frames (upright or turned by 180°)")
        notes.extend(f"frames_box_from_{which}" for _, which in found if which)
        missing = sum(b is None for b in boxes)
        if missing:
            notes.extend(["frames_box_from_nearest_detected_frame"] * missing)
        return faces.nearest_boxes(boxes)

    def _depth_bytes(self, item: VideoItem, index: int, crop: np.ndarray, notes: list) -> bytes:
        """The encoded depth map of a live frame: from the mesh on its crop, from the depth
        folder, or b'' (→ the prior). A mesh that fails, or a missing map, falls back to the
        prior and is counted (a mesh failure also listed with its file and frame)."""
        cfg = self.builder_config
        if cfg.depth == "prior":
            return b""
        if cfg.depth == "mesh":
            try:
                return faces.encode_depth(facemesh.crop_depth(crop))
            except facemesh.MeshError as e:
                notes.append(("live_frames_mesh_failed_used_prior",
                              f"{item.path} frame {index}: {e}"))
                return b""
        found = depth_map_path(cfg.depth, item.video_id, index)
        if found is None:
            notes.append("live_frames_without_depth_map_used_prior")
            return b""
        path, map_frame = found
        if map_frame != index:
            notes.append("live_frames_depth_from_nearest_frame")
        return faces.encode_image(faces.read_depth_image(path, cfg.resolution), "png")


def rotated_box(box, shape) -> tuple[int, int, int, int]:
    """The box (x, y, w, h) of a frame of `shape` after the frame is turned by 180°."""
    x, y, w, h = box
    fh, fw = shape[:2]
    return (fw - x - w, fh - y - h, w, h)


DEPTH_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def depth_map_path(depth_dir: str, vid: str, index: int) -> tuple[str, int] | None:
    """<depth_dir>/<video id>/<frame>.<ext> (frame with or without leading zeros); the nearest
    frame's map in that folder when the exact one is absent; None when the folder is absent.
    Returns (path, frame index of the map)."""
    folder = os.path.join(depth_dir, *vid.split("/"))
    if not os.path.isdir(folder):
        return None
    numbered = {}
    for name in os.listdir(folder):
        stem, ext = os.path.splitext(name)
        if ext.lower() in DEPTH_EXTENSIONS and stem.isdigit():
            numbered.setdefault(int(stem), os.path.join(folder, name))
    if not numbered:
        return None
    nearest = min(numbered, key=lambda k: (abs(k - index), k))
    return numbered[nearest], nearest
