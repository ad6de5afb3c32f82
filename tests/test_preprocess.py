"""The preprocess command on inputs made here from scikit-image's astronaut and faceless images:
layout and CSV labels, sampling, missed-face policies, bad input named in the summary, and the
manifest it writes built by fas_manifest."""

import csv
import json
import os

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from d2am_jax.data import build, facemesh, preprocess

FACE = np.ascontiguousarray(skdata.astronaut()[0:300, 100:400])   # the face is ~95 px of 300
COFFEE = skdata.coffee()


def write_video(path, frames, size=(200, 200)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    for rgb in frames:
        out.write(np.ascontiguousarray(cv2.resize(rgb, size)[..., ::-1]))
    out.release()
    return str(path)


def corrupt_frame(path, frame):
    """Zero the JPEG data of one frame of an MJPG .avi (its '00dc' chunk), as a damaged file."""
    raw = bytearray(open(path, "rb").read())
    movi, idx1 = raw.index(b"movi"), raw.rindex(b"idx1")
    starts = [i for i in range(movi, idx1) if raw[i:i + 4] == b"00dc"]
    k = starts[frame]
    n = int.from_bytes(raw[k + 4:k + 8], "little")
    raw[k + 8:k + 8 + n] = bytes(n)
    open(path, "wb").write(raw)


def save(path, rgb):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rgb).save(path)
    return str(path)


def shifted(i):
    return np.ascontiguousarray(np.roll(FACE, 3 * i, axis=1))


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """in/siteA/live/astro.avi (10 frames, frame 5 corrupt), in/siteA/live/coffee.png (no face),
    in/siteA/spoof/photo/{0,1}.png (a face folder), in/siteA/spoof/broken.jpg (not an image),
    in/siteA/stray.avi (no label)."""
    root = tmp_path_factory.mktemp("pre") / "in"
    video = write_video(root / "siteA" / "live" / "astro.avi", [shifted(i) for i in range(10)])
    corrupt_frame(video, 5)
    save(root / "siteA" / "live" / "coffee.png", COFFEE)
    save(root / "siteA" / "spoof" / "photo" / "0.png", FACE)
    save(root / "siteA" / "spoof" / "photo" / "1.png", shifted(2))
    (root / "siteA" / "spoof" / "broken.jpg").write_bytes(b"not a jpeg")
    write_video(root / "siteA" / "stray.avi", [FACE] * 2)
    return root


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_layout_crops_depth_manifest_and_every_drop_named(layout, tmp_path, capsys):
    out = tmp_path / "out"
    rc = preprocess.main([str(layout), "--out", str(out), "--every", "2", "--size", "64",
                          "--no_progress"])
    text = capsys.readouterr().out
    assert rc == 0
    rows = rows_of(out / "manifest.csv")
    assert list(rows[0]) == ["path", "label", "video", "domain", "depth"]
    live = [r for r in rows if r["label"] == "live"]
    spoof = [r for r in rows if r["label"] == "spoof"]
    # every 2nd frame of 10: 0, 2, 4, 6, 8 (frame 5, undecodable, is not one of them)
    assert [r["path"] for r in live] == [f"crops/in/siteA/live/astro/{i:06d}.png"
                                         for i in (0, 2, 4, 6, 8)]
    assert {r["video"] for r in live} == {"in/siteA/live/astro"}
    assert {r["video"] for r in spoof} == {"in/siteA/spoof/photo"} and len(spoof) == 2
    assert {r["domain"] for r in rows} == {"siteA"}
    assert all(r["depth"] == "" for r in spoof)
    for r in live:
        crop = np.asarray(Image.open(out / r["path"]))
        depth = np.asarray(Image.open(out / r["depth"]))
        assert crop.shape == (64, 64, 3) and depth.shape == (64, 64) and depth.max() >= 250
        iy, ix = np.unravel_index(depth.argmax(), depth.shape)
        assert 64 / 3 <= ix <= 2 * 64 / 3 and 64 / 3 <= iy <= 2 * 64 / 3
        assert depth[-6:, :6].max() == 0
    report = json.load(open(out / preprocess.REPORT_FILE))
    dropped = {(os.path.basename(d["file"]), d["frame"]): d["reason"] for d in report["dropped"]}
    assert dropped[("astro.avi", 5)] == "frame cannot be decoded"
    assert dropped[("coffee.png", None)] == "no face found"
    assert dropped[("broken.jpg", None)].startswith("unreadable image")
    assert dropped[("stray.avi", None)] == "no label: not under a live/ or spoof/ folder"
    assert report["kept"] == {"live": 5, "spoof": 2} and report["num_dropped"] == 4
    for name in ("astro.avi frame 5: frame cannot be decoded", "coffee.png: no face found",
                 "broken.jpg: unreadable image", "stray.avi: no label"):
        assert name in text
    assert "kept 7 frames (5 live, 2 spoof) from 2 videos/folders" in text


