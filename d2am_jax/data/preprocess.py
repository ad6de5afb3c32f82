"""Turns videos and image folders into face crops, live depth maps and a manifest.csv that the
fas_manifest builder reads; every dropped frame is listed with its file and frame index.

  python -m d2am_jax.data.preprocess INPUT... --out DIR [--labels CSV] [--frames N | --every N]
      [--detector auto|blazeface|haar] [--missed skip|reuse] [--margin 0.25] [--size 256]
      [--min_face 40] [--depth mesh|prior] [--format png|jpeg]

Labels come from the folder layout, INPUT/live/… and INPUT/spoof/… (optionally one level deeper,
INPUT/<domain>/live|spoof/…), or from --labels CSV (path,label[,domain][,video]; paths relative to
the CSV). Below live/ or spoof/, each video file is a video, the images of one folder form one
video (all of them are taken), and an image directly in live/ or spoof/ is a video of its own.
Output: DIR/crops/<video>/<frame>.<ext>, DIR/depth/<video>/<frame>.png (live frames, from the
Face Mesh), DIR/manifest.csv (path,label,video[,domain],depth) and DIR/preprocess_report.json.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import json
import os
import sys

import numpy as np
import tqdm
from PIL import Image

from d2am_jax.data import facemesh, faces
from d2am_jax.errors import MissingFileError, UserError

VIDEO_EXTENSIONS = (".avi", ".mov", ".mp4", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
LABELS = {"live": 1, "spoof": 0}
REPORT_FILE = "preprocess_report.json"


@dataclasses.dataclass(frozen=True)
class Item:
    """One video to process: a video file, or the image files of one folder (in order)."""

    paths: tuple[str, ...]
    is_video: bool
    label: str            # 'live' or 'spoof'
    domain: str           # '' when the layout or CSV gives none
    video: str            # unique id, used for the output folders


@dataclasses.dataclass(frozen=True)
class Options:
    frames: int | None = 8
    every: int | None = None
    detector: str = "auto"
    missed: str = "skip"        # 'skip' the frame, or 'reuse' the video's last box
    margin: float = 0.25
    size: int = 256
    min_face: int = 40          # a face box side below this many pixels is too small to use
    depth: str = "mesh"
    image_format: str = "png"


@dataclasses.dataclass
class Report:
    """What was kept and what was dropped (file, frame or None, reason), in input order."""

    kept: dict[str, int] = dataclasses.field(default_factory=lambda: {"live": 0, "spoof": 0})
    videos: int = 0
    dropped: list[tuple[str, int | None, str]] = dataclasses.field(default_factory=list)
    notes: list[tuple[str, int | None, str]] = dataclasses.field(default_factory=list)
    reused_boxes: int = 0
    detectors: dict[str, int] = dataclasses.field(default_factory=dict)

    def drop(self, path: str, frame: int | None, reason: str) -> None:
        self.dropped.append((path, frame, reason))

    def as_dict(self) -> dict:
        named = lambda rows: [{"file": p, "frame": f, "reason": r} for p, f, r in rows]  # noqa: E731
        return {"kept": self.kept, "videos": self.videos, "reused_boxes": self.reused_boxes,
                "detectors": self.detectors, "num_dropped": len(self.dropped),
                "dropped": named(self.dropped), "notes": named(self.notes)}


def _media(folder: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        out.extend(os.path.join(root, n) for n in sorted(files))
    return out


def items_from_layout(inputs: list[str], report: Report) -> list[Item]:
    """Items from INPUT/[domain/]live|spoof/… folders; files without a label are dropped, named."""
    items = []
    for top in inputs:
        if not os.path.exists(top):
            raise MissingFileError(f"input {top} does not exist")
        if not os.path.isdir(top):
            raise UserError(f"input {top} is a file: its label is unknown; put it under a live/ "
                            "or spoof/ folder, or list it in --labels CSV")
        labelled = {}  # label folder → (label, domain)
        for name in LABELS:
            if os.path.isdir(os.path.join(top, name)):
                labelled[os.path.join(top, name)] = (name, "")
        if not labelled:
            for sub in sorted(os.listdir(top)):
                for name in LABELS:
                    if os.path.isdir(os.path.join(top, sub, name)):
                        labelled[os.path.join(top, sub, name)] = (name, sub)
        if not labelled:
            report.drop(top, None, "no labels: expected live/ and spoof/ folders, or "
                                   "<domain>/live|spoof/, in this input")
            continue
        covered = set()
        for folder, (label, domain) in labelled.items():
            files = _media(folder)
            covered.update(files)
            items.extend(_items_in(folder, files, label, domain, top, report))
        for path in _media(top):
            if path not in covered and path.lower().endswith(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS):
                report.drop(path, None, "no label: not under a live/ or spoof/ folder")
    return items


def _items_in(folder: str, files: list[str], label: str, domain: str, top: str,
              report: Report) -> list[Item]:
    prefix = os.path.relpath(folder, top).replace(os.sep, "/")
    base = os.path.basename(os.path.normpath(top))
    items, groups = [], {}
    for path in files:
        low = path.lower()
        rel = os.path.relpath(path, folder).replace(os.sep, "/")
        if low.endswith(VIDEO_EXTENSIONS):
            items.append(Item((path,), True, label, domain,
                              f"{base}/{prefix}/{os.path.splitext(rel)[0]}"))
        elif low.endswith(IMAGE_EXTENSIONS):
            # the images of a folder are one video; an image directly under live/ is its own
            parent = os.path.dirname(rel) or os.path.splitext(rel)[0]
            groups.setdefault(f"{base}/{prefix}/{parent}", []).append(path)
        else:
            report.drop(path, None, "not a video or image file (by its extension)")
    items.extend(Item(tuple(paths), False, label, domain, vid) for vid, paths in groups.items())
    return items


def items_from_csv(path: str, report: Report) -> list[Item]:
    """Items from a CSV with path,label[,domain][,video]; a bad row is dropped, named by line."""
    if not os.path.isfile(path):
        raise MissingFileError(f"--labels {path} does not exist")
    base = os.path.dirname(os.path.abspath(path))
    items, groups = [], {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if "path" not in header or "label" not in header:
            raise UserError(f"{path}:1: header {header}: expected path,label[,domain][,video]")
        reader.fieldnames = header
        for row in reader:
            where = f"{path}:{reader.line_num}"
            rel = (row.get("path") or "").strip()
            label = (row.get("label") or "").strip().lower()
            file = os.path.join(base, rel)
            if label not in LABELS:
                report.drop(where, None, f"unknown label {row.get('label')!r}, expected live or "
                                         "spoof")
                continue
            if not rel or not os.path.isfile(file):
                report.drop(where, None, f"file {file} does not exist")
                continue
            domain = (row.get("domain") or "").strip()
            video = (row.get("video") or "").strip()
            if file.lower().endswith(VIDEO_EXTENSIONS):
                items.append(Item((file,), True, label, domain,
                                  video or os.path.splitext(rel)[0].replace(os.sep, "/")))
            elif file.lower().endswith(IMAGE_EXTENSIONS):
                key = (video or os.path.splitext(rel)[0].replace(os.sep, "/"), label, domain)
                groups.setdefault(key, []).append(file)
            else:
                report.drop(where, None, f"{file} is not a video or image file (by extension)")
    items.extend(Item(tuple(p), False, lab, dom, vid) for (vid, lab, dom), p in groups.items())
    return items


def _frames_of(item: Item, opts: Options, report: Report):
    """(frame index, source file, RGB) of an item; unreadable frames and files are dropped."""
    if item.is_video:
        path = item.paths[0]
        try:
            sampled = faces.sample_video(path, opts.frames, opts.every)
        except faces.BadItem as e:
            report.drop(path, None, f"unreadable video ({e})")
            return
        for index in sampled.bad:
            report.drop(path, index, "frame cannot be decoded")
        for index, rgb in sampled.frames:
            yield index, path, rgb
        return
    for index, path in enumerate(item.paths):
        try:
            with Image.open(path) as img:
                rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as e:
            report.drop(path, None, f"unreadable image ({e})")
            continue
        yield index, path, rgb


def _save(rgb_or_gray: np.ndarray, path: str, fmt: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(faces.encode_image(rgb_or_gray, fmt))


def process_item(item: Item, out: str, opts: Options, report: Report) -> list[dict]:
    """Crop (and for live, depth) every sampled frame of one item; the manifest rows it gives."""
    rows, last_box = [], None
    ext = "png" if opts.image_format == "png" else "jpg"
    frames = list(_frames_of(item, opts, report))
    if (frames and opts.detector != "haar" and facemesh.model_available()
            and facemesh.video_upside_down([rgb for _, _, rgb in frames])):
        # phone videos stored turned by 180° (six of MSU-MFSD's): crop and mesh them upright
        frames = [(i, p, np.ascontiguousarray(rgb[::-1, ::-1])) for i, p, rgb in frames]
        report.notes.append((item.paths[0], None, "stored upside down: turned by 180°"))
    for index, path, rgb in frames:
        frame = index if item.is_video else None
        box, which = facemesh.find_face_box(rgb, opts.detector)
        if box is None:
            if opts.missed == "reuse" and last_box is not None:
                box, which = last_box, "reused"
                report.reused_boxes += 1
                report.notes.append((path, frame, "no face found: reused the video's last box"))
            else:
                report.drop(path, frame, "no face found" + (
                    " (and no earlier box in this video to reuse)" if opts.missed == "reuse"
                    else ""))
                continue
        if max(box[2], box[3]) < opts.min_face:
            report.drop(path, frame, f"face too small ({box[2]}×{box[3]} px < --min_face "
                                     f"{opts.min_face})")
            continue
        last_box = box
        report.detectors[which] = report.detectors.get(which, 0) + 1
        crop = faces.crop_face(rgb, box, opts.margin, opts.size)
        stem = f"{item.video}/{index:06d}"
        crop_rel = f"crops/{stem}.{ext}"
        _save(crop, os.path.join(out, crop_rel), opts.image_format)
        depth_rel = ""
        if item.label == "live" and opts.depth == "mesh":
            try:
                depth = facemesh.crop_depth(crop)
            except facemesh.MeshError as e:
                report.notes.append((path, frame, f"mesh failed, no depth map (the builder uses "
                                                  f"the prior): {e}"))
            else:
                depth_rel = f"depth/{stem}.png"
                _save(np.round(depth * 255.0).astype(np.uint8), os.path.join(out, depth_rel),
                      "png")
        report.kept[item.label] += 1
        rows.append({"path": crop_rel, "label": item.label, "video": item.video,
                     "domain": item.domain, "depth": depth_rel})
    return rows


def write_manifest(path: str, rows: list[dict]) -> None:
    """manifest.csv: path,label,video[,domain],depth (domain only when some row has one)."""
    columns = ["path", "label", "video"] + (["domain"] if any(r["domain"] for r in rows)
                                            else []) + ["depth"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def preprocess(inputs: list[str], out: str, opts: Options, labels_csv: str | None = None,
               progress: bool = True) -> Report:
    """Run the whole job; returns the report (also written to DIR/preprocess_report.json)."""
    if opts.depth == "mesh" and not facemesh.model_available():
        raise UserError(f"--depth mesh needs the Face Mesh model ({facemesh.MESH_PATH}); "
                        "use --depth prior")
    if opts.detector == "blazeface" and not facemesh.model_available():
        raise UserError(f"--detector blazeface needs {facemesh.DETECTOR_PATH}; use auto or haar")
    if os.path.isfile(out):
        raise UserError(f"--out {out} is a file; expected a folder")
    report = Report()
    items = items_from_csv(labels_csv, report) if labels_csv else items_from_layout(inputs,
                                                                                     report)
    os.makedirs(out, exist_ok=True)
    rows = []
    for item in tqdm.tqdm(items, desc="videos / image folders", disable=not progress):
        got = process_item(item, out, opts, report)
        report.videos += bool(got)
        rows.extend(got)
    write_manifest(os.path.join(out, "manifest.csv"), rows)
    with open(os.path.join(out, REPORT_FILE), "w") as f:
        json.dump(report.as_dict(), f, indent=1)
    return report


def summary_lines(report: Report, out: str) -> list[str]:
    """The closing summary: what was kept, and every dropped or noted frame with its file."""
    where = lambda p, f: p if f is None else f"{p} frame {f}"  # noqa: E731
    reasons = collections.Counter(r.split(" (")[0].split(": ")[0] for _, _, r in report.dropped)
    lines = [f"kept {sum(report.kept.values())} frames ({report.kept['live']} live, "
             f"{report.kept['spoof']} spoof) from {report.videos} videos/folders → "
             f"{os.path.join(out, 'manifest.csv')}",
             f"faces by detector: {report.detectors or {}}; last box reused: "
             f"{report.reused_boxes}",
             f"dropped: {len(report.dropped)}" + (f" ({dict(reasons)})" if reasons else "")]
    lines += [f"  dropped: {where(p, f)}: {r}" for p, f, r in report.dropped]
    lines += [f"  note: {where(p, f)}: {r}" for p, f, r in report.notes]
    return lines


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m d2am_jax.data.preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="folders laid out as live/ spoof/")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--labels", help="CSV path,label[,domain][,video] instead of the layout")
    sampling = p.add_mutually_exclusive_group()
    sampling.add_argument("--frames", type=int, default=None,
                          help="evenly spaced frames per video (default 8)")
    sampling.add_argument("--every", type=int, default=None, help="every N-th frame of a video")
    p.add_argument("--detector", choices=facemesh.DETECTORS, default="auto",
                   help="auto: BlazeFace, the Haar cascade where it misses")
    p.add_argument("--missed", choices=("skip", "reuse"), default="skip",
                   help="a frame without a face: skip it, or reuse the video's last box")
    p.add_argument("--margin", type=float, default=0.25, help="crop side = box side × (1+margin)")
    p.add_argument("--size", type=int, default=256, help="side of the square crops")
    p.add_argument("--min_face", type=int, default=40, help="smallest face box side, pixels")
    p.add_argument("--depth", choices=("mesh", "prior"),
                   default="mesh" if facemesh.model_available() else "prior",
                   help="live depth maps from the Face Mesh, or none (the builder's prior)")
    p.add_argument("--format", dest="image_format", choices=("png", "jpeg"), default="png")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    if not args.inputs and not args.labels:
        p.error("give INPUT folders or --labels CSV")
    if args.frames is not None and args.frames < 1 or args.every is not None and args.every < 1:
        p.error("--frames and --every must be ≥ 1")
    if args.size < 1 or args.margin < 0:
        p.error("--size must be ≥ 1 and --margin ≥ 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    opts = Options(frames=args.frames if args.every is None else None, every=args.every,
                   detector=args.detector, missed=args.missed, margin=args.margin,
                   size=args.size, min_face=args.min_face, depth=args.depth,
                   image_format=args.image_format)
    if opts.frames is None and opts.every is None:
        opts = dataclasses.replace(opts, frames=8)
    try:
        report = preprocess(args.inputs, args.out, opts, args.labels,
                            progress=not args.no_progress)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(report, args.out)))
    return 0 if sum(report.kept.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
