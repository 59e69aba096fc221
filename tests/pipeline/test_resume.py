"""Crash and Ctrl-C safety: kill ``capfilt run`` mid-run, rerun the same command, get every row once.

Also: the 10,000 real LAION rows (with a null URL and a null caption added) through the whole
pipeline against a 127.0.0.1 host.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from capfilt.api import RunOptions, run
from tests.helpers.httpserver import ImageServer, photo_server

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PHOTOS = sorted((FIXTURES / "coco" / "images").glob("*.jpg"))


def _slow_image_server(delay: float) -> ImageServer:
    return photo_server(PHOTOS, delay)


def _committed(out: Path) -> dict[str, tuple[int, int]]:
    """Committed shard parts -> (inode, mtime_ns) of their parquet file."""
    stats = out / "_stats"
    if not stats.exists():
        return {}
    done = {}
    for s in stats.glob("*.stats.json"):
        p = out / (s.name[: -len(".stats.json")] + ".parquet")
        st = p.stat()
        done[p.name] = (st.st_ino, st.st_mtime_ns)
    return done


def _cmd(inp: Path, out: Path, executor: str) -> list[str]:
    return [sys.executable, "-m", "capfilt.cli", "run", "--input", str(inp), "--output", str(out),
            "--pipeline", "download", "--allow-private-network", "--rows-per-shard", "40",
            "--set", "download.thread_count=2", "--set", "output.block_rows=10", "--no-progress",
            "--executor", executor]


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["ray", "local"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_interrupted_run_resumes_without_duplicates_or_rewrites(tmp_path, sig, executor):
    n = 800  # 20 shards of 40 rows at 0.25 s per image: minutes of work left when the signal comes
    with _slow_image_server(delay=0.25) as srv:
        pq.write_table(pa.table({"url": [srv.url(f"img/{i}.jpg") for i in range(n)],
                                 "caption": [f"caption {i}" for i in range(n)]}), tmp_path / "in.parquet")
        out = tmp_path / "out"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # a test runner started in the background inherits SIGINT ignored: restore Ctrl-C for capfilt
        proc = subprocess.Popen(_cmd(tmp_path / "in.parquet", out, executor), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 240
        while len(_committed(out)) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, "run finished before it could be interrupted; make it slower"
        before = _committed(out)
        assert 2 <= len(before) < n // 40
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
        else:
            proc.send_signal(signal.SIGINT)  # Ctrl-C on the driver
        proc.wait(timeout=120)
        if sig == signal.SIGINT:
            assert proc.returncode == 130
            assert json.loads((out / "_capfilt" / "run.json").read_text())["status"] == "interrupted"
        time.sleep(1.0)
        interrupted = _committed(out)
        r = subprocess.run(_cmd(tmp_path / "in.parquet", out, executor), capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    after = _committed(out)
    for name, ident in interrupted.items():
        assert after[name] == ident, f"committed shard {name} was rewritten on resume"
    files = sorted(str(out / name) for name in after)
    keys = ds.dataset(files, format="parquet").to_table(columns=["key"]).column("key").to_pylist()
    assert len(keys) == n and len(set(keys)) == n
    assert set(keys) == {f"0000_{i:09d}" for i in range(n)}
    assert not list(out.glob("*.tmp")) and len(list(out.glob("*.parquet"))) == len(after)


def _rewrite_10k(dst: Path, base: str) -> pa.Table:
    t = pq.read_table(FIXTURES / "meta" / "test_10000.parquet")
    urls = []
    for u in t.column("URL").to_pylist():
        if "://" in u:
            rest = u.split("://", 1)[1]
            urls.append(base + (rest[rest.find("/"):] if "/" in rest else "/"))
        else:
            urls.append(u)  # 'UNLIKELY' stays what it is
    urls[0] = None  # a null URL
    texts = t.column("TEXT").to_pylist()
    texts[1] = None  # a null caption
    t = pa.table({"URL": urls, "TEXT": texts})
    pq.write_table(t, dst)
    return t


@pytest.mark.slow
def test_10000_real_laion_rows(tmp_path):
    def fallback(req, path):
        h = int(hashlib.md5(path.encode()).hexdigest(), 16)
        if h % 4 == 0:
            req.send_response(404)
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        body = PHOTOS[h % len(PHOTOS)].read_bytes()
        req.send_response(200)
        req.send_header("Content-Type", "image/jpeg")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    with ImageServer(fallback=fallback) as srv:
        _rewrite_10k(tmp_path / "in.parquet", srv.base)
        result = run(RunOptions(inputs=[str(tmp_path / "in.parquet")], output=str(tmp_path / "out"), models="tiny",
                                overrides=["download.allow_private_network=true", "output.rows_per_shard=2500",
                                           "download.thread_count=32", "download.image_size=64",
                                           "download.timeout=20"], progress=False))
    t = ds.dataset(sorted(str(p) for p in (tmp_path / "out").glob("*.parquet")), format="parquet").to_table(
        columns=["key", "url", "caption", "status", "error_message", "synthetic_captions", "web_itm"])
    assert t.num_rows == 10_000 == result.totals["rows"]
    keys = t.column("key").to_pylist()
    assert len(set(keys)) == 10_000
    status = Counter(t.column("status").to_pylist())
    assert sum(status.values()) == 10_000
    rows = {r["key"]: r for r in t.to_pylist()}
    assert rows["0000_000000000"]["status"] == "invalid_url"  # null URL
    assert rows["0000_000004674"]["status"] == "invalid_url"  # 'UNLIKELY'
    assert rows["0000_000000001"]["caption"] is None and rows["0000_000000001"]["web_itm"] is None
    long_caption = rows["0000_000005348"]  # 2,041-character product description
    assert len(long_caption["caption"]) == 2041
    if long_caption["status"] == "success":
        assert 0.0 <= long_caption["web_itm"] <= 1.0  # truncated to the text limit, scored
    assert all(r["error_message"] for r in rows.values() if r["status"] != "success")
    assert status["success"] > 6000 and status["failed_to_download"] > 2000
