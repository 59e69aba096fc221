"""``capfilt run ... --retry-failed``: a server that fails 30 % of requests transiently on their first
attempt (503 or a connection reset); the retry fetches exactly those rows again, they all succeed in
place (same keys, same parts, same positions), permanent failures are left alone, and a kill during
the retry leaves an output that the same command completes."""

from __future__ import annotations

import html
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from capfilt.api import RunOptions, run
from capfilt.config import ConfigError
from capfilt.report.build import build_report
from capfilt.report.inspect import inspect_output
from capfilt.summary import print_summary
from tests.helpers.httpserver import ImageServer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PHOTOS = sorted((FIXTURES / "coco" / "images").glob("*.jpg"))
CHECK = Path(__file__).resolve().parents[1] / "tools" / "check_output.py"


def flaky(i: int) -> str | None:
    """How row ``i``'s first request fails: ``503``, ``reset`` (30 % of rows), ``404`` (always), or None."""
    return {0: "503", 1: "reset", 2: "503"}.get(i % 10) or ("404" if i % 10 == 5 else None)


class FlakyServer(ImageServer):
    """``/img/<i>.jpg``: a COCO photo, except that a ``flaky`` row fails on its first request (503 or a TCP
    reset) and a ``404`` row always answers 404. ``delay``: seconds before answering a row's second and
    later requests (to make a retry slow enough to interrupt)."""

    def __init__(self, delay: float = 0.0):
        self.counts: Counter[int] = Counter()
        self.lock = threading.Lock()
        self.delay = delay
        super().__init__(fallback=self._answer)

    def _answer(self, req, path):
        i = int(path.rsplit("/", 1)[-1].split(".")[0])
        with self.lock:
            self.counts[i] += 1
            n = self.counts[i]
        kind = flaky(i)
        if kind == "404" or (n == 1 and kind == "503"):
            req.send_response(404 if kind == "404" else 503)
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        if n == 1 and kind == "reset":
            req.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            req.connection.close()
            req.close_connection = True
            return
        if n > 1 and self.delay:
            time.sleep(self.delay)
        body = PHOTOS[i % len(PHOTOS)].read_bytes()
        req.send_response(200)
        req.send_header("Content-Type", "image/jpeg")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)


def _input(tmp: Path, srv: ImageServer, n: int) -> Path:
    path = tmp / "in.parquet"
    pq.write_table(pa.table({"url": [srv.url(f"img/{i}.jpg") for i in range(n)],
                             "caption": [f"caption {i}" for i in range(n)]}), path)
    return path


def _parts(out: Path) -> dict[str, pa.Table]:
    return {p.name: pq.read_table(p) for p in sorted(out.glob("*.parquet"))}


