"""CASIA-FASD (Zhang et al., ICB 2012) from its original release: train_release/ and
test_release/<subject>/<video>.avi; faces found with BlazeFace (the Haar cascade where it
misses; the release has no annotations).

Videos 1, 2 and HR_1 are live; 3, 4, HR_2 warped photo; 5, 6, HR_3 cut photo; 7, 8, HR_4 replay.
"""

from __future__ import annotations

import dataclasses
import os

from d2am_jax.data.builders.common import LIVE, SPOOF
from d2am_jax.data.builders.video import VideoBuilder, VideoConfig, VideoItem, files_under, video_id
from d2am_jax.data.faces import BadItem

SPLIT_FOLDERS = {"train_release": "train", "test_release": "test"}
KINDS = {"1": "", "2": "", "HR_1": "",
         "3": "warped_photo", "4": "warped_photo", "HR_2": "warped_photo",
         "5": "cut_photo", "6": "cut_photo", "HR_3": "cut_photo",
         "7": "video_replay", "8": "video_replay", "HR_4": "video_replay"}


@dataclasses.dataclass(eq=False)
class CasiaFasdConfig(VideoConfig):
    """CASIA-FASD has no face annotations: 'auto' means the detector (BlazeFace, then Haar)."""


class CasiaFasd(VideoBuilder):
    """CASIA-FASD: 50 subjects, 20 in train_release and 30 in test_release."""

    DESCRIPTION = "CASIA-FASD face anti-spoofing videos, face crops of evenly spaced frames."
    BUILDER_CONFIGS = [CasiaFasdConfig(name="default")]
    MARKERS = ("train_release", "test_release")
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
CASIA-FASD is licensed: request it from CASIA (CBSR). Unpack it so that manual_dir (or one folder
inside it) holds:
  train_release/1/1.avi, train_release/1/HR_1.avi, ... (subjects 1-20)
  test_release/1/1.avi, ...                            (subjects 1-30)
Video names: 1, 2, HR_1 live; 3, 4, HR_2 warped photo; 5, 6, HR_3 cut photo; 7, 8, HR_4 replay.
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
                items.append(VideoItem(path, video_id(root, path), split, label, attack))
        return items


def label_of(path: str) -> tuple[int, str]:
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem not in KINDS:
        raise BadItem(f"{path}: unknown CASIA-FASD video name {stem!r} "
                      f"(expected one of {sorted(KINDS)})")
    return (LIVE if KINDS[stem] == "" else SPOOF), KINDS[stem]
