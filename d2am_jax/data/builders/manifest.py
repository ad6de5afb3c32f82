"""fas_manifest: any user's face frames listed in manifest.csv (path,label[,video][,domain][,depth],
paths relative to the manifest), checked row by row and stored as one split, 'frames'.

Frames are taken as already cropped faces and resized; face_crop=haar crops them first.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from d2am_jax.data import facemesh, faces
from d2am_jax.data.builders.common import (
    LIVE,
    REPORT_FILE,
    SPOOF,
    FasBuilder,
    FasConfig,
    check_depth,
    default_depth,
)
from d2am_jax.data.faces import BadItem

REQUIRED = ("path", "label")
OPTIONAL = ("video", "domain", "depth")
LABELS = {"live": LIVE, "spoof": SPOOF}
SPLIT = "frames"  # tfds reserves "all"


@dataclasses.dataclass(eq=False)
class FasManifestConfig(FasConfig):
    """manifest: path of the CSV ('' → <manual_dir>/manifest.csv).
    resolution: side of the stored square frames (non-square frames are resized, not cropped).
    face_crop: 'none' (frames are face crops) or 'haar' (crop the largest face, with face_margin).
    default_domain: the domain of rows without one.
    depth: depth maps of live rows without a depth column entry: 'mesh' (Face Mesh on the stored
      frame; the default where the model is installed), 'prior', or a folder holding a map at each
      image's manifest-relative path (any image extension).
    """

    manifest: str = ""
    resolution: int = 256
    face_crop: str = "none"
    face_margin: float = 0.25
    image_format: str = "jpeg"
    jpeg_quality: int = 95
    default_domain: str = "manifest"
    depth: str = dataclasses.field(default_factory=default_depth)

    def validate(self) -> None:
        self.check_positive("resolution", "jpeg_quality")
        self.check_choice("face_crop", ("none", "haar"))
        self.check_choice("image_format", ("jpeg", "png"))
        if not self.default_domain:
            raise ValueError("FasManifestConfig.default_domain: expected a non-empty name")
        check_depth("FasManifestConfig", self.depth)


@dataclasses.dataclass(frozen=True)
class Row:
    line: int
    path: str
    label: int
    video: str
    domain: str
    depth: str


class FasManifest(FasBuilder):
    """A user's frames from manifest.csv."""

    DESCRIPTION = "User frames listed in a manifest.csv (path,label[,video][,domain][,depth])."
    VERSION = tfds.core.Version("1.1.0")  # 1.1.0: the depth option, mesh by default
    RELEASE_NOTES = {"1.0.0": "First release.",
                     "1.1.0": "depth=mesh by default for live rows without a depth map."}
    BUILDER_CONFIGS = [FasManifestConfig(name="default")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put manifest.csv in manual_dir (or pass --config manifest=PATH). Header and columns:
  path,label[,video][,domain][,depth]
path: image file relative to the manifest (RGB PNG/JPEG/...); label: live or spoof; video: groups
frames of one video (default: the path); domain: e.g. the camera or site, used to choose source and
target domains (default: default_domain); depth: optional depth map image (8-bit gray) for a live
frame, relative to the manifest (default: the face-shaped prior).
"""

    def manifest_path(self, manual_dir) -> str:
        """The config's manifest, else <manual_dir>/manifest.csv (manual_dir may be a callable
        giving it: tfds' dl_manager.manual_dir fails when read without a manual_dir)."""
        path = self.builder_config.manifest
        if not path:
            path = os.path.join(str(manual_dir() if callable(manual_dir) else manual_dir),
                                "manifest.csv")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"fas_manifest: {path} does not exist.\n"
                                    f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        return os.path.abspath(path)

    def _split_generators(self, dl_manager):
        self._manifest = self.manifest_path(lambda: dl_manager.manual_dir)
        rows = self.read_rows(self._manifest)
        return {SPLIT: self._counted(SPLIT, self._map_items(
            rows, self.row_examples, lambda r: f"{self._manifest}:{r.line}", "manifest rows"))}

    def _report_extra(self) -> dict:
        return {"manifest": self._manifest, "manifest_sha256": file_sha256(self._manifest)}

    def download_and_prepare(self, **kwargs):
        """Refuse to reuse a build made from a different manifest under the same config."""
        config = kwargs.get("download_config")
        if self.is_prepared() and config is not None and not config.download_mode.overwrite_dataset:
            built = json.load(open(os.path.join(self.data_dir, REPORT_FILE))).get("manifest")
            now = self.manifest_path(config.manual_dir or "")
            if built and built != now:
                raise ValueError(
                    f"fas_manifest/{self.builder_config.name} in {self.data_dir} was built from "
                    f"{built}, not {now}: pass --config manifest={now} (its own build) or "
                    "--overwrite")
        return super().download_and_prepare(**kwargs)

    # -- rows -----------------------------------------------------------------------------------

    def read_rows(self, manifest: str) -> list[Row]:
        """Parse and check every row; a bad row fails (or is skipped) naming file:line."""
        base = os.path.dirname(manifest)
        with open(manifest, newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED if c not in header]
            unknown = [c for c in header if c not in REQUIRED + OPTIONAL]
            if missing or unknown:
                raise BadItem(f"{manifest}:1: header {header}: "
                              + (f"missing column(s) {missing}; " if missing else "")
                              + (f"unknown column(s) {unknown}; " if unknown else "")
                              + f"expected path,label[,video][,domain][,depth]")
            reader.fieldnames = header
            rows = []
            for record in reader:
                line = reader.line_num
                try:
                    rows.append(self.parse_row(manifest, base, line, record))
                except BadItem as e:
                    self._guard(f"{manifest}:{line}", e)
        if not rows:
            raise BadItem(f"{manifest}: no usable rows")
        return rows

    def parse_row(self, manifest: str, base: str, line: int, record: dict) -> Row:
        where = f"{manifest}:{line}"
        if None in record:
            raise BadItem(f"{where}: more fields than the header's {len(record) - 1} columns")
        rel = (record.get("path") or "").strip()
        if not rel:
            raise BadItem(f"{where}: empty path")
        path = os.path.join(base, rel)
        if not os.path.isfile(path):
            raise BadItem(f"{where}: image file {path} does not exist")
        label = (record.get("label") or "").strip().lower()
        if label not in LABELS:
            raise BadItem(f"{where}: unknown label {record.get('label')!r}, "
                          f"expected 'live' or 'spoof'")
        depth = (record.get("depth") or "").strip()
        if depth:
            depth = os.path.join(base, depth)
            if not os.path.isfile(depth):
                raise BadItem(f"{where}: depth file {depth} does not exist")
        return Row(line, path, LABELS[label], (record.get("video") or "").strip() or rel,
                   (record.get("domain") or "").strip() or self.builder_config.default_domain,
                   depth)

    def row_examples(self, row: Row):
        cfg = self.builder_config
        where = f"{self._manifest}:{row.line}"
        rgb = read_rgb(row.path, where)
        notes = []
        if cfg.face_crop == "haar":
            box = faces.detect_face(rgb)
            if box is None:
                raise BadItem(f"{where}: no face found by the Haar cascade in {row.path}")
            rgb = faces.crop_face(rgb, box, cfg.face_margin, cfg.resolution)
        else:
            rgb = faces.resize_square(rgb, cfg.resolution)
        depth = b""
        if row.depth and row.label == LIVE:
            depth = faces.encode_image(faces.read_depth_image(row.depth, cfg.resolution), "png")
        elif row.depth:
            notes.append("spoof_rows_depth_ignored_target_is_zero")
        elif row.label == LIVE:
            depth = self._depth_option_bytes(row, rgb, where, notes)
        example = {"image": faces.encode_image(rgb, cfg.image_format, cfg.jpeg_quality),
                   "label": row.label, "depth": depth, "video": row.video, "domain": row.domain,
                   "frame": 0, "attack": ""}
        return [(str(row.line), example)], notes

    def _depth_option_bytes(self, row: Row, rgb: np.ndarray, where: str, notes: list) -> bytes:
        """A live row's depth map from the `depth` option (b'' → the prior; failures counted)."""
        depth = self.builder_config.depth
        if depth == "prior":
            return b""
        if depth == "mesh":
            try:
                return faces.encode_depth(facemesh.crop_depth(rgb))
            except facemesh.MeshError as e:
                notes.append(("live_rows_mesh_failed_used_prior", f"{where}: {row.path}: {e}"))
                return b""
        stem = os.path.splitext(os.path.relpath(row.path, os.path.dirname(self._manifest)))[0]
        found = [stem + ext for ext in (".png", ".jpg", ".jpeg", ".bmp")
                 if os.path.isfile(os.path.join(depth, stem + ext))]
        if not found:
            notes.append("live_rows_without_depth_map_used_prior")
            return b""
        path = os.path.join(depth, found[0])
        return faces.encode_image(faces.read_depth_image(path, self.builder_config.resolution),
                                  "png")

    def _map_items(self, items, fn, label, desc):
        # frame = position of the row within its video, in manifest order
        position: dict[str, int] = {}
        for key, example in super()._map_items(items, fn, label, desc):
            example["frame"] = position.get(example["video"], 0)
            position[example["video"]] = example["frame"] + 1
            yield key, example


def read_rgb(path: str, where: str) -> np.ndarray:
    """An RGB image file as uint8 [H, W, 3]; other channel counts and corrupt files fail."""
    try:
        with Image.open(path) as img:
            img.load()
            mode, bands = img.mode, len(img.getbands())
            if mode != "RGB":
                raise BadItem(f"{where}: {path} has mode {mode} ({bands} channel(s)); expected an "
                              "RGB image with 3 channels (convert grayscale/RGBA/palette files "
                              "to RGB first)")
            return np.asarray(img, dtype=np.uint8).copy()
    except BadItem:
        raise
    except (OSError, ValueError, SyntaxError) as e:
        raise BadItem(f"{where}: {path} cannot be decoded as an image ({e})") from e


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