def _check_output(out: Path, inp: Path) -> None:
    r = subprocess.run([sys.executable, str(CHECK), str(out), "--input", str(inp)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _opts(inp: Path, out: Path, **kw) -> RunOptions:
    return RunOptions(inputs=[str(inp)], output=str(out), pipeline="download", executor="local", progress=False,
                      overrides={"download.allow_private_network": True, "download.thread_count": 4,
                                 "download.timeout": 5.0, "output.rows_per_shard": 20}, **kw)


def test_retry_failed_fetches_the_transient_rows_again_in_place(tmp_path):
    n = 60
    with FlakyServer() as srv:
        inp = _input(tmp_path, srv, n)
        out = tmp_path / "out"
        first = run(_opts(inp, out))
        before = _parts(out)
        rows = [r for t in before.values() for r in t.to_pylist()]
        by_key = {r["key"]: r for r in rows}
        transient = {f"0000_{i:09d}" for i in range(n) if flaky(i) in ("503", "reset")}
        assert {k for k, r in by_key.items() if r["error_class"] in ("http_5xx", "connect")} == transient
        assert len(transient) == 18 and first.totals["error_class"] == {"http_5xx": 12, "connect": 6, "http_4xx": 6}
        hits_before = dict(srv.counts)

        second = run(_opts(inp, out, retry_failed=[]))
        after = _parts(out)
        # same parts, same keys in the same order, no duplicates
        assert list(after) == list(before)
        for name in before:
            assert after[name].column("key").to_pylist() == before[name].column("key").to_pylist()
            assert after[name].schema == before[name].schema
        keys = [k for t in after.values() for k in t.column("key").to_pylist()]
        assert len(keys) == n == len(set(keys))
        new = {r["key"]: r for t in after.values() for r in t.to_pylist()}
        for k, r in new.items():
            i = int(k.split("_")[1])
            if k in transient:  # fetched again, now a real image
                assert r["status"] == "success" and r["error_class"] is None and r["error_message"] is None
                assert r["image"] and r["sha256"] and r["width"]
                assert srv.counts[i] == 2
            else:  # untouched: permanent failures are not fetched again, successes not either
                assert r == by_key[k]
                assert srv.counts[i] == hits_before[i] == 1
        assert second.totals["status"] == {"success": 54, "failed_to_download": 6}
        assert second.totals["error_class"] == {"http_4xx": 6}
        _check_output(out, inp)
        record = json.loads((out / "_capfilt" / "run.json").read_text())
        (entry,) = record["retries"]
        assert entry["rows"] == 18 and entry["before"] == {"connect": 6, "http_5xx": 12}
        assert entry["after"] == {"success": 18} and entry["succeeded"] == 18 and entry["still_failed"] == 0
        assert entry["parts_rewritten"] == 3 and entry["wanted"] == ["connect", "dns", "http_429", "http_5xx", "timeout"]
        assert record["status"] == "complete" and record["totals"]["status"]["success"] == 54
        assert not any((out / "_capfilt" / "retry").iterdir())
        con = Console(record=True, width=200)
        print_summary(second, con)
        text = con.export_text()
        assert "retried (--retry-failed)" in text and "18 rows: 18 succeeded, 0 not" in text
        # the report and inspect show the retry, before and after
        line = "retry 1: 18 rows (connect 6, http_5xx 12) -> success 18; 3 parts rewritten"
        rep = build_report(out)
        assert json.loads(Path(rep["files"]["json"]).read_text())["failures"]["retries"] == [entry]
        assert f"<li>{html.escape(line)}</li>" in Path(rep["files"]["html"]).read_text()
        con = Console(record=True, width=200)
        inspect_output(out, console=con)
        assert line in con.export_text()

        # a second retry finds nothing transient; asking for http_4xx fetches the 404s again (still 404)
        third = run(_opts(inp, out, retry_failed=["http_4xx"]))
        assert third.totals["error_class"] == {"http_4xx": 6}
        assert all(srv.counts[i] == 2 for i in range(n) if flaky(i) == "404")
        record = json.loads((out / "_capfilt" / "run.json").read_text())
        assert record["retries"][-1]["before"] == {"http_4xx": 6} and record["retries"][-1]["after"] == {"http_4xx": 6}
        assert len(record["retries"]) == 2


def test_retry_failed_names_are_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="'nonsense' is not a failure class or status"):
        run(RunOptions(inputs=[str(FIXTURES / "meta/test_1000.parquet")], output=str(tmp_path / "o"),
                       pipeline="download", executor="local", retry_failed=["dns,nonsense"]))
    assert not (tmp_path / "o").exists()


def _cmd(inp: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "capfilt.cli", "run", "--input", str(inp), "--output", str(out),
            "--pipeline", "download", "--allow-private-network", "--rows-per-shard", "5", "--executor", "local",
            "--set", "download.thread_count=1", "--no-progress", *extra]


@pytest.mark.slow
def test_kill_during_retry_then_the_same_command_completes(tmp_path):
    n = 100
    with FlakyServer(delay=0.4) as srv:  # 30 retried rows at 0.4 s each, one thread: ~12 s of retry
        inp = _input(tmp_path, srv, n)
        out = tmp_path / "out"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        r = subprocess.run(_cmd(inp, out), capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        before = _parts(out)
        staged = out / "_capfilt" / "retry"
        proc = subprocess.Popen(_cmd(inp, out, "--retry-failed"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and len(list(staged.glob("*.json"))) < 2:
            time.sleep(0.05)
        assert proc.poll() is None, "the retry finished before it could be killed; make it slower"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        # killed mid-retry: the committed parts are whole, every key once
        mid = _parts(out)
        keys = [k for t in mid.values() for k in t.column("key").to_pylist()]
        assert list(mid) == list(before) and len(keys) == n == len(set(keys))
        r = subprocess.run(_cmd(inp, out, "--retry-failed"), capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    after = _parts(out)
    assert list(after) == list(before)
    for name in before:
        assert after[name].column("key").to_pylist() == before[name].column("key").to_pylist()
    status = Counter(s for t in after.values() for s in t.column("status").to_pylist())
    assert status == {"success": 90, "failed_to_download": 10}
    _check_output(out, inp)
    record = json.loads((out / "_capfilt" / "run.json").read_text())
    assert record["status"] == "complete" and record["retries"][-1]["still_failed"] == 0
    assert not list(staged.iterdir())


@pytest.mark.slow
def test_retry_on_ray_runs_the_model_stages_on_the_retried_rows_only(tmp_path):
    n = 20
    with FlakyServer() as srv:
        inp = _input(tmp_path, srv, n)
        out = tmp_path / "out"
        opts = dict(inputs=[str(inp)], output=str(out), pipeline="blip", models="tiny", executor="ray",
                    progress=False, overrides={"download.allow_private_network": True, "output.rows_per_shard": 10,
                                               "caption.num_captions": 2})
        run(RunOptions(**opts))
        before = {r["key"]: r for t in _parts(out).values() for r in t.to_pylist()}
        transient = {k for k, r in before.items() if r["error_class"] in ("http_5xx", "connect")}
        assert len(transient) == 6 and all(before[k]["synthetic_captions"] is None for k in transient)
        result = run(RunOptions(**opts, retry_failed=["transient"]))
    after = {r["key"]: r for t in _parts(out).values() for r in t.to_pylist()}
    assert list(after) == list(before) and len(after) == n
    for k, r in after.items():
        if k in transient:  # downloaded, captioned, scored and selected now
            assert r["status"] == "success" and len(r["synthetic_captions"]) == 2
            assert len(r["synthetic_itm"]) == 2 and r["web_itm"] is not None and r["captions"] is not None
        else:
            assert r == before[k]
    assert result.totals["status"] == {"failed_to_download": 2, "success": 18}
    _check_output(out, inp)
