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
STAGE = re.compile(r"(\w+) ([\d,]+)/[\d,]+ \(")


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
    # per-stage rows done / total and rate, while it works and at the end (issue 14)
    stage_lines = [x for x in r.stderr.splitlines() if "capfilt: stages: " in x]
    assert len(stage_lines) >= 3, r.stderr[-3000:]
    per_stage = [dict((m.group(1), int(m.group(2))) for m in STAGE.finditer(x)) for x in stage_lines]
    assert {"read", "download", "write"} <= set(per_stage[-1]) and set(per_stage[-1].values()) == {n}
    assert all(f"/{n} (" in x and "rows/s)" in x for x in stage_lines)
    # mid-run lines: some rows read but not yet downloaded, named as the stage the run waits on
    assert any(0 < d.get("download", 0) < n or (d.get("read", 0) > d.get("download", 0)) for d in per_stage[:-1])
    assert any("waiting on stage download" in x for x in stage_lines), "\n".join(stage_lines)
    # Ray's alarming-but-harmless lines are not printed (issue 14)
    assert "constructor arguments in the object store" not in r.stderr
    assert "may hang forever" not in r.stderr


def test_stage_line_names_rows_rates_and_the_stage_rows_wait_on():
    counts = {"read": (30, 30), "download": (30, 20), "caption": (20, 5), "write": (5, 5)}
    p = RunProgress(total_rows=40, done_rows=10, every_s=0, stages=["read", "download", "caption", "write"],
                    stage_counts=lambda: counts)
    line = p.stage_line()
    assert re.fullmatch(r"stages: read 30/30 \([\d.,]+ rows/s\), download 20/30 \([\d.,]+ rows/s\), caption 5/30 "
                        r"\([\d.,]+ rows/s\), write 5/30 \([\d.,]+ rows/s\); waiting on stage caption "
                        r"\(15 rows: 0 queued, 15 in progress\)", line), line
    counts.update(caption=(10, 5))
    assert p.stage_line().endswith("waiting on stage caption (15 rows: 10 queued, 5 in progress)")
    assert RunProgress(10, every_s=0).stage_line() == ""  # no counter: no stage line
