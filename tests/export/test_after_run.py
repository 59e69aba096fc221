"""Export as the final step of ``capfilt run`` (issue 11 item 1): ``--set export.format=webdataset`` runs
the pipeline, then writes the WebDataset shards beside the output; a destination inside the output is
refused before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.export.helpers import read_tars, source_rows, stats
from tests.helpers.httpserver import photo_server

pytest.importorskip("webdataset")

PHOTOS = sorted((Path(__file__).resolve().parents[1] / "fixtures" / "coco" / "images").glob("*.jpg"))[:4]


def _run(tmp_path: Path, *extra: str, n: int = 8) -> subprocess.CompletedProcess:
    """``capfilt run`` of the download recipe on ``tmp_path/in.parquet`` (written once) into ``tmp_path/out``."""
    with photo_server(PHOTOS) as srv:
        if not (tmp_path / "in.parquet").exists():  # a rerun reads the same input (its URLs name no port)
            pq.write_table(pa.table({"url": [srv.url(f"p{i}.jpg") for i in range(n)],
                                     "caption": [f"c{i}" for i in range(n)]}), tmp_path / "in.parquet")
        return subprocess.run([sys.executable, "-m", "capfilt.cli", "run", "--input", str(tmp_path / "in.parquet"),
                               "--output", str(tmp_path / "out"), "--pipeline", "download", "--executor", "local",
                               "--allow-private-network", "--rows-per-shard", "3", *extra],
                              capture_output=True, text=True, timeout=600)


def test_run_then_export_webdataset_beside_the_output(tmp_path):
    r = _run(tmp_path, "--set", "export.format=webdataset")
    assert r.returncode == 0, r.stderr[-3000:]
    out, dest = tmp_path / "out", tmp_path / "out-webdataset"
    rows = source_rows(out)
    assert len(rows) == 8
    samples = read_tars(dest)
    assert [s["__key__"] for s in samples] == [x["key"] for x in rows if x["keep"]] and len(samples) == 8
    assert {s["txt"].decode() for s in samples} == {f"c{i}" for i in range(8)}
    assert sorted(p.name for p in dest.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]  # shard for shard
    assert sum(s["rows_in"] for s in stats(dest).values()) == 8
    assert f"export (webdataset): 8 of 8 rows in 3 shard(s): {dest}/{{00000..00002}}.tar" in " ".join(r.stdout.split())
    # rerunning the same command resumes: nothing to run, the export is already done (the second
    # server has another port, so its URLs differ, but every row is committed and none is fetched)
    (dest / "00001.tar").unlink()
    again = _run(tmp_path, "--set", "export.format=webdataset")
    assert again.returncode == 0, again.stderr[-3000:]
    assert [s["__key__"] for s in read_tars(dest)] == [x["key"] for x in rows]


def test_export_inside_the_output_is_refused_before_any_work(tmp_path):
    r = _run(tmp_path, "--set", "export.format=hf-parquet", "--set", f"export.to={tmp_path / 'out' / 'hf'}")
    assert r.returncode == 2
    text = " ".join(r.stderr.split())
    assert "export.to" in text and "inside the output" in text and "Traceback" not in text
    assert not (tmp_path / "out").exists()
