"""fas_manifest: a user's manifest.csv built, read back, and every kind of bad row refused with the
manifest's file name and line number (or skipped and reported under skip_bad)."""

import json
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from skimage import data as skdata

from d2am_jax.data import build, loader
from d2am_jax.data.depth import face_depth_prior
from d2am_jax.data.faces import BadItem

tfds.disable_progress_bar()

PNG = {"resolution": "16", "image_format": "png"}


def save(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8), mode).save(path)


def solid(color, shape=(20, 30)):
    return np.broadcast_to(np.asarray(color, np.uint8), shape + (3,))


def write_manifest(folder, rows, header="path,label,video,domain,depth"):
    path = os.path.join(folder, "manifest.csv")
    with open(path, "w") as f:
        f.write(header + "\n" + "".join(r + "\n" for r in rows))
    return path


@pytest.fixture
def frames(tmp_path):
    """Five frames of two domains; colour encodes (row) so reads can be checked exactly."""
    folder = tmp_path / "frames"
    for i in range(5):
        save(str(folder / "img" / f"{i}.png"), solid((40 * i, 10, 200 - 40 * i)))
    ramp = np.tile(np.linspace(0, 255, 16).astype(np.uint8), (16, 1))
    save(str(folder / "depth" / "0.png"), ramp)
    return folder


GOOD_ROWS = ["img/0.png,live,v0,siteA,depth/0.png",
             "img/1.png,spoof,v1,siteA,",
             "img/2.png,LIVE ,v0,siteB,",
             "img/3.png,spoof,,,",
             "img/4.png,live,v0,siteB,"]


def test_manifest_round_trip(frames, tmp_path):
    write_manifest(str(frames), GOOD_ROWS)
    summary = build.build("fas_manifest", str(tmp_path / "out"), str(frames), PNG)
    assert summary["examples"] == {"frames": 5} and summary["num_skipped"] == 0
    got = loader.load("fas_manifest", "frames", str(tmp_path / "out"), PNG)
    by_video_frame = {}
    for k in range(len(got)):
        img = got.frames.decode_one(k)
        assert img.shape == (16, 16, 3)  # 20×30 frames resized (not cropped) to the resolution
        i = int(round(img[0, 0, 0] / 40))  # which source frame this is (colours are solid)
        np.testing.assert_array_equal(img, solid((40 * i, 10, 200 - 40 * i), (16, 16)))
        by_video_frame[i] = (got.video[k], int(got.frame[k]), got.domain[k], int(got.labels[k]))
    assert by_video_frame == {0: ("fas_manifest:v0", 0, "siteA", 1),
                              1: ("fas_manifest:v1", 0, "siteA", 0),
                              2: ("fas_manifest:v0", 1, "siteB", 1),
                              3: ("fas_manifest:img/3.png", 0, "manifest", 0),
                              4: ("fas_manifest:v0", 2, "siteB", 1)}
    depth = got.depth[np.arange(len(got))]
    for k in range(len(got)):
        i = int(round(got.frames.decode_one(k)[0, 0, 0] / 40))
        if i == 0:  # its own map: a left-to-right ramp
            assert depth[k, :, 0].max() < 0.01 and depth[k, :, -1].min() > 0.99
        elif got.labels[k] == 1:
            np.testing.assert_allclose(depth[k], face_depth_prior(16))
        else:
            assert not depth[k].any()
    assert "tensorflow" not in sys.modules


def test_optional_columns_may_be_absent(frames, tmp_path):
    write_manifest(str(frames), ["img/0.png,live", "img/1.png,spoof"], header="path,label")
    build.build("fas_manifest", str(tmp_path / "out"), str(frames),
                dict(PNG, default_domain="lab"))
    got = loader.load("fas_manifest", "frames", str(tmp_path / "out"),
                      dict(PNG, default_domain="lab"))
    assert sorted(got.domain) == ["lab", "lab"] and sorted(got.labels) == [0, 1]


