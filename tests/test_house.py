"""How the program is put together: host modules import no device library and change no jax
setting, `fast_conv_grad='auto'` follows the backend, evaluation passes attack types through
(ACER ≠ HTER when attacks differ in difficulty), and the CLI prints a user's mistake as one line
while a bug keeps its traceback."""

import os
import subprocess
import sys
import types

import numpy as np
import pytest

from d2am_jax import evaluation, runtime
from d2am_jax.configs import smoke
from d2am_jax.data.dataset import FasData
from d2am_jax.data.sampler import InMemoryFrames

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_MODULES = ("d2am_jax", "d2am_jax.metrics", "d2am_jax.domains", "d2am_jax.data.protocols",
                "d2am_jax.configs.default", "d2am_jax.configs.protocols", "d2am_jax.config_check",
                "d2am_jax.data.sources", "d2am_jax.logs")


def test_host_modules_import_neither_jax_nor_tfds_and_change_no_flag():
    code = ("import sys\n"
            f"for name in {HOST_MODULES!r}:\n"
            "    __import__(name)\n"
            "heavy = [m for m in ('jax', 'jaxlib', 'flax', 'tensorflow_datasets', 'tensorflow')\n"
            "         if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "import jax\n"
            "print(jax.config.jax_threefry_partitionable)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # jax's own default (True since jax 0.5): importing the project left it alone.
    assert proc.stdout.strip() == "True"


@pytest.mark.parametrize("value,backend,expected", [
    ("auto", "cpu", True), ("auto", "gpu", False), ("auto", "tpu", False),
    (True, "gpu", True), (False, "cpu", False), ("False", "cpu", False), ("true", "tpu", True),
])
def test_fast_conv_grad_auto_means_the_cpu_tuned_ops_on_cpu_only(value, backend, expected,
                                                                  monkeypatch):
    monkeypatch.setattr(runtime.jax, "default_backend", lambda: backend)
    assert runtime.fast_conv_grad(value) is expected


def test_fast_conv_grad_misspelled_is_refused():
    with pytest.raises(ValueError, match="model.fast_conv_grad"):
        runtime.fast_conv_grad("yes")


def _fas(scores, labels, attack, video):
    """Frames whose red channel is the score the stand-in predictor below returns."""
    frames = np.zeros((len(scores), 8, 8, 3), np.uint8)
    frames[..., 0] = np.round(np.asarray(scores) * 255).astype(np.uint8)[:, None, None]
    return FasData(InMemoryFrames(frames), np.asarray(labels, np.int32), None,
                   np.asarray(video), np.full(len(scores), "d"), np.asarray(attack))


def test_evaluation_passes_attack_types_so_acer_is_iso_not_hter():
    # Prints are easy (scored low), replays hard (half accepted): APCER is the replays' 0.5,
    # the pooled attack rate 0.25; BPCER 0. ISO ACER 0.25 ≠ HTER 0.125.
    live = [0.9, 0.8, 0.85, 0.95]
    prints = [0.1, 0.05, 0.2, 0.15]
    replays = [0.7, 0.2, 0.75, 0.1]
    target = _fas(live + prints + replays, [1] * 4 + [0] * 8,
                  ["live"] * 4 + ["print"] * 4 + ["replay"] * 4, [f"v{i}" for i in range(12)])
    val = _fas([0.9, 0.1], [1, 0], ["live", "print"], ["a", "b"])
    # A stand-in for the network: uint8 frames arrive as stored; the score is the red level.
    predict = lambda params, batch_stats, x: np.asarray(x)[..., 0].mean(axis=(1, 2)) / 255
    state = types.SimpleNamespace(params=None, batch_stats=None)
    config = smoke.get_config()
    config.data.resolution = 8
    config.eval.threshold_mode = "fixed"
    config.eval.threshold = 0.5
    result = evaluation.evaluate(predict, state, target, val, config)
    assert result["apcer_per_type"] == {"print": 0.0, "replay": 0.5}
    assert result["hter"] == pytest.approx(0.125)
    assert result["acer"] == pytest.approx(0.25)
    record = evaluation.record(result, 1, 10)
    assert record["acer"] != record["hter"] and record["apcer"] == 0.5


def _cli(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "d2am_jax.main", "--config", "d2am_jax/configs/smoke.py",
           "--workdir", str(tmp_path / "run"), "--config.progress=False", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)


def test_cli_prints_a_user_mistake_as_one_line(tmp_path):
    proc = _cli(tmp_path, "--config.meta.outer_lr=-0.1")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: config.meta.outer_lr: expected a finite β > 0")
    assert "Traceback" not in proc.stderr


def test_cli_missing_config_file_is_one_line(tmp_path):
    cmd = [sys.executable, "-m", "d2am_jax.main", "--config", "d2am_jax/configs/smok.py",
           "--workdir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: --config: cannot load the config file: [Errno 2] No such file or directory: "
        "'d2am_jax/configs/smok.py'"]
    assert not (tmp_path / "run").exists()


def test_cli_keeps_the_traceback_of_a_bug_in_a_config_file(tmp_path):
    (tmp_path / "buggy.py").write_text("def get_config():\n    return object().missing_helper\n")
    cmd = [sys.executable, "-m", "d2am_jax.main", "--config", str(tmp_path / "buggy.py"),
           "--workdir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "missing_helper" in proc.stderr


def test_cli_a_full_disk_is_one_line(tmp_path):
    code = ("import sys\n"
            "from d2am_jax import checkpointing, main, train\n"
            "def full(config, workdir):\n"
            "    raise checkpointing.CheckpointWriteError('could not write checkpoint step 4 in "
            "/run/checkpoints: no space left on device; the last good checkpoint is kept')\n"
            "train.train_and_evaluate = full\n"
            "from absl import app\n"
            "sys.argv = ['main', '--config', 'd2am_jax/configs/smoke.py', '--workdir', 'unused']\n"
            "app.run(main.main, flags_parser=main.parse_flags)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: could not write checkpoint step 4 in /run/checkpoints: no space left on device; "
        "the last good checkpoint is kept"]


def test_cli_keeps_the_traceback_of_a_bug(tmp_path):
    # A data-loading bug stands in for any bug below the CLI: a plain ValueError, not a UserError.
    code = ("import sys\n"
            "from d2am_jax.data import sources\n"
            "def broken(config, workdir):\n"
            "    raise ValueError('shape mismatch deep inside')\n"
            "sources.load = broken\n"
            "from d2am_jax import main\n"
            "from absl import app\n"
            f"sys.argv = ['main', '--config', 'd2am_jax/configs/smoke.py', '--workdir', "
            f"{str(tmp_path / 'run')!r}]\n"
            "app.run(main.main)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "shape mismatch deep inside" in proc.stderr
