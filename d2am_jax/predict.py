"""Scores new face frames with a trained run's best checkpoint (best by source validation) and
decides live/spoof at that checkpoint's threshold, averaging frame scores per video when it can.

  python -m d2am_jax.predict --workdir DIR (--images FOLDER | --manifest CSV | --video FILE)
      --out scores.csv [--face_crop none|haar] [--frames_per_video 16] [--skip_bad]
  python -m d2am_jax.predict --workdir DIR --camera SOURCE [--window 10] [--every 1] [--show]
      [--max_frames N] [--out frames.csv]      (also: --video FILE --stream)

--images: every image file under FOLDER (recursively); frames in one sub-folder form one video.
--manifest: a CSV with a `path` column (relative to the CSV) and optionally `video` (and `label`:
  live/spoof, to print HTER/AUC at the threshold). --video: evenly spaced frames of one video file.
Frames are resized to the run's resolution (non-square ones are resized, not cropped) unless
--face_crop detector (BlazeFace, Haar where it misses) or haar crops the largest face first.
Output columns: path, video, frame_score, video_score, decision ('live' if the score — the
video's mean when videos are known — reaches the threshold, else 'spoof'), threshold.

--camera SOURCE: any OpenCV capture source (a camera index such as 0, a video file, a stream URL)
scored frame by frame with the training preprocessing (BlazeFace, the Haar cascade where it
misses; square crop with a 25% margin at the run's resolution). Each frame prints its score, the
mean of the last --window scores and the decision at the checkpoint's threshold; a frame without
a face prints that and keeps the previous decision. --show draws them on the frame (needs an
OpenCV with GUI; press q to stop). --video FILE --stream scores a file the same way.
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
    from d2am_jax.data import facemesh, faces
    if face_crop == "detector":
        box, _ = facemesh.find_face_box(rgb, "auto")
        if box is None:
            raise faces.BadItem(f"{where}: no face found by BlazeFace or the Haar cascade")
        return faces.crop_face(rgb, box, 0.25, size)
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
    # utf-8-sig: accept the byte-order mark of Excel's "CSV UTF-8" (else '\ufeffpath').
    with open(manifest, newline="", encoding="utf-8-sig") as f:
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


def open_capture(source: str):
    """cv2.VideoCapture of a camera index ('0'), a video file or a stream URL."""
    import cv2

    from d2am_jax.errors import MissingFileError, UserError
    target = int(source) if source.strip().isdigit() else source
    if isinstance(target, str) and "://" not in target and not os.path.exists(target):
        raise MissingFileError(f"--camera {source}: no such file (and not a camera index)")
    cap = cv2.VideoCapture(target)
    if not cap.isOpened():
        raise UserError(f"--camera {source}: OpenCV cannot open this capture source")
    return cap


def stream_crops(cap, size: int, every: int = 1, max_frames: int | None = None):
    """(frame index, RGB frame, face box or None, crop or None) for every `every`-th frame of an
    open capture, with the training preprocessing; stops at the end or after max_frames."""
    import cv2

    from d2am_jax.data import facemesh, faces
    index, done = -1, 0
    while max_frames is None or done < max_frames:
        ok, bgr = cap.read()
        if not ok or bgr is None:
            return
        index += 1
        if index % every:
            continue
        done += 1
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        box, _ = facemesh.find_face_box(rgb, "auto")
        crop = None if box is None else faces.crop_face(rgb, box, 0.25, size)
        yield index, rgb, box, crop


def score_stream(model, cap, window: int = 10, every: int = 1, max_frames: int | None = None,
                 show: bool = False):
    """Score a capture frame by frame: yields one dict per processed frame — frame index, face
    box, score (None: no face), the mean of the last `window` scores and the decision at the
    model's threshold (a faceless frame keeps both as they were; '' before any score)."""
    import collections
    recent: collections.deque = collections.deque(maxlen=window)
    mean, decision = float("nan"), ""
    for index, rgb, box, crop in stream_crops(cap, model.resolution, every, max_frames):
        score = None if crop is None else float(model.scores(crop[None], 1)[0])
        if score is not None:
            recent.append(score)
            mean = float(np.mean(recent))
            decision = "live" if mean >= model.threshold else "spoof"
        row = {"frame": index, "box": box, "score": score, "smoothed": mean,
               "decision": decision}
        if show and not _show(rgb, row, model.threshold):
            return
        yield row


