"""Ray start-up that fails (a busy machine) is retried with back-off, and when it keeps failing the
run ends with one paragraph before the output folder is touched (issue 14)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

FAULT = Path(__file__).resolve().parents[1] / "helpers" / "ray_start_fault"
ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, failures: int, out: Path) -> subprocess.CompletedProcess:
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}), tmp_path / "in.parquet")
    env = dict(os.environ, CAPFILT_TEST_RAY_START_FAILURES=str(failures),
               PYTHONPATH=os.pathsep.join([str(FAULT), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "capfilt.cli", "run", "--input", str(tmp_path / "in.parquet"),
                           "--output", str(out), "--pipeline", "download", "--allow-private-network",
                           "--no-progress", "--executor", "ray"], capture_output=True, text=True, env=env, timeout=600)


def test_ray_that_never_starts_ends_in_one_paragraph_and_leaves_the_output_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier user file")
    r = _run(tmp_path, failures=99, out=out)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert "could not start a local Ray on this machine after 3 attempts" in r.stderr
    assert "timed out during startup" in r.stderr and "--executor local" in r.stderr
    assert r.stderr.count("retrying in") == 2  # two retries were logged
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # nothing written, no lease, no _capfilt


def test_ray_start_up_that_fails_once_is_retried_and_the_run_completes(tmp_path):
    r = _run(tmp_path, failures=1, out=tmp_path / "out")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("retrying in") == 1
    assert (tmp_path / "out" / "00000.parquet").exists()


@pytest.mark.slow
def test_a_ray_already_running_here_is_left_alone_without_an_address(tmp_path):
    """Without --ray-address or RAY_ADDRESS, `capfilt run --executor ray` starts its private Ray even when
    another Ray runs on the machine (``ray.init()`` alone would join that one and then refuse
    ``num_cpus``: "When connecting to an existing cluster, num_cpus and num_gpus must not be provided")."""
    from tests.helpers.raycluster import LocalRayCluster

    cluster = LocalRayCluster(head_cpus=1, workers=[]).start()
    try:
        pq.write_table(pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}), tmp_path / "in.parquet")
        env = {k: v for k, v in cluster.env.items() if k != "RAY_ADDRESS"}
        r = subprocess.run([sys.executable, "-m", "capfilt.cli", "run", "--input", str(tmp_path / "in.parquet"),
                            "--output", str(tmp_path / "out"), "--pipeline", "download", "--allow-private-network",
                            "--no-progress", "--executor", "ray"], capture_output=True, text=True, env=env,
                           timeout=600, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        assert (tmp_path / "out" / "00000.parquet").exists()
        assert cluster.state("tasks") == [], "the run's tasks ran on the Ray that was already running"
        assert cluster.nodes(), "the running Ray was stopped"
    finally:
        cluster.stop()
