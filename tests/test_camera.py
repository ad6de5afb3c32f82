"""predict --camera (any OpenCV capture source) and --video --stream, through a video file made
here from scikit-image's astronaut: per-frame scores equal the model's own on the training crop,
the decision is the mean of the last frames at the checkpoint's threshold, faceless frames."""

import csv
import json
import os

import cv2
import jax
import numpy as np
import pytest
from skimage import data as skdata

from d2am_jax import checkpointing, predict
from d2am_jax import state as state_lib
from d2am_jax.configs import smoke
from d2am_jax.data import facemesh, faces
from d2am_jax.data.color import rgb_to_model_input

FACE = np.ascontiguousarray(skdata.astronaut()[0:300, 100:400])
FACELESS = cv2.resize(skdata.coffee(), (300, 300))


def frames():
    """8 frames: the face drifting and darkening (so an untrained net scores them apart),
    frames 3 and 6 without a face."""
    out = []
    for i in range(8):
        if i in (3, 6):
            out.append(FACELESS)
        else:
            out.append(np.clip(np.roll(FACE, 4 * i, axis=1) * (1.0 - 0.08 * i), 0, 255)
                       .astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cam") / "cam.avi")
    out = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10, (300, 300))
    for rgb in frames():
        out.write(np.ascontiguousarray(rgb[..., ::-1]))
    out.release()
    return path


def decoded(path):
    cap = cv2.VideoCapture(path)
    out = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            return out
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


@pytest.fixture(scope="module")
def run(tmp_path_factory, video):
    """A workdir with untrained weights, its per-frame scores computed here without predict.py,
    and a threshold between them."""
    config = smoke.get_config()
    state = state_lib.init_state(config, jax.random.PRNGKey(3))
    r = config.data.resolution
    crops, expected = [], []
    for rgb in decoded(video):
        box, _ = facemesh.find_face_box(rgb, "auto")
        expected.append(None if box is None else len(crops))
        if box is not None:
            crops.append(faces.crop_face(rgb, box, 0.25, r))
    x = rgb_to_model_input(np.stack(crops))
    predict = state_lib.make_predict(config)
    scores = np.asarray(predict(state.params, state.batch_stats, x), np.float64)
    per_frame = [None if k is None else float(scores[k]) for k in expected]
    threshold = float(np.median(scores))
    path = str(tmp_path_factory.mktemp("run"))
    ckpt = checkpointing.Checkpointer(path, 1)
    record = {"epoch": 1, "step": 4, "threshold": threshold, "threshold_mode": "source_val"}
    ckpt.save(4, state, np.zeros(8, np.int32),
              {"config": json.loads(config.to_json_best_effort()), "results": [record]},
              best=True)
    ckpt.close()
    return path, per_frame, threshold


def test_camera_source_scores_each_frame_and_smooths_the_decision(run, video, tmp_path, capsys):
    workdir, per_frame, threshold = run
    assert [s is None for s in per_frame] == [i in (3, 6) for i in range(8)]
    out = str(tmp_path / "frames.csv")
    assert predict.main(["--workdir", workdir, "--camera", video, "--window", "3",
                         "--out", out]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["frames"] == 8 and summary["frames_with_face"] == 6
    assert summary["threshold"] == pytest.approx(threshold)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    recent, decision = [], ""
    for i, (row, line, want) in enumerate(zip(rows, lines[:-1], per_frame)):
        assert int(row["frame"]) == i
        if want is None:
            assert row["score"] == "" and line.startswith(f"frame {i}: no face")
        else:
            assert float(row["score"]) == pytest.approx(want, abs=2e-5)
            recent = (recent + [want])[-3:]
            decision = "live" if np.mean(recent) >= threshold else "spoof"
            assert float(row["smoothed"]) == pytest.approx(np.mean(recent), abs=2e-5)
            assert line.startswith(f"frame {i}: score ") and line.endswith(decision)
        assert row["decision"] == decision  # a faceless frame keeps the last decision
    assert len({r["decision"] for r in rows if r["decision"]}) >= 1
    assert summary["final_decision"] == decision


def test_video_stream_is_the_same_path_and_every_nth_frame(run, video, capsys):
    workdir, per_frame, _ = run
    assert predict.main(["--workdir", workdir, "--video", video, "--stream", "--every", "2",
                         "--max_frames", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines[:-1]] == ["frame 0", "frame 2", "frame 4"]
    score = float(lines[1].split("score ")[1].split()[0])
    assert score == pytest.approx(per_frame[2], abs=1e-4)


def test_bad_capture_sources_are_named(run, tmp_path, capsys):
    workdir, _, _ = run
    assert predict.main(["--workdir", workdir, "--camera", str(tmp_path / "no.avi")]) == 1
    assert "no.avi: no such file (and not a camera index)" in capsys.readouterr().err
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"not a video")
    assert predict.main(["--workdir", workdir, "--camera", str(junk)]) == 1
    assert "OpenCV cannot open this capture source" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        predict.parse_args(["--workdir", workdir, "--images", str(tmp_path)])  # no --out
    assert os.path.isdir(workdir)


def _has_gui() -> bool:
    info = [ln for ln in cv2.getBuildInformation().splitlines() if ln.strip().startswith("GUI:")]
    return bool(info) and "NONE" not in info[0]


@pytest.mark.skipif(_has_gui(), reason="this OpenCV has a GUI: --show would open a window; "
                                       "the project installs opencv-python-headless")
def test_show_without_a_gui_says_which_opencv_it_needs(run, video, capsys):
    workdir, _, _ = run
    assert predict.main(["--workdir", workdir, "--camera", video, "--show",
                         "--max_frames", "1"]) == 1
    assert "--show needs an OpenCV build with a GUI (opencv-python" in capsys.readouterr().err
