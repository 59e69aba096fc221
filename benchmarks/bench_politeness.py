"""Per-host politeness: does the cap hold, and what does it cost in throughput? (issue 11 item 4)

A local server (``tests/helpers/hostserver.CountingServer``) answers every request after
``--delay`` seconds (a stand-in for network latency) with a 64x48 JPEG and counts the requests in
flight per ``Host``. Many host names reach it through the fetcher's resolver hook (``*.test`` ->
127.0.0.1). The download stage (``DownloadStage``, ``--threads`` threads, robots.txt on) downloads
``--rows`` URLs in these shapes:

- ``many hosts``: the rows spread over ``--hosts`` host names, cap 8 vs no cap (should be equal:
  the cap must not cost throughput when a shard has many hosts);
- ``one host``: every row from one host, cap 8 vs no cap (the cap at work: at most 8 in flight);
- ``big + many``: half the rows from one host (first in the shard), the rest spread over
  ``--hosts`` names, cap 8, with the stage's host-aware scheduler vs a plain thread pool whose
  threads block in the fetcher's limiter (what the cap would cost without the scheduler);
- ``4 hosts, sorted``: the rows of 4 hosts one host after the other (a shard sorted by domain),
  cap 8, both schedulers: a plain pool parks its threads behind the first host.

Prints one table row per case: seconds, rows/s, most requests in flight at once (one host / all).

``python benchmarks/bench_politeness.py [--rows 2000 --hosts 100 --threads 64 --delay 0.05]``
(``--tiny``: 200 rows, 20 hosts, to check that it runs.)
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
from PIL import Image  # noqa: E402

from capfilt.config import DownloadConfig  # noqa: E402
from capfilt.io import hosts  # noqa: E402
from capfilt.io.robots import ROBOTS  # noqa: E402
from capfilt.stages.download import DownloadStage  # noqa: E402
from tests.helpers.hostserver import CountingServer, loopback_resolver  # noqa: E402


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (30, 120, 200)).save(buf, "JPEG")
    return buf.getvalue()


def _case(urls: list[str], cap: int | None, threads: int, delay: float, scheduler: bool) -> dict:
    """Download ``urls`` once; returns seconds, rows/s and the server's peak in-flight counts."""
    ROBOTS.clear()
    hosts.LIMITER.clear()
    cfg = DownloadConfig(allow_private_network=True, image_size=64, min_image_size=0, timeout=30.0,
                         thread_count=threads, per_host_concurrency=cap)
    stage = DownloadStage(cfg)
    stage.setup()
    with CountingServer(_jpeg(), delay=delay) as srv:
        urls = [u.replace("PORT", str(srv.port)) for u in urls]
        t0 = time.perf_counter()
        if scheduler:
            out = stage(pa.table({"url": urls}))
            ok = out.column("status").to_pylist().count("success")
        else:  # a plain pool: threads take rows in order and block in the fetcher's per-host limiter
            with ThreadPoolExecutor(threads) as pool:
                ok = sum(r.status == "success" for r in pool.map(stage.process_url, urls))
        seconds = time.perf_counter() - t0
    assert ok == len(urls), f"{len(urls) - ok} rows failed"
    return {"s": seconds, "rows_s": len(urls) / seconds, "peak_host": max(srv.peak.values()), "peak_all": srv.peak_total}


def main() -> None:
    """Run the cases and print a Markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--hosts", type=int, default=100)
    ap.add_argument("--threads", type=int, default=64)
    ap.add_argument("--delay", type=float, default=0.05, help="server seconds per request (latency)")
    ap.add_argument("--tiny", action="store_true", help="200 rows, 20 hosts: check that it runs")
    a = ap.parse_args()
    if a.tiny:
        a.rows, a.hosts = 200, 20
    n, h = a.rows, a.hosts
    many = [f"http://h{i % h}.test:PORT/{i}.jpg" for i in range(n)]
    one = [f"http://cdn.test:PORT/{i}.jpg" for i in range(n)]
    mixed = [f"http://cdn.test:PORT/{i}.jpg" for i in range(n // 2)] + [
        f"http://h{i % h}.test:PORT/{i}.jpg" for i in range(n - n // 2)]
    sorted4 = [f"http://d{i * 4 // n}.test:PORT/{i}.jpg" for i in range(n)]
    cases = [
        ("many hosts", many, None, True), ("many hosts", many, 8, True),
        ("one host", one, None, True), ("one host", one, 8, True),
        ("big + many", mixed, 8, False), ("big + many", mixed, 8, True),
        ("4 hosts, sorted", sorted4, 8, False), ("4 hosts, sorted", sorted4, 8, True),
    ]
    print(f"{n} rows, {h} hosts, {a.threads} threads, {a.delay * 1000:.0f} ms per request\n")
    print("| shard | cap | scheduling | s | rows/s | peak in flight, one host | peak in flight, all |")
    print("|---|---|---|---|---|---|---|")
    with hosts.DNS.use_resolver(loopback_resolver):
        _case(many[:50], 8, a.threads, 0.0, True)  # warm-up: imports, first connections
        for name, urls, cap, sched in cases:
            r = _case(urls, cap, a.threads, a.delay, sched)
            print(f"| {name} | {cap or 'none'} | {'host-aware' if sched else 'plain pool'} | {r['s']:.2f} | "
                  f"{r['rows_s']:.0f} | {r['peak_host']} | {r['peak_all']} |", flush=True)


if __name__ == "__main__":
    main()