def _show(rgb: np.ndarray, row: dict, threshold: float) -> bool:
    """Draw the box and decision and show the frame; False when the user pressed q."""
    import cv2

    from d2am_jax.errors import UserError
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    colour = (0, 200, 0) if row["decision"] == "live" else (0, 0, 230)
    if row["box"] is not None:
        x, y, w, h = row["box"]
        cv2.rectangle(bgr, (x, y), (x + w, y + h), colour, 2)
    text = (f"{row['decision'] or '...'} {row['smoothed']:.3f} (thr {threshold:.3f})"
            if row["score"] is not None or row["decision"] else "no face")
    cv2.putText(bgr, text, (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.8, colour, 2)
    try:
        cv2.imshow("d2am_jax.predict", bgr)
        return (cv2.waitKey(1) & 0xFF) != ord("q")
    except cv2.error as e:
        raise UserError("--show needs an OpenCV build with a GUI (opencv-python, not "
                        f"opencv-python-headless): {e}") from e


def format_stream_row(row: dict) -> str:
    if row["score"] is None:
        return (f"frame {row['frame']}: no face"
                + (f" (still {row['decision']}, {row['smoothed']:.4f})" if row["decision"]
                   else ""))
    return (f"frame {row['frame']}: score {row['score']:.4f} smoothed {row['smoothed']:.4f} "
            f"{row['decision']}")


def run_stream(model, cap, source: str, out: str | None, window: int, every: int,
               max_frames: int | None, show: bool) -> dict:
    """Score an open capture (from open_capture(source)), printing each frame's line; releases
    it and returns the closing summary."""
    rows = []
    try:
        for row in score_stream(model, cap, window, every, max_frames, show):
            print(format_stream_row(row), flush=True)
            rows.append(row)
    except KeyboardInterrupt:
        pass
    finally:
        cap.release()
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["frame", "score", "smoothed", "decision", "threshold"])
            for r in rows:
                w.writerow([r["frame"], "" if r["score"] is None else f"{r['score']:.6f}",
                            "" if not r["decision"] else f"{r['smoothed']:.6f}", r["decision"],
                            f"{model.threshold:.6f}"])
    faced = [r for r in rows if r["score"] is not None]
    return {"source": source, "frames": len(rows), "frames_with_face": len(faced),
            "final_decision": rows[-1]["decision"] if rows else "",
            "checkpoint": f"{model.which} step {model.step}", "threshold": model.threshold,
            "window": window}


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
    src.add_argument("--camera", metavar="SOURCE",
                     help="score a live capture: camera index (0), video file or stream URL")
    p.add_argument("--out", help="CSV to write (optional with --camera / --stream)")
    p.add_argument("--stream", action="store_true",
                   help="with --video: score every frame as --camera does")
    p.add_argument("--window", type=int, default=10,
                   help="--camera: the decision is the mean of the last N frames' scores")
    p.add_argument("--every", type=int, default=1, help="--camera: score every N-th frame")
    p.add_argument("--max_frames", type=int, default=None, help="--camera: stop after N frames")
    p.add_argument("--show", action="store_true", help="--camera: draw on the frame, q stops")
    p.add_argument("--face_crop", choices=("none", "detector", "haar"), default="none",
                   help="detector: BlazeFace, Haar where it misses (the builders' crop)")
    p.add_argument("--frames_per_video", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--skip_bad", action="store_true",
                   help="skip unreadable images / faceless frames (counted) instead of stopping")
    args = p.parse_args(argv)
    streaming = args.camera is not None or (args.video is not None and args.stream)
    if not streaming and not args.out:
        p.error("--out is required (except with --camera or --video --stream)")
    if args.stream and args.video is None:
        p.error("--stream goes with --video")
    if args.window < 1 or args.every < 1:
        p.error("--window and --every must be ≥ 1")
    args.streaming = streaming
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.streaming:
        return _main_stream(args)
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


def _main_stream(args) -> int:
    from d2am_jax.data.faces import BadItem
    source = args.camera if args.camera is not None else args.video
    try:
        cap = open_capture(source)   # a bad source fails before the checkpoint is restored
        try:
            model = Model(args.workdir)
        except BaseException:
            cap.release()
            raise
        summary = run_stream(model, cap, source, args.out, args.window, args.every,
                             args.max_frames, args.show)
    except (BadItem, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
