"""Exactly-once against the ways a review found to mix, lose or duplicate rows (issue 10, items 1,
3, 5 and 10): an input edited between attempts, two runs on one output, parts of a re-executed
block split differently, refilter resume after the source grew, and a full disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.api import RunOptions, run
from capfilt.errors import OutputError
from capfilt.io.filesystem import locate
from capfilt.io.lease import LeaseHeld, OutputLease
from capfilt.io.writer import committed_keys, scan_output
from capfilt.stages.registry import known_stages, output_schema
from capfilt.stages.write import ShardWriter, reconcile_parts
from tests.helpers.httpserver import photo_server
from tests.helpers.report_fixture import make_output

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PHOTOS = sorted((FIXTURES / "coco" / "images").glob("*.jpg"))[:6]


def _run(inputs, out, *extra, **kw):
    return run(RunOptions(inputs=[str(i) for i in inputs], output=str(out), pipeline="download", executor="local",
                          overrides=["download.allow_private_network=true", "output.rows_per_shard=3", *extra],
                          progress=False, **kw))


def _keys(out: Path) -> list[str]:
    loc = locate(str(out))
    return committed_keys(loc, scan_output(loc)[0])


@pytest.fixture()
def server():
    with photo_server(PHOTOS) as srv:
        yield srv


def _csv(path: Path, srv, captions: list[str]) -> Path:
    path.write_text("url,caption\n" + "".join(f"{srv.url(f'p{i}.jpg')},{c}\n" for i, c in enumerate(captions)))
    return path


# --- item 1: an input edited between attempts (same row count) is refused, naming the file ---------------


def test_resume_refuses_an_input_edited_with_the_same_row_count(server, tmp_path):
    inp = _csv(tmp_path / "in.csv", server, ["a dog", "a cat", "a cow", "a hen", "a pig"])
    out = tmp_path / "out"
    _run([inp], out)
    (out / "_stats" / "00001.stats.json").unlink()  # the second shard was not committed: a crash
    _csv(inp, server, ["a dog", "a cat", "a cow", "A HEN", "a pig"])  # re-exported, same rows
    with pytest.raises(OutputError, match=r"input changed since .*in\.csv \(content changed\).*--overwrite"):
        _run([inp], out)
    res = _run([inp], out, overwrite=True)
    table = pq.read_table(out).sort_by("key")
    assert res.record.status == "complete" and table.column("caption").to_pylist()[3] == "A HEN"


def test_resume_accepts_the_same_bytes_copied_back(server, tmp_path):
    inp = _csv(tmp_path / "in.csv", server, ["a dog", "a cat", "a cow", "a hen"])
    out = tmp_path / "out"
    _run([inp], out)
    (out / "_stats" / "00001.stats.json").unlink()
    shutil.copy(inp, tmp_path / "copy.csv")
    time.sleep(0.01)
    shutil.copy(tmp_path / "copy.csv", inp)  # new mtime and inode, same content
    res = _run([inp], out)
    assert res.resumed and res.parts_written == 1 and sorted(_keys(out)) == sorted(set(_keys(out)))


def test_parquet_input_with_changed_values_is_refused(server, tmp_path):
    urls = [server.url(f"p{i}.jpg") for i in range(4)]
    pq.write_table(pa.table({"url": urls, "caption": ["a", "b", "c", "d"]}), tmp_path / "in.parquet")
    out = tmp_path / "out"
    _run([tmp_path / "in.parquet"], out)
    pq.write_table(pa.table({"url": urls, "caption": ["a", "b", "c", "e"]}), tmp_path / "in.parquet")
    with pytest.raises(OutputError, match=r"in\.parquet \(content changed\)"):
        _run([tmp_path / "in.parquet"], out)


# --- item 3: one writer per output ------------------------------------------------------------------------


def test_a_live_lease_refuses_a_second_run_and_names_the_holder(server, tmp_path):
    inp = _csv(tmp_path / "in.csv", server, ["a dog", "a cat"])
    out = tmp_path / "out"
    holder = OutputLease(locate(str(out))).acquire()  # this process: alive, on this host
    try:
        before = sorted(p.name for p in (out / "_capfilt").iterdir())
        for overwrite in (False, True):
            with pytest.raises(LeaseHeld, match=rf"being written by another capfilt run: .*pid {os.getpid()}"):
                _run([inp], out, overwrite=overwrite)
        assert sorted(p.name for p in (out / "_capfilt").iterdir()) == before == ["lease.json"]
    finally:
        holder.release()
    assert _run([inp], out).record.status == "complete"
    assert not (out / "_capfilt" / "lease.json").exists()  # released at the end


def test_a_lease_left_by_a_dead_process_or_a_stale_heartbeat_is_taken_over(server, tmp_path):
    inp = _csv(tmp_path / "in.csv", server, ["a dog", "a cat"])
    out = tmp_path / "out"
    (out / "_capfilt").mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lease = out / "_capfilt" / "lease.json"
    now = time.time()
    lease.write_text(json.dumps({"token": "x", "host": os.uname().nodename, "pid": int(dead.stdout),
                                 "started_at": now, "heartbeat_at": now}))
    assert _run([inp], out).record.status == "complete"
    lease.write_text(json.dumps({"token": "y", "host": "another-host", "pid": 1, "started_at": now - 900,
                                 "heartbeat_at": now - 600}))
    assert _run([inp], out).record.status == "complete"
    lease.write_text(json.dumps({"token": "z", "host": "another-host", "pid": 1, "started_at": now,
                                 "heartbeat_at": time.time()}))
    with pytest.raises(LeaseHeld, match="another-host pid 1"):
        _run([inp], out)


def test_two_concurrent_capfilt_runs_on_one_output(tmp_path):
    n = 60
    with photo_server(PHOTOS, delay=0.1) as srv:
        pq.write_table(pa.table({"url": [srv.url(f"img/{i}.jpg") for i in range(n)],
                                 "caption": [f"c {i}" for i in range(n)]}), tmp_path / "in.parquet")
        out = tmp_path / "out"
        cmd = [sys.executable, "-m", "capfilt.cli", "run", "--input", str(tmp_path / "in.parquet"), "--output",
               str(out), "--pipeline", "download", "--allow-private-network", "--rows-per-shard", "10",
               "--executor", "local", "--no-progress"]
        first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not (out / "_capfilt" / "run.json").exists() and time.time() < deadline:
            time.sleep(0.1)
        second = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first run ended before the second started; make it slower"
        assert second.returncode == 2
        assert f"pid {first.pid}" in second.stderr and "being written by another capfilt run" in second.stderr
        assert "Traceback" not in second.stderr
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == n
    assert json.loads((out / "_capfilt" / "run.json").read_text())["status"] == "complete"


# --- item 5: part identity independent of block boundaries ------------------------------------------------


def _write_block(out: Path, rows: range, shard: int, schema: pa.Schema) -> None:
    """What a ShardWriter does with one block: rows ``rows`` of shard ``shard``."""
    t = pa.table({"key": [f"0:{shard * 10 + r}" for r in rows], "url": [f"http://h/{r}" for r in rows],
                  "status": ["failed_to_download"] * len(rows), "error_message": ["x"] * len(rows),
                  "_shard": pa.array([shard] * len(rows), pa.int64()), "_offset": pa.array(list(rows), pa.int64())})
    ShardWriter(str(out), schema, "run1", stats_from=known_stages())(t)


def test_parts_of_a_block_reexecuted_under_another_split_are_reconciled(tmp_path):
    out = tmp_path / "out"
    schema = output_schema([], [])
    _write_block(out, range(0, 4), 0, schema)     # first execution: rows 0-3 and 4-9 of shard 0
    _write_block(out, range(4, 10), 0, schema)
    _write_block(out, range(0, 7), 0, schema)     # re-execution: 0-6 (overwrites 00000), then 7-9
    _write_block(out, range(7, 10), 0, schema)
    _write_block(out, range(2, 10), 1, schema)    # shard 1: a stale 2-9 and a partial overlap 0-5
    _write_block(out, range(0, 6), 1, schema)
    loc = locate(str(out))
    assert len(_keys(out)) > len(set(_keys(out)))
    notes = reconcile_parts(loc, "run1", known_stages())
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == 20
    # largest first: 00000 (0-6) kept, 00000-000004 (4-9) rewritten to 7-9, 00000-000007 (7-9) deleted;
    # 00001-000002 (2-9) kept, 00001 (0-5) rewritten to 0-1
    assert [" ".join(n.split()[:3]).rstrip(":") for n in notes] == ["rewrote part 00000-000004", "deleted part 00000-000007",
                                                "rewrote part 00001"]
    parts = {p.name: p for p in scan_output(loc)[0]}
    assert sorted(parts) == ["00000", "00000-000004", "00001", "00001-000002"]
    assert [parts[n].stats["rows"] for n in sorted(parts)] == [7, 3, 2, 8]
    assert reconcile_parts(loc, "run1", known_stages()) == []  # idempotent
    assert sum(p.stats["rows"] for p in parts.values()) == 20
    for p in parts.values():  # stats agree with the files after the rewrite
        assert pq.read_metadata(p.parquet).num_rows == p.stats["rows"]


# --- item 5: refilter names its parts after the source's parts ------------------------------------------


def test_refilter_parts_keep_the_source_part_names_and_a_grown_source_is_refused(tmp_path):
    src = make_output(tmp_path / "src", rows=90, rows_per_shard=30, seed=5)
    (src / "_stats" / "00001.stats.json").rename(tmp_path / "later.stats.json")  # not committed yet
    opts = dict(inputs=[str(src)], pipeline="refilter", executor="local", progress=False,
                overrides=["select.itm_threshold=0.4"])
    out = tmp_path / "refiltered"
    first = run(RunOptions(output=str(out), **opts))
    assert sorted(p.name for p in scan_output(locate(str(out)))[0]) == ["00000", "00002"]
    assert first.totals["rows"] == 60
    (tmp_path / "later.stats.json").rename(src / "_stats" / "00001.stats.json")  # the source gained a part
    with pytest.raises(OutputError, match=r"00001 \(new\)"):
        run(RunOptions(output=str(out), **opts))
    again = run(RunOptions(output=str(out), overwrite=True, **opts))
    assert again.totals["rows"] == 90 and sorted(_keys(out)) == sorted(set(_keys(out)))
    for name in ("00000", "00001", "00002"):  # each part holds the rows of the source part of its name
        src_keys = pq.read_table(src / f"{name}.parquet", columns=["key"]).column("key").to_pylist()
        assert pq.read_table(out / f"{name}.parquet", columns=["key"]).column("key").to_pylist() == src_keys


# --- item 10: a full disk ends like every capfilt error -------------------------------------------------


@pytest.fixture()
def tiny_disk(tmp_path):
    """A 600 KiB tmpfs mounted for the test (needs root or CAP_SYS_ADMIN, as in CI's container)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); the full-disk test needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_ends_with_one_paragraph_exit_2_and_a_failed_record(tiny_disk, tmp_path):
    n = 40  # 40 photos of ~100-160 KB after resize: far more than 600 KiB
    with photo_server(PHOTOS) as srv:
        pq.write_table(pa.table({"url": [srv.url(f"img/{i}.jpg") for i in range(n)],
                                 "caption": [f"c {i}" for i in range(n)]}), tmp_path / "in.parquet")
        out = tiny_disk / "out"
        r = subprocess.run([sys.executable, "-m", "capfilt.cli", "run", "--input", str(tmp_path / "in.parquet"),
                            "--output", str(out), "--pipeline", "download", "--allow-private-network",
                            "--rows-per-shard", "4", "--executor", "local", "--no-progress"],
                           capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "disk is full" in r.stderr and "rerun the same command" in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 6, r.stderr
    record = json.loads((out / "_capfilt" / "run.json").read_text())
    assert record["status"] == "failed" and "disk is full" in record["attempts"][-1]["error"]
    assert not (out / "_capfilt" / "lease.json").exists()
