"""OULU-NPU (Boulkenafet et al., FG 2017) from its original release: Train_files and Test_files
(.avi + per-video eye-location .txt), Dev_files left out as in the DG FAS literature.

File names are PHONE_SESSION_USER_FILE.avi; FILE 1 is live, 2–3 print and 4–5 replay attacks.
"""

from __future__ import annotations

import dataclasses
import os

from d2am_jax.data.builders.common import LIVE, SPOOF
from d2am_jax.data.builders.video import (
    VideoBuilder,
    VideoConfig,
    VideoItem,
    files_under,
    read_annotation_rows,
    video_id,
)
from d2am_jax.data.faces import BadItem, box_from_eyes

SPLIT_FOLDERS = {"Train_files": "train", "Test_files": "test"}
LEFT_OUT = ("Dev_files",)
ATTACKS = {1: "", 2: "print1", 3: "print2", 4: "replay1", 5: "replay2"}


@dataclasses.dataclass(eq=False)
class OuluNpuConfig(VideoConfig):
    """annotation: how to read the 4 numbers after the frame number in each .txt line —
    'eyes' (left eye x, y, right eye x, y: what the release documents) or 'box' (x1, y1, x2, y2)."""

    annotation: str = "eyes"

    def validate(self) -> None:
        super().validate()
        self.check_choice("annotation", ("eyes", "box"))


class OuluNpu(VideoBuilder):
    """OULU-NPU, all four protocols' videos pooled (the DG protocols use every video)."""

    DESCRIPTION = "OULU-NPU mobile face PAD videos, face crops of evenly spaced frames."
    BUILDER_CONFIGS = [OuluNpuConfig(name="default")]
    MARKERS = ("Train_files", "Test_files")
    HAS_ANNOTATIONS = True
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
OULU-NPU is licensed: request it from the University of Oulu
(https://sites.google.com/site/oulunpudatabase/).
Unpack Train_files.zip, Dev_files.zip (optional, not used) and Test_files.zip so that manual_dir
(or one folder inside it) holds:
  Train_files/1_1_01_1.avi, Train_files/1_1_01_1.txt, ...
  Test_files/1_1_36_1.avi,  Test_files/1_1_36_1.txt, ...
Each .txt is the release's per-frame eye locations: `frame, x_left_eye, y_left_eye, x_right_eye,
y_right_eye` (set --config annotation=box if your copy holds face boxes x1,y1,x2,y2 instead).
The Protocols folder is not needed: the DG protocols pool every train/test video.
"""

    def discover(self, root: str) -> list[VideoItem]:
        items = []
        for folder, split in SPLIT_FOLDERS.items():
            for path in files_under(os.path.join(root, folder), (".avi",)):
                try:
                    label, attack = label_of(path)
                except BadItem as e:
                    self._guard(path, e)
                    continue
                ann = os.path.splitext(path)[0] + ".txt"
                items.append(VideoItem(path, video_id(root, path), split, label, attack, ann))
        for folder in LEFT_OUT:
            n = len(files_under(os.path.join(root, folder), (".avi",)))
            if n:
                self.report.note("devel_videos_left_out", n)
        return items

    def annotation_boxes(self, item: VideoItem) -> dict[int, tuple]:
        rows = read_annotation_rows(item.annotation, 5)
        out = {}
        for frame, a, b, c, d in rows:
            if a == b == c == d == 0:          # frames where the release found no face
                continue
            if self.builder_config.annotation == "eyes":
                if (a, b) == (c, d):
                    continue
                out[int(frame)] = box_from_eyes((a, b), (c, d))
            else:
                out[int(frame)] = (int(a), int(b), int(c - a), int(d - b))
        return out


def label_of(path: str) -> tuple[int, str]:
    """(label, attack type) from PHONE_SESSION_USER_FILE; unknown names fail naming the file."""
    stem = os.path.splitext(os.path.basename(path))[0]
    parts = stem.split("_")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise BadItem(f"{path}: expected a PHONE_SESSION_USER_FILE name like 1_1_01_1.avi")
    access = int(parts[3])
    if access not in ATTACKS:
        raise BadItem(f"{path}: unknown access type {access} (expected 1 = live, 2-5 = attacks)")
    return (LIVE if access == 1 else SPOOF), ATTACKS[access]
