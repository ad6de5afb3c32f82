"""fas_manifest: any user's face frames listed in manifest.csv (path,label[,video][,domain][,depth],
paths relative to the manifest), checked row by row and stored as one split, 'frames'.

Frames are taken as already cropped faces and resized; face_crop=haar crops them first.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os

import cv2
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
from d2am_jax.errors import UserError

log = logging.getLogger(__name__)

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
target domains (default: default_domain); depth: optional depth map (8- or 16-bit gray) for a live
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
        """Refuse to reuse a build made from a different manifest under the same config; rebuild
        one whose manifest was edited since (its recorded sha256 differs)."""
        config = kwargs.get("download_config")
        if (super().is_prepared() and config is not None
                and not config.download_mode.overwrite_dataset):
            built = self.built_manifest()
            now = self.manifest_path(config.manual_dir or "")
            if built["path"] and built["path"] != now:
                raise UserError(
                    f"fas_manifest/{self.builder_config.name} in {self.data_dir} was built from "
                    f"{built['path']}, not {now}: pass --config manifest={now} (its own build) or "
                    "--overwrite")
            stale = self.edited_since_build()
            if stale:
                log.warning("%s; rebuilding", stale)
                kwargs["download_config"] = dataclasses.replace(
                    config, download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS)
        return super().download_and_prepare(**kwargs)

    def is_prepared(self) -> bool:
        """Built, and from the manifest as it is now: a build whose manifest was edited since is
        refused (naming the file) rather than read, so training never uses the old rows."""
        if not super().is_prepared():
            return False
        stale = self.edited_since_build()
        if stale:
            raise UserError(f"{stale}: rebuild it with python -m d2am_jax.data.build "
                            f"fas_manifest --data_dir {self.data_dir_root} --overwrite and the "
                            "same --manual_dir and --config as its build")
        return True

    def built_manifest(self) -> dict:
        """The manifest path and sha256 the build in data_dir recorded ('' for either if none)."""
        report = os.path.join(self.data_dir, REPORT_FILE)
        with open(report) as f:
            recorded = json.load(f)
        return {"path": recorded.get("manifest") or "",
                "sha256": recorded.get("manifest_sha256") or ""}

    def edited_since_build(self) -> str:
        """Why the build is stale ('' if it is not): its manifest no longer has the recorded
        sha256. A manifest that is gone cannot be checked; the build is used, with a warning."""
        built = self.built_manifest()
        if not (built["path"] and built["sha256"]):
            return ""
        if not os.path.isfile(built["path"]):
            log.warning("fas_manifest/%s in %s: its manifest %s is gone; using the build as it "
                        "is", self.builder_config.name, self.data_dir, built["path"])
            return ""
        now = file_sha256(built["path"])
        if now == built["sha256"]:
            return ""
        return (f"{built['path']} has changed since fas_manifest/{self.builder_config.name} was "
                f"built from it in {self.data_dir} (sha256 {built['sha256'][:12]}… then, "
                f"{now[:12]}… now)")

    # -- rows -----------------------------------------------------------------------------------

    def read_rows(self, manifest: str) -> list[Row]:
        """Parse and check every row; a bad row fails (or is skipped) naming file:line."""
        base = os.path.dirname(manifest)
        with io.StringIO(read_text(manifest), newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED if c not in header]
            unknown = [c for c in header if c not in REQUIRED + OPTIONAL]
            if missing or unknown:
                raise BadItem(f"{manifest}:1: header {header}: "
                              + (f"missing column(s) {missing}; " if missing else "")
                              + (f"unknown column(s) {unknown}; " if unknown else "")
                              + "expected path,label[,video][,domain][,depth]")
            reader.fieldnames = header
            rows, first_line = [], {}
            for record in reader:
                line = reader.line_num
                try:
                    row = self.parse_row(manifest, base, line, record)
                    check_unique(manifest, line, row.path, first_line)
                    rows.append(row)
                except BadItem as e:
                    self._guard(f"{manifest}:{line}", e)
        return self._check_rows(manifest, rows)

    def _check_rows(self, manifest: str, rows: list[Row]) -> list[Row]:
        """Whole-manifest checks: some rows, and no video with both live and spoof frames (its
        video score would mix the classes; which rows are wrong is the user's call, so this is
        an error even under skip_bad)."""
        if not rows:
            raise BadItem(f"{manifest}: no usable rows")
        first = {}  # (video, label) → first line
        for row in rows:
            first.setdefault((row.video, row.label), row.line)
            other = (row.video, LIVE + SPOOF - row.label)
            if other in first:
                names = {LIVE: "live", SPOOF: "spoof"}
                raise BadItem(f"{manifest}:{row.line}: video {row.video!r} has "
                              f"{names[row.label]} rows (line {row.line}) and "
                              f"{names[other[1]]} rows (line {first[other]}); a video is one "
                              "class: give its live and spoof frames different video ids")
        return rows

    def parse_row(self, manifest: str, base: str, line: int, record: dict) -> Row:
        where = f"{manifest}:{line}"
        if None in record:
            raise BadItem(f"{where}: more fields than the header's {len(record) - 1} columns")
        rel = (record.get("path") or "").strip()
        if not rel:
            raise BadItem(f"{where}: empty path")
        path = os.path.normpath(os.path.join(base, rel))
        if not os.path.isfile(path):
            raise BadItem(f"{where}: image file {path} does not exist")
        label = (record.get("label") or "").strip().lower()
        if label not in LABELS:
            raise BadItem(f"{where}: unknown label {record.get('label')!r}, "
                          f"expected 'live' or 'spoof'")
        depth = (record.get("depth") or "").strip()
        if depth:
            depth = os.path.normpath(os.path.join(base, depth))
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
            depth = faces.encode_image(read_depth(row.depth, where, cfg.resolution), "png")
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


def read_text(manifest: str) -> str:
    """The manifest's text. utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which
    would otherwise become part of the first column's name."""
    with open(manifest, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadItem(f"{manifest}: not UTF-8 text ({e}); save it as CSV UTF-8") from e


def check_unique(manifest: str, line: int, path: str, first_line: dict[str, int]) -> None:
    """A frame listed twice would count twice in training and in its video's score."""
    if path in first_line:
        raise BadItem(f"{manifest}:{line}: {path} is listed again (first at line "
                      f"{first_line[path]})")
    first_line[path] = line


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
    except _UNREADABLE as e:
        raise BadItem(f"{where}: {path} cannot be decoded as an image ({e})") from e


# What PIL raises for a corrupt file, or for one whose header declares more than twice
# Image.MAX_IMAGE_PIXELS (a decompression bomb: a few bytes that would decode to gigabytes).
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def read_depth(path: str, where: str, size: int) -> np.ndarray:
    """A depth-map file as uint8 [size, size] in [0, 255] ↔ depth [0, 1]: 8-bit images as they
    are (colour converted to gray), 16-bit gray scaled by 255/65535 (convert("L") would clip
    every value above 255 to white, a constant target); other modes fail naming the file."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I;16") or img.mode == "I":
                gray = _scale_16_bit(np.asarray(img), path, where, img.mode)
            elif img.mode == "F":  # floats have no agreed scale
                raise BadItem(f"{where}: depth map {path} has mode F (32-bit float); expected an "
                              "8-bit or 16-bit gray (or 8-bit colour) image")
            else:
                gray = np.asarray(img.convert("L"))
    except BadItem:
        raise
    except _UNREADABLE as e:
        raise BadItem(f"{where}: depth map {path} cannot be decoded as an image ({e})") from e
    return cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA
                      if size < min(gray.shape) else cv2.INTER_LINEAR)


def _scale_16_bit(values: np.ndarray, path: str, where: str, mode: str) -> np.ndarray:
    # PIL reads some 16-bit files as mode I (int32): values beyond 16 bits are not a 16-bit map.
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise BadItem(f"{where}: depth map {path} (mode {mode}) has values in "
                      f"[{values.min()}, {values.max()}]; expected 16-bit values in [0, 65535]")
    return np.round(values.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
