"""MSU-MFSD (Wen, Han & Jain, TIFS 2015) from its original release: scene01/real and
scene01/attack videos (.mov laptop, .mp4 phone), split by train_sub_list.txt / test_sub_list.txt.

Face boxes come from the release's .face files (`frame,x1,y1,x2,y2` per line) where present.
"""

from __future__ import annotations

import dataclasses
import os
import re

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

SUB_LISTS = {"train": "train_sub_list.txt", "test": "test_sub_list.txt"}
FACE_FOLDER = "face-locations"
CLIENT = re.compile(r"client(\d+)")


@dataclasses.dataclass(eq=False)
class MsuMfsdConfig(VideoConfig):
    """'auto' face crop uses the release's .face boxes (the detector where a video has none)."""


class MsuMfsd(VideoBuilder):
    """MSU-MFSD public part: 35 subjects, 15 train and 20 test (the release's subject lists)."""

    DESCRIPTION = "MSU-MFSD face anti-spoofing videos, face crops of evenly spaced frames."
    BUILDER_CONFIGS = [MsuMfsdConfig(name="default")]
    MARKERS = ("scene01", "train_sub_list.txt", "test_sub_list.txt")
    HAS_ANNOTATIONS = True
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
MSU-MFSD is licensed: request it from Michigan State University (biometrics lab). Unpack it so that
manual_dir (or one folder inside it) holds:
  scene01/real/real_client002_android_SD_scene01.mp4, scene01/real/..._laptop_SD_scene01.mov
  scene01/attack/attack_client002_android_SD_ipad_video_scene01.mp4, ...
  train_sub_list.txt, test_sub_list.txt   (one subject number per line, e.g. 02)
Face boxes: each video's .face file next to it (scene01/real/<name>.face), or under
face-locations/scene01/real/<name>.face or face-locations/real/<name>.face; lines
`frame,x1,y1,x2,y2`. Videos without one use the face detector (counted in build_report.json).
"""

    def discover(self, root: str) -> list[VideoItem]:
        subjects = {split: read_subjects(os.path.join(root, name))
                    for split, name in SUB_LISTS.items()}
        both = subjects["train"] & subjects["test"]
        if both:
            raise BadItem(f"{root}: subjects {sorted(both)} are in both train and test lists")
        items = []
        for path in files_under(os.path.join(root, "scene01"), (".mov", ".mp4")):
            try:
                label, attack, client = label_of(os.path.relpath(path, os.path.join(root,
                                                                                      "scene01")))
                split = next((s for s, ids in subjects.items() if client in ids), None)
                if split is None:
                    raise BadItem(f"subject {client} is in neither {SUB_LISTS['train']} nor "
                                  f"{SUB_LISTS['test']}")
            except BadItem as e:
                self._guard(path, BadItem(f"{path}: {e}"))
                continue
            vid = video_id(root, path)
            items.append(VideoItem(path, vid, split, label, attack, face_file(root, path, vid)))
        return items

    def annotation_boxes(self, item: VideoItem) -> dict[int, tuple]:
        rows = read_annotation_rows(item.annotation, 5)
        return {int(f): (int(x1), int(y1), int(x2 - x1), int(y2 - y1))
                for f, x1, y1, x2, y2 in rows if x2 > x1 and y2 > y1}


def face_file(root: str, path: str, vid: str) -> str:
    """The video's .face file: beside it, under face-locations/scene01/…, or under
    face-locations/<real|attack>/… (bob.db.msu_mfsd_mod's layout); the first that exists."""
    rel = vid.split("/")
    candidates = [os.path.splitext(path)[0] + ".face",
                  os.path.join(root, FACE_FOLDER, *rel) + ".face",
                  os.path.join(root, FACE_FOLDER, *rel[1:]) + ".face"]
    return next((c for c in candidates if os.path.exists(c)), candidates[0])


def read_subjects(path: str) -> set[int]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: MSU-MFSD subject list is missing")
    out = set()
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                if not line.strip().isdigit():
                    raise BadItem(f"{path}:{lineno}: expected a subject number, got {line!r}")
                out.add(int(line.strip()))
    return out


def label_of(rel: str) -> tuple[int, str, int]:
    """(label, attack, subject) from real/real_clientNNN_… or attack/attack_clientNNN_…"""
    parts = rel.replace(os.sep, "/").split("/")
    name = os.path.splitext(parts[-1])[0]
    m = CLIENT.search(name)
    if len(parts) != 2 or parts[0] not in ("real", "attack") or not m:
        raise BadItem(f"unknown label: expected real/real_clientNNN_*.mov|mp4 or "
                      f"attack/attack_clientNNN_*.mov|mp4, got {rel}")
    if not name.startswith(parts[0] + "_"):
        raise BadItem(f"unknown label: file {name} is in the {parts[0]}/ folder but not named "
                      f"{parts[0]}_…")
    if parts[0] == "real":
        return LIVE, "", int(m.group(1))
    # attack_client002_android_SD_ipad_video_scene01 → ipad_video
    fields = name.split("_")
    return SPOOF, "_".join(fields[4:-1]) or "attack", int(m.group(1))
