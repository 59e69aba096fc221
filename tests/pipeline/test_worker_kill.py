"""Fault tolerance: Ray worker processes SIGKILLed by PID in the middle of their work.

While a real run is going (real Ray, tiny models, photos from a slow 127.0.0.1 server), a watcher
thread finds, among this process's descendants, the captioner actor while it is processing a
block (its process title reads ``ray::MapWorker(MapBatches(CaptionScoreActor)).submit``) and a download
task worker while it runs (``ray::MapBatches(download)``), and kills each with SIGKILL. Ray
restarts the actor and retries both lost calls (Ray Data's defaults: ``max_restarts=-1``,
``max_task_retries=-1``, ``max_retries=-1``); the output must still hold every row exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from capfilt.api import RunOptions, run
from tests.helpers.httpserver import ImageServer, photo_server

PHOTOS = sorted((Path(__file__).resolve().parents[1] / "fixtures" / "coco" / "images").glob("*.jpg"))[:8]
ROWS, PER_SHARD = 48, 4
BLOCK = 2  # rows per streaming block: a shard arrives at the writer in two blocks (issue 15)
CAPTION_BUSY = "ray::MapWorker(MapBatches(CaptionScoreActor)).submit"  # the fused default
CAPTION_ANY = "ray::MapWorker(MapBatches(CaptionScoreActor))"
DOWNLOAD_BUSY = "ray::MapBatches(download)"
DEDUP_BUSY = "ray::MapWorker(MapBatches(DedupActor)).submit"
WRITE_BUSY = "MapBatches(write)"  # a task, possibly fused after select: ray::MapBatches(select)->MapBatches(write)


class Killer(threading.Thread):
    """Kill, by PID, the first busy process seen of each target (``{name: process-title prefix}``;
    a prefix without ``ray::`` matches anywhere in the title)."""

    def __init__(self, targets: dict[str, str] | None = None):
        super().__init__(daemon=True)
        self.targets = targets or {"caption": CAPTION_BUSY, "download": DOWNLOAD_BUSY}
        self.stop = threading.Event()
        self.killed: dict[str, tuple[int, float]] = {}  # what -> (pid, time)
        self.caption_pids_before_kill: set[int] = set()
        self.caption_pids_after_kill: set[int] = set()  # captioner processes first seen after the kill

    def _titles(self):
        for p in psutil.Process(os.getpid()).children(recursive=True):
            try:
                yield p, " ".join(p.cmdline())
            except psutil.Error:
                continue

    def run(self) -> None:
        while not self.stop.is_set():
            for p, title in self._titles():
                if title.startswith(CAPTION_ANY):
                    if "caption" not in self.killed:
                        self.caption_pids_before_kill.add(p.pid)
                    elif p.pid not in self.caption_pids_before_kill:
                        self.caption_pids_after_kill.add(p.pid)
                for what, prefix in self.targets.items():
                    hit = title.startswith(prefix) if prefix.startswith("ray::") else (
                        title.startswith("ray::") and prefix in title)
                    if what not in self.killed and hit:
                        os.kill(p.pid, signal.SIGKILL)
                        self.killed[what] = (p.pid, time.time())
            time.sleep(0.02)


def _slow_server(delay: float) -> ImageServer:
    return photo_server(PHOTOS, delay)


@pytest.mark.slow
def test_killed_actor_and_task_workers_are_retried_without_loss_or_duplicates(tmp_path):
    killer = Killer()
    with _slow_server(0.3) as srv:
        rows = [{"url": srv.url(f"photo{i}.jpg"), "caption": f"web caption {i}"} for i in range(ROWS)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
        killer.start()
        try:
            result = run(RunOptions(inputs=[str(tmp_path / "in.parquet")], output=str(tmp_path / "out"),
                                    models="tiny", progress=False, executor="ray",
                                    overrides=["download.allow_private_network=true", "download.image_size=64",
                                               f"output.rows_per_shard={PER_SHARD}", f"output.block_rows={BLOCK}",
                                               "download.thread_count=2", "caption.num_captions=2"]))
        finally:
            killer.stop.set()
            killer.join()

    # both kills happened, mid-call, and the actor came back in a new process
    assert set(killer.killed) == {"caption", "download"}, killer.killed
    for pid, _ in killer.killed.values():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert killer.caption_pids_after_kill, "no new captioner actor process was seen after the kill"

    # every row exactly once, all complete
    files = sorted(str(p) for p in (tmp_path / "out").glob("*.parquet"))
    t = ds.dataset(files, format="parquet").to_table(columns=["key", "status", "synthetic_captions", "web_itm"])
    keys = t.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == ROWS == result.totals["rows"]
    assert sorted(keys) == [f"0000_{i:09d}" for i in range(ROWS)]
    for r in t.to_pylist():
        assert r["status"] == "success" and len(r["synthetic_captions"]) == 2 and 0 <= r["web_itm"] <= 1, r
    assert len(files) == ROWS // PER_SHARD
    record = json.loads((tmp_path / "out" / "_capfilt" / "run.json").read_text())
    assert record["status"] == "complete" and record["totals"]["images_captioned"] == ROWS
    assert not list((tmp_path / "out" / "_capfilt").glob("tmp/*.parquet"))


def test_killed_dedup_caption_and_write_workers_keep_every_key_once_and_no_self_duplicates(tmp_path):
    """Issue 10: kill a Ray worker inside dedup, caption and write; the run and a rerun of the same
    command give every key once, one kept copy per distinct image, no row a duplicate of itself."""
    killer = Killer({"dedup": DEDUP_BUSY, "caption": CAPTION_BUSY, "write": WRITE_BUSY})
    with _slow_server(0.3) as srv:
        rows = [{"url": srv.url(f"photo{i}.jpg"), "caption": f"web caption {i}"} for i in range(ROWS)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
        opts = RunOptions(inputs=[str(tmp_path / "in.parquet")], output=str(tmp_path / "out"), models="tiny",
                          progress=False, executor="ray",
                          overrides=["download.allow_private_network=true", "download.image_size=64",
                                     f"output.rows_per_shard={PER_SHARD}", f"output.block_rows={BLOCK}",
                                     "download.thread_count=2",
                                     "caption.num_captions=1", "dedup.enabled=true"])
        killer.start()
        try:
            result = run(opts)
        finally:
            killer.stop.set()
            killer.join()
        again = run(opts)  # the same command after the faults: nothing to redo, nothing duplicated

    assert set(killer.killed) == {"dedup", "caption", "write"}, killer.killed
    assert again.parts_written == 0 and again.record.status == "complete"
    files = sorted(str(p) for p in (tmp_path / "out").glob("*.parquet"))
    assert len(files) == ROWS // PER_SHARD  # streamed blocks were committed as whole shards
    t = ds.dataset(files, format="parquet").to_table(columns=["key", "status", "error_message", "sha256"])
    keys = t.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == ROWS == result.totals["rows"]
    by_sha: dict[str, list[dict]] = {}
    for r in t.to_pylist():
        by_sha.setdefault(r["sha256"], []).append(r)
        if r["status"] == "duplicate":
            assert r["key"] not in r["error_message"], r  # never a duplicate of itself
    assert 2 <= len(by_sha) <= len(PHOTOS)
    for copies in by_sha.values():  # exactly one kept copy per distinct image, the others point at it
        kept = [r for r in copies if r["status"] == "success"]
        assert len(kept) == 1, copies
        assert all(r["error_message"] == f"same image as row {kept[0]['key']} (sha256)"
                   for r in copies if r is not kept[0])