@pytest.mark.parametrize("row, message", [
    ("img/9.png,live,,,", r"manifest.csv:3: image file .*img/9.png does not exist"),
    ("img/1.png,genuine,,,", r"manifest.csv:3: unknown label 'genuine', expected 'live' or"),
    ("img/1.png,live,,,depth/9.png", r"manifest.csv:3: depth file .*depth/9.png does not exist"),
    ("img/gray.png,live,,,", r"manifest.csv:3: .*gray.png has mode L \(1 channel\(s\)\); "
                             r"expected an RGB image with 3 channels"),
    ("img/rgba.png,live,,,", r"manifest.csv:3: .*rgba.png has mode RGBA \(4 channel\(s\)\)"),
    ("img/corrupt.png,live,,,", r"manifest.csv:3: .*corrupt.png cannot be decoded"),
    ("img/1.png,live,,,,extra", r"manifest.csv:3: more fields than the header"),
])
def test_bad_rows_fail_naming_manifest_and_line(frames, tmp_path, row, message):
    save(str(frames / "img" / "gray.png"), np.full((8, 8), 100), "L")
    save(str(frames / "img" / "rgba.png"), np.full((8, 8, 4), 100), "RGBA")
    (frames / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    write_manifest(str(frames), [GOOD_ROWS[0], row, GOOD_ROWS[1]])
    with pytest.raises(BadItem, match=message):
        build.build("fas_manifest", str(tmp_path / "out"), str(frames), PNG)


def test_skip_bad_skips_rows_and_reports_which(frames, tmp_path):
    save(str(frames / "img" / "gray.png"), np.full((8, 8), 100), "L")
    save(str(frames / "img" / "rgba.png"), np.full((8, 8, 4), 100), "RGBA")
    (frames / "img" / "corrupt.png").write_bytes(b"garbage")
    manifest = write_manifest(str(frames), GOOD_ROWS[:2] + [
        "img/gray.png,live,,,", "img/rgba.png,spoof,,,", "img/corrupt.png,live,,,",
        "img/9.png,live,,,", "img/2.png,maybe,,,"])
    summary = build.build("fas_manifest", str(tmp_path / "out"), str(frames), PNG,
                          skip_bad=True)
    assert summary["examples"] == {"frames": 2} and summary["num_skipped"] == 5
    with open(summary["report"]) as f:
        report = json.load(f)
    assert sorted(s["item"] for s in report["skipped"]) == [f"{manifest}:{n}"
                                                            for n in range(4, 9)]
    assert report["manifest"] == manifest


def test_header_problems_are_errors(frames, tmp_path):
    write_manifest(str(frames), ["img/0.png,live,siteA"], header="path,label,domian")
    with pytest.raises(BadItem, match=r"manifest.csv:1: .*unknown column\(s\) \['domian'\]"):
        build.build("fas_manifest", str(tmp_path / "out"), str(frames), PNG)
    write_manifest(str(frames), ["img/0.png"], header="path")
    with pytest.raises(BadItem, match=r"missing column\(s\) \['label'\]"):
        build.build("fas_manifest", str(tmp_path / "out"), str(frames), PNG)
    write_manifest(str(frames), [], header="path,label")
    with pytest.raises(BadItem, match="no usable rows"):
        build.build("fas_manifest", str(tmp_path / "out"), str(frames), PNG)
    with pytest.raises(FileNotFoundError, match="manifest.csv does not exist"):
        build.build("fas_manifest", str(tmp_path / "out"), str(tmp_path), PNG)


def test_a_different_manifest_never_reuses_a_build(frames, tmp_path):
    write_manifest(str(frames), GOOD_ROWS)
    build.build("fas_manifest", str(tmp_path / "out"), str(frames), PNG)
    other = tmp_path / "other"
    os.makedirs(other / "img")
    save(str(other / "img" / "0.png"), solid((1, 2, 3)))
    save(str(other / "img" / "1.png"), solid((3, 2, 1)))
    write_manifest(str(other), ["img/0.png,live,,,", "img/1.png,spoof,,,"])
    with pytest.raises(ValueError, match="was built from .*frames/manifest.csv"):
        build.build("fas_manifest", str(tmp_path / "out"), str(other), PNG)
    # its own config (by path) gets its own build
    summary = build.build("fas_manifest", str(tmp_path / "out"), None,
                          dict(PNG, manifest=str(other / "manifest.csv")))
    assert summary["examples"] == {"frames": 2} and "__manifest-other-" in summary["config"]


def test_haar_face_crop_option(tmp_path):
    folder = tmp_path / "frames"
    save(str(folder / "face.png"), skdata.astronaut())
    save(str(folder / "noise.png"), np.random.default_rng(0).integers(0, 256, (64, 64, 3)))
    write_manifest(str(folder), ["face.png,live,,,"])
    config = {"resolution": "32", "face_crop": "haar", "face_margin": "0"}
    build.build("fas_manifest", str(tmp_path / "out"), str(folder), config)
    crop = loader.load("fas_manifest", "frames", str(tmp_path / "out"), config).frames.decode_one(0)
    # The astronaut's face box (177, 66, 95, 95) of the 512² image, resized the same way.
    want = np.asarray(Image.fromarray(skdata.astronaut()[66:161, 177:272]).resize((32, 32)))
    assert np.abs(crop.astype(int) - want.astype(int)).mean() < 25
    write_manifest(str(folder), ["face.png,live,,,", "noise.png,spoof,,,"])
    with pytest.raises(BadItem, match=r"manifest.csv:3: no face found by the Haar cascade"):
        build.build("fas_manifest", str(tmp_path / "out2"), str(folder), config)


def test_a_record_that_fails_to_decode_in_a_worker_names_dataset_and_record(frames, tmp_path):
    from d2am_jax.data.pipeline import Prefetcher
    from d2am_jax.data.sampler import CachedFrames

    write_manifest(str(frames), GOOD_ROWS)
    build.build("fas_manifest", str(tmp_path / "out"), str(frames), PNG)
    got = loader.load("fas_manifest", "frames", str(tmp_path / "out"), PNG)
    got.frames.records.blobs["image"][3] = b"\x89PNG broken"     # a record damaged on disk
    store = CachedFrames(len(got), got.frames.decode_one, 1 << 20, workers=2)
    batches = Prefetcher(lambda idx: store[np.array(idx)], [[0, 1], [2, 3], [4]], depth=2)
    assert next(batches).shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match=r"fas_manifest/frames record 3 \(video .*\).*cannot be"):
        next(batches)           # raised before the step that would have used that batch
