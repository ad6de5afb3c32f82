"""Data parallelism over a device mesh: the sharded meta-step (both orders), stats pass and
prediction equal the single-device ones on the same global batch, each compiled once (run with
four CPU devices in a subprocess: the device count is fixed when jax starts); batches the mesh
does not divide are refused naming both numbers."""

import json
import os
import subprocess
import sys
import types

import pytest

from d2am_jax import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_four_devices_equal_one_in_float64():
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
               + " --xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharded_check.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for order in ("second", "first"):
        assert out[f"{order}_params"] <= 1e-10, out
        assert out[f"{order}_batch_stats"] <= 1e-10, out
        assert out[f"{order}_metrics"] <= 1e-10, out
        assert out[f"{order}_replicated"], out        # the new state stays replicated
        assert out[f"{order}_traces"] == [1, 1], out  # one compile each, sharded or not
    assert out["stats"] <= 1e-10 and out["predict"] <= 1e-10, out
    assert out["stats_traces"] == 1


def test_a_batch_the_mesh_does_not_divide_is_refused_with_both_numbers():
    mesh = types.SimpleNamespace(num_devices=4)
    runtime.Placement.check_divides(mesh, {"meta.per_domain_batch": 8})
    with pytest.raises(ValueError, match=r"config.meta.per_domain_batch=6 is not divisible by "
                                         r"the 4 devices"):
        runtime.Placement.check_divides(mesh, {"meta.per_domain_batch": 6, "eval.batch_size": 8})


@pytest.mark.parametrize("args,match", [
    (("127.0.0.1:1234", 2, None), "go together"),
    (("127.0.0.1:1234", 2, 2), r"--process_id=2 must lie in \[0, --num_processes=2\)"),
])
def test_incomplete_or_inconsistent_process_flags_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        runtime.start_processes(*args)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes(tmp_path, counts, timeout_s):
    """The training CLI as len(counts) localhost processes, process i started with
    --num_processes=counts[i]; (return code, stderr) of each."""
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "d2am_jax.main", "--config", "d2am_jax/configs/smoke.py",
         "--workdir", str(tmp_path / f"p{i}"), "--config.progress=False",
         f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}", f"--process_id={i}",
         f"--initialization_timeout={timeout_s}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i, n in enumerate(counts)]
    out = []
    try:
        for p in procs:
            err = p.communicate(timeout=300)[1]
            out.append((p.returncode, err))
        return out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_processes_that_disagree_on_the_process_count_all_stop_naming_both_numbers(tmp_path):
    # jax itself takes the count from the coordinator alone: process 1 would join and then wait
    # in the first collective.
    for code, err in _processes(tmp_path, [2, 3], timeout_s=60):
        assert code == 1, err[-3000:]
        assert ("error: the coordinator at 127.0.0.1" in err and "runs --num_processes=2, but "
                "process 1 was started with --num_processes=3" in err), err[-3000:]
    assert not (tmp_path / "p0").exists()          # stopped before the run began


def test_too_few_processes_end_after_the_timeout_with_what_to_check(tmp_path):
    # One process of two: the coordinator waits --initialization_timeout seconds, then jax ends
    # the process from C++ (an abort, no Python error); the line logged before says what to check.
    [(code, err)] = _processes(tmp_path, [2], timeout_s=5)
    assert code != 0
    assert "start 2 processes, ids 0 to 1, each with --num_processes=2" in err, err[-3000:]
    assert "RegisterTask" in err, err[-3000:]
