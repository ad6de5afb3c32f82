"""The four video builders, the synthetic builder, the loader and the build CLI, on tiny fake
releases written inside the tests (MJPG .avi; a public-domain face from scikit-image for Haar)."""

import concurrent.futures
import json
import os
import sys

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds
from skimage import data as skdata

from d2am_jax.data import build, builders, faces, loader
from d2am_jax.data.builders.video import depth_map_path, read_annotation_rows
from d2am_jax.data.depth import face_depth_prior
from d2am_jax.data.faces import BadItem

tfds.disable_progress_bar()

# NASA's public-domain astronaut portrait; the Haar cascade finds this face at 48–112 px.
FACE = skdata.astronaut()[36:196, 145:305]
FRAME_W, FRAME_H = 160, 120
GRAY = 90
RED = (230, 20, 20)
# A square the annotation tests draw and annotate: (x, y, w, h).
BOX = (42, 20, 66, 66)
# depth=prior: these tests are about sampling, crops and labels (tests/test_facemesh.py covers
# the mesh depth maps on real faces).
SMALL = {"frames_per_video": "2", "resolution": "32", "depth": "prior"}


def write_video(path, kind="face", n_frames=4, box=BOX, color=RED, turned=False):
    """A tiny MJPG .avi: 'face' (astronaut, drifting 2 px per frame), 'square' (a coloured box
    at `box` on gray, for annotation tests) or 'noise' (no face anywhere); `turned`: stored
    upside down, as six of MSU-MFSD's phone videos are."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    out = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10, (FRAME_W, FRAME_H))
    rng = np.random.default_rng(0)
    for i in range(n_frames):
        frame = np.full((FRAME_H, FRAME_W, 3), GRAY, np.uint8)
        if kind == "face":
            frame[15:95, 30 + 2 * i:110 + 2 * i] = cv2.resize(FACE, (80, 80))
        elif kind == "square":
            x, y, w, h = box
            frame[y:y + h, x:x + w] = color
        else:
            frame = rng.integers(0, 256, frame.shape, dtype=np.uint8)
        if turned:
            frame = frame[::-1, ::-1]
        out.write(np.ascontiguousarray(frame[..., ::-1]))
    out.release()
    return path


def write_text(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def fake_casia(root):
    for split, subject in (("train_release", "1"), ("test_release", "3")):
        for name in ("1", "HR_1", "3", "7"):
            write_video(os.path.join(root, split, subject, f"{name}.avi"))
    return root


def fake_oulu(root, eyes="60,45,90,45"):
    """Eyes at (60, 45) and (90, 45): interocular 30 → box side 66, top 45 − 0.38·66 ≈ 20,
    left 75 − 33 = 42, i.e. exactly BOX."""
    for folder, user in (("Train_files", "01"), ("Test_files", "36"), ("Dev_files", "21")):
        for access in (1, 2, 4):
            stem = os.path.join(root, folder, f"1_1_{user}_{access}")
            write_video(stem + ".avi", "square")
            write_text(stem + ".txt", "".join(f"{i}, {eyes}\n" for i in range(4)))
    return root


def fake_replay(root):
    for split in ("train", "test", "devel"):
        for rel in ("real/client001_session01_webcam_authenticate_adverse_1",
                    "attack/fixed/attack_highdef_client001_session01_highdef_photo_adverse",
                    "attack/hand/attack_mobile_client001_session01_mobile_video_controlled"):
            write_video(os.path.join(root, split, rel + ".mov"), "square")
            x, y, w, h = BOX
            write_text(os.path.join(root, "face-locations", split, rel + ".face"),
                       "".join(f"{i} {x} {y} {w} {h}\n" for i in range(4)))
    return root


def fake_msu(root):
    x, y, w, h = BOX
    for client in ("002", "003"):
        for rel in (f"real/real_client{client}_laptop_SD_scene01",
                    f"attack/attack_client{client}_laptop_SD_printed_photo_scene01"):
            write_video(os.path.join(root, "scene01", rel + ".mov"), "square")
            write_text(os.path.join(root, "scene01", rel + ".face"),
                       "".join(f"{i},{x},{y},{x + w},{y + h}\n" for i in range(4)))
    write_text(os.path.join(root, "train_sub_list.txt"), "02\n")
    write_text(os.path.join(root, "test_sub_list.txt"), "03\n")
    return root


def build_and_load(name, manual, data_dir, config=SMALL, **kwargs):
    summary = build.build(name, str(data_dir), str(manual), dict(config), **kwargs)
    return summary, {s: loader.load(name, s, str(data_dir), dict(config))
                     for s in summary["examples"]}


def red_fraction(rgb):
    r, g, b = (rgb[..., c].astype(int) for c in range(3))
    return float(np.mean((r > 150) & (g < 90) & (b < 90)))


# -- faces.py -------------------------------------------------------------------------------------


def test_sample_indices_are_segment_centres():
    np.testing.assert_array_equal(faces.sample_indices(10, 2), [2, 7])
    np.testing.assert_array_equal(faces.sample_indices(100, 4), [12, 37, 62, 87])
    np.testing.assert_array_equal(faces.sample_indices(3, 5), [0, 1, 2])
    assert len(faces.sample_indices(0, 3)) == 0


def test_box_from_eyes_hand_computed():
    assert faces.box_from_eyes((60, 45), (90, 45)) == BOX
    with pytest.raises(ValueError, match="coincide"):
        faces.box_from_eyes((5, 5), (5, 5))


def test_crop_face_pads_outside_the_frame_and_keeps_the_box():
    rgb = np.zeros((50, 50, 3), np.uint8)
    rgb[10:30, 10:30] = 255
    crop = faces.crop_face(rgb, (10, 10, 20, 20), margin=0.0, size=20)
    assert crop.shape == (20, 20, 3) and crop.min() == 255
    edge = faces.crop_face(rgb, (-10, -10, 20, 20), margin=0.0, size=10)  # replicated border
    assert edge.shape == (10, 10, 3) and edge.max() == 0


def test_detect_face_gives_the_same_answers_on_threads():
    rng = np.random.default_rng(1)
    frames = []
    for i in range(8):
        frame = np.full((FRAME_H, FRAME_W, 3), GRAY, np.uint8)
        if i % 2:
            frame = rng.integers(0, 256, frame.shape, dtype=np.uint8)
        else:
            frame[15:95, 30 + i:110 + i] = cv2.resize(FACE, (80, 80))
        frames.append(frame)
    serial = [faces.detect_face(f) for f in frames]
    assert [b is None for b in serial] == [False, True] * 4
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert list(pool.map(faces.detect_face, frames * 2)) == serial * 2

def test_read_video_frames_and_unreadable_video(tmp_path):
    path = write_video(str(tmp_path / "v.avi"), "square", n_frames=5)
    frames = faces.read_video_frames(path, 2)
    assert [i for i, _ in frames] == [1, 3]
    assert frames[0][1].shape == (FRAME_H, FRAME_W, 3)
    (tmp_path / "bad.avi").write_bytes(b"not a video")
    with pytest.raises(BadItem, match="bad.avi"):
        faces.read_video_frames(str(tmp_path / "bad.avi"), 2)


def test_annotation_rows_name_the_bad_line(tmp_path):
    write_text(str(tmp_path / "a.face"), "0 1 2 3 4\n1 1 x 3 4\n")
    with pytest.raises(BadItem, match=r"a.face:2"):
        read_annotation_rows(str(tmp_path / "a.face"))


# -- the four releases ---------------------------------------------------------------------------


def test_casia_haar_crops_labels_and_splits(tmp_path):
    summary, sets = build_and_load("casia_fasd", fake_casia(str(tmp_path / "rel")),
                                   tmp_path / "out")
    assert summary["examples"] == {"train": 8, "test": 8} and summary["num_skipped"] == 0
    train = sets["train"]
    by_video = {v: (y, a) for v, y, a in zip(train.video, train.labels, train.attack)}
    assert by_video == {"casia_fasd:train_release/1/1": (1, ""),
                        "casia_fasd:train_release/1/HR_1": (1, ""),
                        "casia_fasd:train_release/1/3": (0, "warped_photo"),
                        "casia_fasd:train_release/1/7": (0, "video_replay")}
    assert set(train.domain) == {"casia_fasd"} and set(train.frame) == {1, 3}
    assert set(sets["test"].video) >= {"casia_fasd:test_release/3/1"}
    images = train.frames[np.arange(len(train))]
    assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8
    # The crop is centred on the face: its middle is skin, not the flat gray background.
    assert np.abs(images[:, 12:20, 12:20].astype(int) - GRAY).mean() > 20
    assert "tensorflow" not in sys.modules


def test_oulu_eye_annotations_give_the_annotated_box(tmp_path):
    config = dict(SMALL, face_margin="0")
    summary, sets = build_and_load("oulu_npu", fake_oulu(str(tmp_path / "rel")),
                                   tmp_path / "out", config)
    assert summary["examples"] == {"train": 6, "test": 6}
    assert summary["notes"] == {"devel_videos_left_out": 3}
    test = sets["test"]
    assert sorted(set(test.video)) == [f"oulu_npu:Test_files/1_1_36_{a}" for a in (1, 2, 4)]
    assert dict(zip(test.video, test.attack))["oulu_npu:Test_files/1_1_36_2"] == "print1"
    assert dict(zip(test.video, test.labels))["oulu_npu:Test_files/1_1_36_1"] == 1
    for i in range(len(test)):  # the crop is the red square the eyes were placed around
        assert red_fraction(test.frames.decode_one(i)) > 0.9


def test_oulu_box_annotations_and_unknown_access_type(tmp_path):
    root = fake_oulu(str(tmp_path / "rel"), eyes=f"{BOX[0]},{BOX[1]},{BOX[0] + BOX[2]},"
                                                 f"{BOX[1] + BOX[3]}")
    _, sets = build_and_load("oulu_npu", root, tmp_path / "out",
                             dict(SMALL, face_margin="0", annotation="box"))
    assert red_fraction(sets["train"].frames.decode_one(0)) > 0.9
    write_video(os.path.join(root, "Train_files", "1_1_01_6.avi"), "square")
    with pytest.raises(BadItem, match=r"1_1_01_6.avi: unknown access type 6"):
        build.build("oulu_npu", str(tmp_path / "out2"), root, SMALL)


def test_replay_face_locations_attack_types_and_devel_left_out(tmp_path):
    summary, sets = build_and_load("replay_attack", fake_replay(str(tmp_path / "rel")),
                                   tmp_path / "out", dict(SMALL, face_margin="0"))
    assert summary["examples"] == {"train": 6, "test": 6}
    assert summary["notes"] == {"devel_videos_left_out": 3}
    train = sets["train"]
    kinds = dict(zip(train.video, train.attack))
    assert kinds == {
        "replay_attack:train/real/client001_session01_webcam_authenticate_adverse_1": "",
        "replay_attack:train/attack/fixed/attack_highdef_client001_session01_highdef_photo_"
        "adverse": "fixed/highdef_photo",
        "replay_attack:train/attack/hand/attack_mobile_client001_session01_mobile_video_"
        "controlled": "hand/mobile_video"}
    assert all(red_fraction(train.frames.decode_one(i)) > 0.9 for i in range(len(train)))


def test_replay_missing_face_file_falls_back_to_haar_and_unknown_folder_fails(tmp_path):
    root = fake_replay(str(tmp_path / "rel"))
    rel = "real/client002_session01_webcam_authenticate_adverse_1"
    write_video(os.path.join(root, "train", rel + ".mov"), "face")  # no .face file
    summary = build.build("replay_attack", str(tmp_path / "out"), root, SMALL)
    assert summary["notes"]["videos_annotation_unusable_used_detector"] == 1
    assert summary["examples"]["train"] == 8
    with pytest.raises(BadItem, match="is missing"):  # 'annotations' insists on them
        build.build("replay_attack", str(tmp_path / "out2"), root,
                    dict(SMALL, face_crop="annotations"))
    write_video(os.path.join(root, "train", "other", "x.mov"), "square")
    with pytest.raises(BadItem, match=r"other/x.mov: unknown label"):
        build.build("replay_attack", str(tmp_path / "out3"), root, SMALL)


def test_msu_subject_lists_and_corner_annotations(tmp_path):
    root = fake_msu(str(tmp_path / "rel"))
    summary, sets = build_and_load("msu_mfsd", root, tmp_path / "out",
                                   dict(SMALL, face_margin="0"))
    assert summary["examples"] == {"train": 4, "test": 4}
    assert all("client002" in v for v in sets["train"].video)
    assert all("client003" in v for v in sets["test"].video)
    assert set(sets["test"].attack) == {"", "printed_photo"}
    assert all(red_fraction(sets["test"].frames.decode_one(i)) > 0.9 for i in range(4))
    write_video(os.path.join(root, "scene01", "real", "real_client009_laptop_SD_scene01.mov"))
    with pytest.raises(BadItem, match="client009.*subject 9 is in neither"):
        build.build("msu_mfsd", str(tmp_path / "out2"), root, SMALL)


def test_msu_face_files_in_face_locations_folder(tmp_path):
    root = fake_msu(str(tmp_path / "rel"))
    stem = "real/real_client002_laptop_SD_scene01"
    os.makedirs(os.path.join(root, "face-locations", "real"))
    os.rename(os.path.join(root, "scene01", stem + ".face"),
              os.path.join(root, "face-locations", stem + ".face"))
    summary, sets = build_and_load("msu_mfsd", root, tmp_path / "out",
                                   dict(SMALL, face_margin="0"))
    assert "videos_annotation_unusable_used_detector" not in summary["notes"]
    assert all(red_fraction(sets["train"].frames.decode_one(i)) > 0.9 for i in range(4))


def face_frame(i):
    """Frame i of write_video(kind='face'), upright."""
    frame = np.full((FRAME_H, FRAME_W, 3), GRAY, np.uint8)
    frame[15:95, 30 + 2 * i:110 + 2 * i] = cv2.resize(FACE, (80, 80))
    return frame


def test_msu_upside_down_video_is_turned_with_the_face_file_boxes(tmp_path):
    root = fake_msu(str(tmp_path / "rel"))
    stem = os.path.join(root, "scene01", "real", "real_client002_android_SD_scene01")
    write_video(stem + ".mp4", "face", turned=True)
    # the .face boxes are in the stored (upside-down) frame: x' = W − x − w, y' = H − y − h
    write_text(stem + ".face", "".join(
        f"{i},{FRAME_W - 110 - 2 * i},{FRAME_H - 95},{FRAME_W - 30 - 2 * i},{FRAME_H - 15}\n"
        for i in range(4)))
    summary, sets = build_and_load("msu_mfsd", root, tmp_path / "out",
                                   dict(SMALL, face_margin="0", resolution="48"))
    assert summary["notes"]["videos_rotated_180_to_find_the_face"] == 1
    train = sets["train"]
    rows = [i for i in range(len(train)) if "android" in train.video[i]]
    assert [int(train.frame[i]) for i in rows] == [1, 3]
    for i in rows:
        stored = train.frames.decode_one(i).astype(float)
        upright = faces.crop_face(face_frame(int(train.frame[i])),
                                  (30 + 2 * int(train.frame[i]), 15, 80, 80), 0.0, 48)
        assert np.abs(stored - upright).mean() < 12
        assert np.abs(stored - upright[::-1, ::-1]).mean() > 3 * np.abs(stored - upright).mean()


def test_a_frame_that_fails_to_decode_is_skipped_counted_and_listed(tmp_path):
    root = fake_casia(str(tmp_path / "rel"))
    path = os.path.join(root, "train_release", "1", "1.avi")
    write_video(path, "face", n_frames=8)
    raw = bytearray(open(path, "rb").read())
    movi, idx1 = raw.index(b"movi"), raw.rindex(b"idx1")
    k = [i for i in range(movi, idx1) if raw[i:i + 4] == b"00dc"][3]   # frame 3's JPEG
    n = int.from_bytes(raw[k + 4:k + 8], "little")
    raw[k + 8:k + 8 + n] = bytes(n)
    open(path, "wb").write(raw)
    config = dict(SMALL, frames_per_video="8")
    summary, sets = build_and_load("casia_fasd", root, tmp_path / "out", config)
    frames = sorted(int(f) for v, f in zip(sets["train"].video, sets["train"].frame)
                    if v.endswith("train_release/1/1"))
    assert frames == [0, 1, 2, 4, 5, 6, 7]   # sampling went on after the bad frame
    assert summary["notes"]["frames_undecodable_skipped"] == 1
    report = builders.read_report(summary["path"])
    assert report["listed"]["frames_undecodable_skipped"] == [f"{path} frame 3"]


def test_replay_face_locations_outside_the_release_is_an_option_and_warned(tmp_path, capsys):
    root = fake_replay(str(tmp_path / "rel"))
    elsewhere = str(tmp_path / "unpacked" / "face-locations")
    os.makedirs(os.path.dirname(elsewhere))
    os.rename(os.path.join(root, "face-locations"), elsewhere)
    with pytest.raises(BadItem, match="no face found"):  # red squares: no detector finds them
        build.build("replay_attack", str(tmp_path / "out"), root, SMALL)
    err = capsys.readouterr().err
    assert f"warning: replay_attack: no face-locations folder at {root}/face-locations" in err
    assert "--config face_locations=DIR" in err
    summary, sets = build_and_load("replay_attack", root, tmp_path / "out2",
                                   dict(SMALL, face_margin="0", face_locations=elsewhere))
    assert "warning" not in capsys.readouterr().err
    assert summary["examples"] == {"train": 6, "test": 6}
    assert all(red_fraction(sets["train"].frames.decode_one(i)) > 0.9 for i in range(6))


def test_mesh_depth_is_the_default_and_written_into_the_info(tmp_path):
    root = fake_casia(str(tmp_path / "rel"))
    config = {"frames_per_video": "2", "resolution": "64"}
    summary, sets = build_and_load("casia_fasd", root, tmp_path / "out", config)
    assert builders.read_report(summary["path"])["depth"] == "mesh"
    assert json.load(open(os.path.join(summary["path"], "metadata.json"))) == {"depth": "mesh"}
    train = sets["train"]
    live = np.flatnonzero(train.labels == 1)
    assert len(live) == 4 and train.depth.has_map[live].all()
    assert not train.depth.has_map[train.labels == 0].any()
    for i in live:
        d = train.depth[np.array([i])][0]
        iy, ix = np.unravel_index(d.argmax(), d.shape)
        assert 64 / 3 <= ix <= 2 * 64 / 3 and 64 / 3 <= iy <= 2 * 64 / 3
        assert d[-6:, :6].max() == 0 and d.max() > 0.95
    prior = builders.builder("casia_fasd", str(tmp_path / "p"), dict(config, depth="prior"))
    assert prior.info.metadata == {"depth": "prior"}
    with pytest.raises(ValueError, match="depth: expected 'mesh', 'prior' or a folder"):
        builders.builder("casia_fasd", str(tmp_path / "q"), dict(config, depth="prnet"))


def test_missing_release_names_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="Train_files"):
        build.build("oulu_npu", str(tmp_path / "out"), str(tmp_path), SMALL)


# -- bad input and skip_bad ----------------------------------------------------------------------


def add_bad_casia_videos(root):
    write_video(os.path.join(root, "train_release", "1", "HR_2.avi"), "noise")
    write_text(os.path.join(root, "train_release", "1", "HR_3.avi"), "garbage")
    write_video(os.path.join(root, "train_release", "1", "9.avi"))


@pytest.mark.parametrize("bad, message", [
    ("noise", r"HR_2.avi: no face found by BlazeFace or the Haar cascade in any of the 2 "
              r"sampled frames"),
    ("garbage", r"HR_3.avi: OpenCV cannot open this video"),
    ("unknown", r"9.avi: unknown CASIA-FASD video name '9'"),
])
def test_bad_videos_fail_naming_the_file(tmp_path, bad, message):
    root = fake_casia(str(tmp_path / "rel"))
    folder = os.path.join(root, "train_release", "1")
    if bad == "noise":
        write_video(os.path.join(folder, "HR_2.avi"), "noise")
    elif bad == "garbage":
        write_text(os.path.join(folder, "HR_3.avi"), "garbage")
    else:
        write_video(os.path.join(folder, "9.avi"))
    with pytest.raises(BadItem, match=message):
        build.build("casia_fasd", str(tmp_path / "out"), root, SMALL)
    assert not os.path.exists(tmp_path / "out" / "casia_fasd"
                              / "depth-prior__frames_per_video-2__resolution-32" / "1.1.0")


def test_skip_bad_skips_counts_and_reports(tmp_path):
    root = fake_casia(str(tmp_path / "rel"))
    add_bad_casia_videos(root)
    summary, sets = build_and_load("casia_fasd", root, tmp_path / "out", skip_bad=True)
    assert summary["num_skipped"] == 3 and summary["examples"] == {"train": 8, "test": 8}
    with open(summary["report"]) as f:
        report = json.load(f)
    assert sorted(os.path.basename(s["item"]) for s in report["skipped"]) == [
        "9.avi", "HR_2.avi", "HR_3.avi"]
    assert report["skip_bad"] is True
    assert len(sets["train"].skipped) == 3  # the loader carries the build's skips along


# -- depth ---------------------------------------------------------------------------------------


def test_depth_dir_maps_are_matched_by_video_and_frame(tmp_path):
    root = fake_casia(str(tmp_path / "rel"))
    depth_dir = tmp_path / "depth"
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))  # left 0 → right 1
    os.makedirs(depth_dir / "train_release" / "1" / "1")
    cv2.imwrite(str(depth_dir / "train_release" / "1" / "1" / "0001.png"), ramp)
    # frame 3 has no map of its own: the nearest one (frame 1) is used, and noted
    config = dict(SMALL, depth=str(depth_dir))
    summary, sets = build_and_load("casia_fasd", root, tmp_path / "out", config)
    assert summary["notes"]["live_frames_depth_from_nearest_frame"] == 1
    assert summary["notes"]["live_frames_without_depth_map_used_prior"] == 6
    train = sets["train"]
    depth = train.depth[np.arange(len(train))]
    assert depth.shape == (8, 32, 32) and depth.dtype == np.float32
    for k in range(len(train)):
        if train.video[k] == "casia_fasd:train_release/1/1":
            assert train.depth.has_map[k]
            assert depth[k, :, 0].mean() < 0.05 and depth[k, :, -1].mean() > 0.95
        elif train.labels[k] == 1:
            np.testing.assert_allclose(depth[k], face_depth_prior(32))
        else:
            assert not depth[k].any()


def test_depth_map_path_prefers_the_exact_frame(tmp_path):
    folder = tmp_path / "d" / "a" / "v"
    os.makedirs(folder)
    for name in ("3.png", "0010.jpg", "notes.txt"):
        (folder / name).write_bytes(b"x")
    assert depth_map_path(str(tmp_path / "d"), "a/v", 10) == (str(folder / "0010.jpg"), 10)
    assert depth_map_path(str(tmp_path / "d"), "a/v", 5) == (str(folder / "3.png"), 3)
    assert depth_map_path(str(tmp_path / "d"), "a/w", 5) is None


# -- loader --------------------------------------------------------------------------------------


def test_loader_take_concat_and_unbuilt_dataset(tmp_path):
    _, sets = build_and_load("casia_fasd", fake_casia(str(tmp_path / "rel")), tmp_path / "out")
    train, test = sets["train"], sets["test"]
    both = loader.concat([train, test])
    assert len(both) == 16 and set(both.origin) == {"casia_fasd/train", "casia_fasd/test"}
    np.testing.assert_array_equal(both.frames[[9]], test.frames[[1]])
    live = both.take(both.labels == 1)
    assert live.class_counts() == {"live": 8, "spoof": 0}
    with pytest.raises(ValueError, match="no spoof"):
        live.require_both_classes("live only")
    with pytest.raises(FileNotFoundError, match="not built.*python -m d2am_jax.data.build"):
        loader.load("casia_fasd", "train", str(tmp_path / "empty"), SMALL)
    with pytest.raises(ValueError, match="no split 'devel'"):
        loader.load("casia_fasd", "devel", str(tmp_path / "out"), SMALL)
    direct = loader.load_directory(both_dir(tmp_path / "out"), "train", depth_size=8)
    assert len(direct) == 8 and direct.depth[[0]].shape == (1, 8, 8)
    # Re-reading records instead of holding the encoded bytes gives the same data, also mixed.
    lazy = loader.load("casia_fasd", "train", str(tmp_path / "out"), SMALL, in_memory=False)
    assert lazy.frames.records.blobs is None and train.frames.records.blobs is not None
    np.testing.assert_array_equal(lazy.frames[np.arange(8)], train.frames[np.arange(8)])
    np.testing.assert_array_equal(lazy.depth[np.arange(8)], train.depth[np.arange(8)])
    mixed = loader.concat([lazy, test])
    np.testing.assert_array_equal(mixed.frames[[3, 12]], both.frames[[3, 12]])


def both_dir(out):
    return str(out / "casia_fasd" / "depth-prior__frames_per_video-2__resolution-32" / "1.1.0")


# -- configs and the CLI -------------------------------------------------------------------------


def test_config_overrides_are_typed_and_checked(tmp_path):
    b = builders.builder("casia_fasd", str(tmp_path), {"frames_per_video": "3",
                                                      "face_margin": "0.5"})
    assert b.builder_config.frames_per_video == 3 and b.builder_config.face_margin == 0.5
    assert b.builder_config.name == "face_margin-0.5__frames_per_video-3"
    assert builders.builder("casia_fasd", str(tmp_path)).builder_config.name == "default"
    with pytest.raises(ValueError, match="unknown config field 'frames'"):
        builders.builder("casia_fasd", str(tmp_path), {"frames": "3"})
    with pytest.raises(ValueError, match="frames_per_video: expected int, got 'x'"):
        builders.builder("casia_fasd", str(tmp_path), {"frames_per_video": "x"})
    with pytest.raises(ValueError, match="face_crop: expected one of"):
        builders.builder("casia_fasd", str(tmp_path), {"face_crop": "mtcnn"})
    with pytest.raises(ValueError, match="key=value"):
        builders.parse_overrides(["resolution"])


def test_cli_builds_and_reports(tmp_path, capsys):
    root = fake_casia(str(tmp_path / "rel"))
    argv = ["casia_fasd", "--manual_dir", root, "--data_dir", str(tmp_path / "out"),
            "--config", "frames_per_video=2", "--config", "resolution=32"]
    assert build.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["examples"] == {"train": 8, "test": 8}
    add_bad_casia_videos(root)
    assert build.main(argv + ["--overwrite"]) == 1
    assert "error:" in capsys.readouterr().err
    assert build.main(argv + ["--overwrite", "--skip_bad", "--num_workers", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["num_skipped"] == 3


# -- fas_synthetic (last: it drives the generator) -----------------------------------------------


def test_synthetic_builder_round_trips_the_generator(tmp_path):
    from d2am_jax.data import synthetic

    config = {"resolution": 32, "num_domains": 2, "per_domain": 8, "frames_per_video": 2}
    summary = build.build("fas_synthetic", str(tmp_path), None, config)
    assert summary["examples"] == {"domain0": 8, "domain1": 8}
    got = loader.load("fas_synthetic", "domain1", str(tmp_path), config)
    want = synthetic.generate_domain(synthetic.SyntheticConfig(
        resolution=32, num_domains=2, per_domain=8, frames_per_video=2), 1)
    for k in range(len(got)):
        # tfds orders records by key hash; find this one's source row by its pixels (PNG is exact)
        img = got.frames.decode_one(k)
        i = next(i for i in range(8) if np.array_equal(want["image"][i], img))
        assert got.labels[k] == want["label"][i]
        assert got.video[k] == "fas_synthetic:" + want["video"][i]
        assert got.domain[k] == "domain1"
        assert got.attack[k] == ("" if want["label"][i] == 1 else want["attack"][i])
        np.testing.assert_allclose(got.depth[[k]][0], want["depth"][i], atol=0.5 / 255 + 1e-6)
    assert "tensorflow" not in sys.modules



def test_without_the_face_model_depth_defaults_to_the_prior_and_mesh_is_refused(tmp_path,
                                                                               monkeypatch):
    from d2am_jax.data import facemesh
    from d2am_jax.errors import MissingFileError, UserError
    monkeypatch.setattr(facemesh, "model_available", lambda: False)
    b = builders.builder("casia_fasd", str(tmp_path), {"frames_per_video": "2"})
    assert b.builder_config.depth == "prior" and b.info.metadata == {"depth": "prior"}
    with pytest.raises(UserError, match="'mesh' needs the Face Mesh model"):
        builders.builder("msu_mfsd", str(tmp_path), {"depth": "mesh", "frames_per_video": "2"})
    with pytest.raises(MissingFileError, match="face_locations: .*nope is not a folder"):
        builders.builder("replay_attack", str(tmp_path), {"face_locations": str(tmp_path / "nope")})
