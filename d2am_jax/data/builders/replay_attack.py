"""Idiap Replay-Attack (Chingovska et al., BIOSIG 2012) from its original release: train/ and
test/ with real/*.mov and attack/{fixed,hand}/*.mov, face-locations/ .face boxes; devel left out.

Each .face line is `frame x y width height` (zeros where the release found no face).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

from d2am_jax.data.builders.common import LIVE, SPOOF
from d2am_jax.data.builders.video import (
    VideoBuilder,
    VideoConfig,
    VideoItem,
    files_under,
    read_annotation_rows,
    video_id,
)
from d2am_jax.data.faces import BadItem
from d2am_jax.errors import MissingFileError

SPLITS = {"train": "train", "test": "test"}
LEFT_OUT = ("devel", "enroll")
FACE_FOLDER = "face-locations"
log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class ReplayAttackConfig(VideoConfig):
    """'auto' face crop uses the release's face-locations boxes.

    face_locations: the face-locations/ folder when it was unpacked elsewhere than in the
      release's root ('' → <root>/face-locations).
    """

    face_locations: str = ""

    def validate(self) -> None:
        super().validate()
        if self.face_locations and not os.path.isdir(self.face_locations):
            raise MissingFileError(f"ReplayAttackConfig.face_locations: {self.face_locations} "
                                   "is not a folder")


class ReplayAttack(VideoBuilder):
    """Replay-Attack's grandtest videos: real accesses and all attacks (fixed and hand)."""

    DESCRIPTION = "Idiap Replay-Attack videos, face crops of evenly spaced frames."
    BUILDER_CONFIGS = [ReplayAttackConfig(name="default")]
    MARKERS = ("train", "test")
    HAS_ANNOTATIONS = True
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Replay-Attack is licensed: request it from Idiap (https://www.idiap.ch/dataset/replayattack).
Unpack the videos and the face locations so that manual_dir (or one folder inside it) holds:
  train/real/client001_session01_webcam_authenticate_adverse_1.mov
  train/attack/fixed/attack_highdef_client001_session01_highdef_photo_adverse.mov
  train/attack/hand/...
  test/...                     (same layout; devel/ and enroll/ may be present, they are not used)
  face-locations/train/real/client001_session01_webcam_authenticate_adverse_1.face
  face-locations/test/...      (the same relative paths with .face)
face-locations/ unpacked elsewhere: --config face_locations=DIR (DIR holds train/ and test/).
"""

    def face_folder(self, root: str) -> str:
        """The face-locations folder: the config's, else <root>/face-locations; a missing one is
        said on the terminal (the build then crops with the detector)."""
        folder = self.builder_config.face_locations or os.path.join(root, FACE_FOLDER)
        if not os.path.isdir(folder) and self.builder_config.face_crop in ("auto",
                                                                             "annotations"):
            message = (f"replay_attack: no face-locations folder at {folder}; faces will be "
                       "found by the detector instead of the release's boxes. If you unpacked "
                       "face-locations/ elsewhere, pass --config face_locations=DIR")
            log.warning(message)
            print(f"warning: {message}", file=sys.stderr)
        return folder

    def discover(self, root: str) -> list[VideoItem]:
        items = []
        face_folder = self.face_folder(root)
        for folder, split in SPLITS.items():
            for path in files_under(os.path.join(root, folder), (".mov",)):
                try:
                    label, attack = label_of(os.path.relpath(path, os.path.join(root, folder)))
                except BadItem as e:
                    self._guard(path, BadItem(f"{path}: {e}"))
                    continue
                vid = video_id(root, path)
                ann = os.path.join(face_folder, *vid.split("/")) + ".face"
                items.append(VideoItem(path, vid, split, label, attack, ann))
        for folder in LEFT_OUT:
            n = len(files_under(os.path.join(root, folder), (".mov",)))
            if n:
                self.report.note(f"{folder}_videos_left_out", n)
        return items

    def annotation_boxes(self, item: VideoItem) -> dict[int, tuple]:
        rows = read_annotation_rows(item.annotation, 5)
        return {int(f): (int(x), int(y), int(w), int(h)) for f, x, y, w, h in rows
                if w > 0 and h > 0}


def label_of(rel: str) -> tuple[int, str]:
    """(label, attack) from the path below train/ or test/: real/… or attack/{fixed,hand}/…"""
    parts = rel.replace(os.sep, "/").split("/")
    if len(parts) == 2 and parts[0] == "real":
        return LIVE, ""
    if len(parts) == 3 and parts[0] == "attack" and parts[1] in ("fixed", "hand"):
        # attack_<device>_client…_session…_<sample device>_<photo|video>_<light>
        name = os.path.splitext(parts[2])[0].split("_")
        kind = f"{name[1]}_{name[5]}" if len(name) >= 7 and name[0] == "attack" else "attack"
        return SPOOF, f"{parts[1]}/{kind}"
    raise BadItem(f"unknown label: expected real/<name>.mov or attack/fixed|hand/<name>.mov, "
                  f"got {rel}")
