"""No Ray process of a ``capfilt run`` outlives it: after it finishes and after SIGTERM (issue 10)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers.httpserver import photo_server

PHOTOS = sorted((Path(__file__).resolve().parents[1] / "fixtures" / "coco" / "images").glob("*.jpg"))[:4]


def _ray_processes() -> set[int]:
    """PIDs of Ray processes on this machine (workers, actors, raylet, GCS)."""
    out = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::") or "raylet" in cmd or "gcs_server" in cmd or "default_worker.py" in cmd:
            out.add(p.info["pid"])
    return out


def _left_over(before: set[int], within: float = 10.0) -> set[int]:
    deadline = time.time() + within
    while True:
        alive = {pid for pid in _ray_processes() - before
                 if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE}
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.25)


@pytest.mark.parametrize("stop", [pytest.param("finish", marks=pytest.mark.slow), "SIGTERM"])
def test_no_ray_worker_outlives_the_run(tmp_path, stop):
    n = 12 if stop == "finish" else 200
    with photo_server(PHOTOS, delay=0.0 if stop == "finish" else 0.2) as srv:
        pq.write_table(pa.table({"url": [srv.url(f"p{i}.jpg") for i in range(n)],
                                 "caption": [f"c {i}" for i in range(n)]}), tmp_path / "in.parquet")
        out = tmp_path / "out"
        before = _ray_processes()
        proc = subprocess.Popen([sys.executable, "-m", "capfilt.cli", "run", "--input", str(tmp_path / "in.parquet"),
                                 "--output", str(out), "--models", "tiny", "--allow-private-network",
                                 "--rows-per-shard", "4", "--set", "download.image_size=64", "--no-progress",
                                 "--executor", "ray"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if stop == "SIGTERM":
            deadline = time.time() + 240
            while not list(out.glob("_stats/*.stats.json")) and time.time() < deadline and proc.poll() is None:
                time.sleep(0.2)
            assert proc.poll() is None, "the run ended before SIGTERM; make it slower"
            assert _ray_processes() - before, "no Ray process was running"
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    if stop == "finish":
        assert proc.returncode == 0, err[-2000:]
    else:
        assert proc.returncode == 143 and "interrupted" in err and "Traceback" not in err, err[-2000:]
        assert json.loads((out / "_capfilt" / "run.json").read_text())["status"] == "interrupted"
    assert _left_over(before) == set()
    assert not (out / "_capfilt" / "lease.json").exists()
