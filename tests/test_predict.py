"""Prediction from a workdir's best checkpoint: scores equal the model's own on the same frames,
per-video means, decisions at the checkpoint's threshold, the three input kinds, bad input."""

import csv
import json

import cv2
import jax
import numpy as np
import pytest
from PIL import Image

from d2am_jax import checkpointing, predict
from d2am_jax import state as state_lib
from d2am_jax.configs import smoke
from d2am_jax.data import faces
from d2am_jax.data.color import rgb_to_model_input


def _config():
    config = smoke.get_config()
    return config


def _model_scores(config, state, rgb_frames):
    """The live probability of each frame, computed here without predict.py."""
    r = config.data.resolution
    x = rgb_to_model_input(np.stack([faces.resize_square(f, r) for f in rgb_frames]))
    predict = state_lib.make_predict(config)
    return np.asarray(predict(state.params, state.batch_stats, x), np.float64)


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(0)
    # Different brightness per frame so the untrained network gives different scores.
    return [np.clip(rng.normal(40 + 30 * i, 20, (20, 24, 3)), 0, 255).astype(np.uint8)
            for i in range(6)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, frames):
    """A workdir whose best checkpoint holds untrained weights and a threshold between the
    frames' scores."""
    config = _config()
    state = state_lib.init_state(config, jax.random.PRNGKey(5))
    scores = _model_scores(config, state, frames)
    threshold = float(np.median(scores))
    path = str(tmp_path_factory.mktemp("run"))
    ckpt = checkpointing.Checkpointer(path, 1)
    record = {"epoch": 1, "step": 4, "threshold": threshold, "threshold_mode": "source_val"}
    ckpt.save(4, state, np.zeros(8, np.int32),
              {"config": json.loads(config.to_json_best_effort()), "results": [record]},
              best=True)
    ckpt.close()
    return path, scores, threshold


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_images_folder_scores_frames_and_videos(workdir, frames, tmp_path, capsys):
    run, scores, threshold = workdir
    folder = tmp_path / "images"
    # frames 0-1: video "a", 2-3: video "b", 4-5: no video (top folder).
    for i, frame in enumerate(frames):
        sub = folder / ("a" if i < 2 else "b" if i < 4 else ".")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(frame).save(sub / f"f{i}.png")
    out = tmp_path / "scores.csv"
    assert predict.main(["--workdir", run, "--images", str(folder), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["frames"] == 6 and summary["videos"] == 2 and summary["skipped"] == 0
    assert summary["checkpoint"] == "best step 4"
    rows = {r["path"].split("/")[-1]: r for r in _rows(out)}
    for i in range(6):
        row = rows[f"f{i}.png"]
        assert float(row["frame_score"]) == pytest.approx(scores[i], abs=2e-6)
        assert float(row["threshold"]) == pytest.approx(threshold, abs=1e-6)
    for video, members in (("a", (0, 1)), ("b", (2, 3))):
        mean = scores[list(members)].mean()
        for i in members:
            assert rows[f"f{i}.png"]["video"] == video
            assert float(rows[f"f{i}.png"]["video_score"]) == pytest.approx(mean, abs=2e-6)
            assert rows[f"f{i}.png"]["decision"] == ("live" if mean >= threshold else "spoof")
    for i in (4, 5):
        assert rows[f"f{i}.png"]["video"] == "" and rows[f"f{i}.png"]["video_score"] == ""
        assert rows[f"f{i}.png"]["decision"] == ("live" if scores[i] >= threshold else "spoof")


def test_manifest_with_labels_reports_hter(workdir, frames, tmp_path, capsys):
    run, scores, threshold = workdir
    lines = ["path,video,label"]
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,v{i},{'live' if scores[i] >= threshold else 'spoof'}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "scores.csv"
    assert predict.main(["--workdir", run, "--manifest", str(tmp_path / "m.csv"),
                         "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["hter"] == 0.0  # labels were set by the decisions themselves
    assert len(_rows(out)) == 6


def test_video_file_is_one_video(workdir, tmp_path, capsys):
    run, _, threshold = workdir
    path = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 32))
    rng = np.random.default_rng(1)
    for _ in range(10):
        writer.write(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    writer.release()
    out = tmp_path / "scores.csv"
    assert predict.main(["--workdir", run, "--video", path, "--frames_per_video", "4",
                         "--out", str(out)]) == 0
    rows = _rows(out)
    assert len(rows) == 4 and {r["video"] for r in rows} == {path}
    mean = np.mean([float(r["frame_score"]) for r in rows])
    assert all(float(r["video_score"]) == pytest.approx(mean, abs=2e-6) for r in rows)
    assert {r["decision"] for r in rows} == {"live" if mean >= threshold else "spoof"}


def test_bad_image_fails_naming_it_or_is_skipped_and_counted(workdir, frames, tmp_path, capsys):
    run, _, _ = workdir
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(frames[0]).save(folder / "good.png")
    Image.fromarray(frames[1][:, :, 0]).save(folder / "gray.png")
    out = tmp_path / "scores.csv"
    assert predict.main(["--workdir", run, "--images", str(folder), "--out", str(out)]) == 1
    assert "gray.png" in capsys.readouterr().err
    assert predict.main(["--workdir", run, "--images", str(folder), "--out", str(out),
                         "--skip_bad"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["skipped"] == 1
    assert "gray.png" in captured.err and len(_rows(out)) == 1


def test_workdir_without_checkpoint_fails_naming_it(tmp_path, frames, capsys):
    Image.fromarray(frames[0]).save(tmp_path / "x.png")
    (tmp_path / "empty").mkdir()
    assert predict.main(["--workdir", str(tmp_path / "empty"), "--images", str(tmp_path),
                         "--out", str(tmp_path / "s.csv")]) == 1
    err = capsys.readouterr().err.strip()
    assert "empty" in err and "train first" in err and len(err.splitlines()) == 1
    assert list((tmp_path / "empty").iterdir()) == []  # no best/ or checkpoints/ left behind


def test_missing_workdir_is_refused_and_not_created(tmp_path, frames, capsys):
    Image.fromarray(frames[0]).save(tmp_path / "x.png")
    missing = tmp_path / "no_such_run"
    assert predict.main(["--workdir", str(missing), "--images", str(tmp_path),
                         "--out", str(tmp_path / "s.csv")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --workdir") and str(missing) in err and "does not exist" in err
    assert len(err.splitlines()) == 1
    assert not missing.exists() and not (tmp_path / "s.csv").exists()


def test_a_bug_keeps_its_traceback(workdir, frames, tmp_path, monkeypatch):
    # Only the user's mistakes become one line: a plain ValueError from below is a bug.
    run, _, _ = workdir
    Image.fromarray(frames[0]).save(tmp_path / "x.png")

    def broken(*args, **kwargs):
        raise ValueError("shape mismatch deep inside")

    monkeypatch.setattr(predict, "frames_from_folder", broken)
    with pytest.raises(ValueError, match="shape mismatch deep inside"):
        predict.main(["--workdir", run, "--images", str(tmp_path), "--out",
                      str(tmp_path / "s.csv")])
