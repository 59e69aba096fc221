"""The download benchmark's own parts: its server under concurrent load, the steady-state and memory measures."""

from __future__ import annotations

import concurrent.futures as cf
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_download as bd  # noqa: E402


def test_server_answers_concurrent_requests_with_its_latency():
    photos = sorted((ROOT / "tests" / "fixtures" / "coco" / "images").glob("*.jpg"))
    with bd.Server(latency_ms=100) as srv:
        srv.reset()
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(64) as ex:
            bodies = list(ex.map(lambda i: urllib.request.urlopen(f"{srv.base}/img/{i}.jpg?i={i}", timeout=30).read(),
                                 range(128)))
        wall = time.perf_counter() - t0
        times = srv.times()
    assert bodies[80] == photos[80 % 79].read_bytes() and bodies[5] == photos[5].read_bytes()
    assert len(times) == 128
    # 128 requests of 100 ms each, 64 at a time: served in parallel (serially they would take 12.8 s)
    assert 0.2 <= wall < 5.0


def test_steady_rate_is_the_middle_80_percent_of_requests():
    times = [i * 0.01 for i in range(101)]  # 100 rows/s, evenly spaced
    assert bd.steady(times) == pytest.approx(100.0)
    late_start = [0.0] + [5.0 + i * 0.01 for i in range(100)]  # 5 s of start-up before the 2nd request
    assert bd.steady(late_start) == pytest.approx(100.0)
    assert bd.steady([1.0] * 5) is None


def test_commit_rate_needs_three_shards():
    assert bd.commit_rate([10.0, 12.0], 1000) is None
    assert bd.commit_rate([10.0, 12.0, 14.0], 1000) == pytest.approx(500.0)


def test_tree_rss_counts_the_children():
    child = subprocess.Popen([sys.executable, "-c", "b = bytearray(300 * 2**20); import time; time.sleep(30)"])
    try:
        me = psutil.Process()
        deadline = time.monotonic() + 20
        while psutil.Process(child.pid).memory_info().rss < 300 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert bd.tree_rss(me) >= me.memory_info().rss + 300 * 2**20
    finally:
        child.kill()
        child.wait()
