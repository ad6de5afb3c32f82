"""Scores new face frames with a trained run's best checkpoint (best by source validation) and
decides live/spoof at that checkpoint's threshold, averaging frame scores per video when it can.

  python -m d2am_jax.predict --workdir DIR (--images FOLDER | --manifest CSV | --video FILE)
      --out scores.csv [--face_crop none|haar] [--frames_per_video 16] [--skip_bad]

--images: every image file under FOLDER (recursively); frames in one sub-folder form one video.
--manifest: a CSV with a `path` column (relative to the CSV) and optionally `video` (and `label`:
  live/spoof, to print HTER/AUC at the threshold). --video: evenly spaced frames of one video file.
Frames are resized to the run's resolution (non-square ones are resized, not cropped) unless
--face_crop haar crops the largest face first. Output columns: path, video, frame_score,
video_score, decision ('live' if the score — the video's mean when videos are known — reaches the
threshold, else 'spoof'), threshold.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import os
import sys

import numpy as np

from d2am_jax.errors import MissingFileError, UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclasses.dataclass
class Frames:
    """Frames to score: uint8 [n, r, r, 3], where each came from, video ids ('' = none), labels
    (-1 = unknown) and the inputs skipped with --skip_bad."""

    images: np.ndarray
    paths: list[str]
    videos: list[str]
    labels: np.ndarray
    skipped: list[str]


class Model:
    """The best checkpoint of a workdir: config, parameters and the decision threshold."""

    def __init__(self, workdir: str):
        import ml_collections

        from d2am_jax import checkpointing

        if not os.path.isdir(workdir):
            raise MissingFileError(f"--workdir {workdir} does not exist (a training run's "
                                   f"workdir, as given to d2am_jax.main)")
        # Read-only: a damaged best/ falls back to checkpoints/, and nothing is written there.
        which, restored = checkpointing.read_for_prediction(workdir)
        step, saved = restored.step, restored.meta
        if not saved.get("results"):
            raise UserError(f"{workdir}: the {which} checkpoint (step {step}) has no evaluation "
                            "yet, hence no threshold; let training finish an epoch first")
        self.config = ml_collections.ConfigDict(saved["config"])
        self.record = saved["results"][-1]
        self.threshold = float(self.record["threshold"])
        self.resolution = int(self.config.data.resolution)
        self.step, self.which = step, which
        self.params = restored.state["params"]
        self.batch_stats = restored.state["batch_stats"]
        self._predict = _predict_fn(self.config.to_json_best_effort(sort_keys=True))

    def scores(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        """Live probability of every uint8 [n, r, r, 3] frame."""
        from d2am_jax import stats
        out = []
        for x, m in stats.padded_batches(images, batch_size, self.resolution):
            out.append(np.asarray(self._predict(self.params, self.batch_stats, x))[:m])
        return np.concatenate(out).astype(np.float64)


@functools.lru_cache(maxsize=4)
def _predict_fn(config_json: str):
    """One jitted prediction per model config and process (repeated calls reuse its compile)."""
    import ml_collections

    from d2am_jax import state
    return state.make_predict(ml_collections.ConfigDict(json.loads(config_json)))


def _prepared(rgb: np.ndarray, size: int, face_crop: str, where: str) -> np.ndarray:
    from d2am_jax.data import faces
    if face_crop == "haar":
        box = faces.detect_face(rgb)
        if box is None:
            raise faces.BadItem(f"{where}: no face found by the Haar cascade")
        return faces.crop_face(rgb, box, 0.25, size)
    return faces.resize_square(rgb, size)


def _read_image(path: str, size: int, face_crop: str, where: str) -> np.ndarray:
    from d2am_jax.data.builders.manifest import read_rgb
    return _prepared(read_rgb(path, where), size, face_crop, f"{where}: {path}")


def _collect(items, size: int, face_crop: str, skip_bad: bool) -> Frames:
    """items: (path, video, label, where) → Frames; bad files fail (or are skipped, counted)."""
    from d2am_jax.data.faces import BadItem
    images, paths, videos, labels, skipped = [], [], [], [], []
    for path, video, label, where in items:
        try:
            images.append(_read_image(path, size, face_crop, where))
        except BadItem as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        paths.append(path)
        videos.append(video)
        labels.append(label)
    if not images:
        raise UserError("no frame to score" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return Frames(np.stack(images), paths, videos, np.asarray(labels, np.int64), skipped)


def frames_from_folder(folder: str, size: int, face_crop: str, skip_bad: bool) -> Frames:
    if not os.path.isdir(folder):
        raise MissingFileError(f"--images {folder} is not a folder")
    items = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                path = os.path.join(root, name)
                rel_dir = os.path.relpath(root, folder)
                items.append((path, "" if rel_dir == "." else rel_dir, -1, folder))
    if not items:
        raise UserError(f"--images {folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return _collect(items, size, face_crop, skip_bad)


def frames_from_manifest(manifest: str, size: int, face_crop: str, skip_bad: bool) -> Frames:
    if not os.path.isfile(manifest):
        raise MissingFileError(f"--manifest {manifest} does not exist")
    base = os.path.dirname(os.path.abspath(manifest))
    labels = {"live": 1, "spoof": 0}
    items = []
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if "path" not in header:
            raise UserError(f"{manifest}:1: header {header} has no 'path' column")
        reader.fieldnames = header
        for record in reader:
            where = f"{manifest}:{reader.line_num}"
            rel = (record.get("path") or "").strip()
            if not rel:
                raise UserError(f"{where}: empty path")
            label = (record.get("label") or "").strip().lower()
            if label and label not in labels:
                raise UserError(f"{where}: unknown label {label!r}, expected 'live' or 'spoof'")
            items.append((os.path.join(base, rel), (record.get("video") or "").strip(),
                           labels.get(label, -1), where))
    if not items:
        raise UserError(f"{manifest}: no rows")
    return _collect(items, size, face_crop, skip_bad)


def frames_from_video(path: str, size: int, face_crop: str, frames_per_video: int,
                      skip_bad: bool) -> Frames:
    from d2am_jax.data import faces
    if not os.path.isfile(path):
        raise MissingFileError(f"--video {path} does not exist")
    frames = faces.read_video_frames(path, frames_per_video)
    if not frames:
        raise UserError(f"--video {path}: no frame could be read")
    images, paths, skipped = [], [], []
    for index, rgb in frames:
        where = f"{path} frame {index}"
        try:
            images.append(_prepared(rgb, size, face_crop, where))
        except faces.BadItem as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            continue
        paths.append(f"{path}#{index}")
    if not images:
        raise UserError(f"--video {path}: no usable frame ({len(skipped)} skipped)")
    return Frames(np.stack(images), paths, [path] * len(paths),
                  np.full(len(paths), -1, np.int64), skipped)


def video_means(videos: list[str], scores: np.ndarray) -> np.ndarray:
    """Each frame's video mean score (its own score when its video id is '')."""
    out = scores.copy()
    ids = np.asarray(videos)
    for video in set(videos) - {""}:
        rows = ids == video
        out[rows] = scores[rows].mean()
    return out


