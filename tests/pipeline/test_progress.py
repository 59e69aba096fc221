"""Progress lines a person can follow in a log file (issue 14), for both executors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.progress import RunProgress, rate_text
from tests.helpers.httpserver import photo_server

PHOTOS = sorted((Path(__file__).resolve().parents[1] / "fixtures" / "coco" / "images").glob("*.jpg"))[:4]
LINE = re.compile(r"progress: ([\d,]+) / ([\d,]+) rows")


def test_progress_line_counts_rate_eta_failures_and_stage_time():
    p = RunProgress(total_rows=100, done_rows=20, every_s=0)
    assert "running for" in p.line() and "20 / 100 rows (20.0%)" in p.line()
    p.add({"rows": 40, "status": {"success": 30, "failed_to_download": 8, "too_small": 2},
           "seconds": {"download": 3.0, "caption": 9.0}})
    line = p.line()
    assert "60 / 100 rows (60.0%) in 1 parts" in line and "ETA" in line
    assert "failed 10 (failed_to_download 8, too_small 2)" in line
    assert "stage time: caption 75%, download 25%" in line
    assert rate_text(1, 400) == "0.0025 rows/s" and rate_text(3, 2) == "1.50 rows/s"


@pytest.mark.parametrize("executor", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_a_logged_run_prints_progress_lines_while_it_works(tmp_path, executor):
    n = 24
    with photo_server(PHOTOS, delay=0.25) as srv:
        pq.write_table(pa.table({"url": [srv.url(f"p{i}.jpg") for i in range(n)], "caption": ["c"] * n}),
                       tmp_path / "in.parquet")
        r = subprocess.run([sys.executable, "-m", "capfilt.cli", "run", "--input", str(tmp_path / "in.parquet"),
                            "--output", str(tmp_path / "out"), "--pipeline", "download", "--allow-private-network",
                            "--rows-per-shard", "6", "--executor", executor, "--no-progress",
                            "--progress-every", "1", "--set", "download.thread_count=1"],
                           capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [m for m in (LINE.search(x) for x in r.stderr.splitlines()) if m]
    assert len(lines) >= 3, r.stderr[-3000:]  # several while it ran, one at the end
    done = [int(m.group(1).replace(",", "")) for m in lines]
    assert done == sorted(done) and done[-1] == n and {int(m.group(2)) for m in lines} == {n}
    assert "Total Progress: 0/?" not in r.stderr