def test_the_manifest_builds_with_the_depth_maps(layout, tmp_path):
    out = tmp_path / "out"
    preprocess.main([str(layout), "--out", str(out), "--frames", "2", "--size", "32",
                     "--no_progress"])
    summary = build.build("fas_manifest", str(tmp_path / "tfds"), str(out),
                          {"resolution": "32", "image_format": "png"})
    assert summary["examples"] == {"frames": 4}
    assert summary["notes"] == {}
    info = json.load(open(os.path.join(summary["path"], "metadata.json")))
    assert info == {"depth": "mesh"}


def test_missed_face_policy_skip_lists_and_reuse_takes_the_last_box(tmp_path):
    frames = [FACE, FACE, COFFEE, FACE, COFFEE, COFFEE]
    write_video(tmp_path / "in" / "live" / "v.avi", frames)
    skip = preprocess.preprocess([str(tmp_path / "in")], str(tmp_path / "o1"),
                                 preprocess.Options(frames=None, every=1, size=32),
                                 progress=False)
    assert skip.kept["live"] == 3
    assert [(d[1], d[2]) for d in skip.dropped] == [(2, "no face found"), (4, "no face found"),
                                                    (5, "no face found")]
    reuse = preprocess.preprocess([str(tmp_path / "in")], str(tmp_path / "o2"),
                                  preprocess.Options(frames=None, every=1, size=32,
                                                     missed="reuse"), progress=False)
    assert reuse.kept["live"] == 6 and reuse.reused_boxes == 3 and not reuse.dropped
    assert [n[1] for n in reuse.notes if "reused" in n[2]] == [2, 4, 5]
    assert len(rows_of(tmp_path / "o2" / "manifest.csv")) == 6


def test_face_too_small_and_folder_without_labels(tmp_path, capsys):
    save(tmp_path / "in" / "live" / "a.png", FACE)
    save(tmp_path / "nolabels" / "b.png", FACE)
    rc = preprocess.main([str(tmp_path / "in"), str(tmp_path / "nolabels"), "--out",
                          str(tmp_path / "o"), "--min_face", "150", "--no_progress"])
    text = capsys.readouterr().out
    assert rc == 1  # nothing kept
    assert "a.png: face too small (" in text and "< --min_face 150)" in text
    assert "nolabels: no labels: expected live/ and spoof/ folders" in text
    assert rows_of(tmp_path / "o" / "manifest.csv") == []


def test_labels_from_a_csv_and_haar_detector(tmp_path):
    a = save(tmp_path / "data" / "a.png", FACE)
    save(tmp_path / "data" / "b.png", shifted(1))
    with open(tmp_path / "labels.csv", "w") as f:
        f.write("path,label,domain,video\ndata/a.png,spoof,cam1,v1\ndata/b.png,spoof,cam1,v1\n"
                "data/missing.png,live,cam1,v2\ndata/a.png,maybe,,\n")
    report = preprocess.preprocess([], str(tmp_path / "o"), preprocess.Options(
        size=32, detector="haar"), labels_csv=str(tmp_path / "labels.csv"), progress=False)
    assert report.kept == {"live": 0, "spoof": 2} and report.detectors == {"haar": 2}
    reasons = [d[2] for d in report.dropped]
    assert any("missing.png does not exist" in r for r in reasons)
    assert any("unknown label 'maybe'" in r for r in reasons)
    rows = rows_of(tmp_path / "o" / "manifest.csv")
    assert [(r["video"], r["domain"]) for r in rows] == [("v1", "cam1"), ("v1", "cam1")]
    assert os.path.exists(a)


def test_missing_input_is_a_user_error(tmp_path, capsys):
    assert preprocess.main([str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_a_video_stored_upside_down_is_turned(tmp_path):
    write_video(tmp_path / "in" / "live" / "phone.avi",
                [np.ascontiguousarray(shifted(i)[::-1, ::-1]) for i in range(3)])
    report = preprocess.preprocess([str(tmp_path / "in")], str(tmp_path / "o"),
                                   preprocess.Options(frames=3, size=64), progress=False)
    assert report.kept["live"] == 3
    assert [n[2] for n in report.notes] == ["stored upside down: turned by 180°"]
    depth = np.asarray(Image.open(tmp_path / "o" / "depth" / "in" / "live" / "phone" /
                                  "000000.png"))
    iy, ix = np.unravel_index(depth.argmax(), depth.shape)
    assert 64 / 3 <= iy <= 2 * 64 / 3
    crop = np.asarray(Image.open(tmp_path / "o" / "crops" / "in" / "live" / "phone" /
                                 "000000.png"))
    face = facemesh.detect_face(crop)
    assert face is not None and face.keypoints[3, 1] > face.keypoints[0, 1]  # mouth below eye
    assert facemesh.looks_upside_down(crop) is False