def write_scores(path: str, frames: Frames, scores: np.ndarray, threshold: float) -> None:
    per_video = video_means(frames.videos, scores)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "video", "frame_score", "video_score", "decision", "threshold"])
        for p, v, s, vs in zip(frames.paths, frames.videos, scores, per_video):
            w.writerow([p, v, f"{s:.6f}", f"{vs:.6f}" if v else "",
                        "live" if vs >= threshold else "spoof", f"{threshold:.6f}"])


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m d2am_jax.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a training run's workdir")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of face images (sub-folders = videos)")
    src.add_argument("--manifest", help="CSV with path[,video][,label]")
    src.add_argument("--video", help="one video file")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--face_crop", choices=("none", "haar"), default="none")
    p.add_argument("--frames_per_video", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--skip_bad", action="store_true",
                   help="skip unreadable images / faceless frames (counted) instead of stopping")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from d2am_jax import metrics
    from d2am_jax.data.faces import BadItem
    try:
        model = Model(args.workdir)
        r = model.resolution
        if args.images:
            frames = frames_from_folder(args.images, r, args.face_crop, args.skip_bad)
        elif args.manifest:
            frames = frames_from_manifest(args.manifest, r, args.face_crop, args.skip_bad)
        else:
            frames = frames_from_video(args.video, r, args.face_crop, args.frames_per_video,
                                       args.skip_bad)
        scores = model.scores(frames.images, args.batch_size)
        write_scores(args.out, frames, scores, model.threshold)
    except (UserError, BadItem) as e:  # the user's input; anything else keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = {"out": os.path.abspath(args.out), "frames": len(frames.paths),
               "videos": len(set(frames.videos) - {""}), "skipped": len(frames.skipped),
               "checkpoint": f"{model.which} step {model.step}", "threshold": model.threshold,
               "threshold_mode": model.record.get("threshold_mode")}
    known = frames.labels >= 0
    if known.any() and len(set(frames.labels[known].tolist())) == 2:
        video_ids = np.asarray([v or p for v, p in zip(frames.videos, frames.paths)])[known]
        result = metrics.evaluate(frames.labels[known], scores[known], threshold_mode="fixed",
                                  threshold=model.threshold, video_ids=video_ids)
        summary.update(hter=result["hter"], auc=result["auc"], unit=result["unit"])
    for item in frames.skipped:
        print(f"skipped: {item}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
