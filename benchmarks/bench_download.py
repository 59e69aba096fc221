"""Download stage: ``capfilt run --pipeline download`` against the img2dataset CLI, side by side.

Both sides read the same Parquet (``url``, ``caption``; ``--rows`` rows) and fetch every URL from
the same local server: a threaded HTTP server on 127.0.0.1 in its own process
(``tests/helpers/httpserver.ImageServer``, listen backlog raised to 1024) that answers
``/img/N.jpg?i=N`` with COCO fixture photo ``N % 79`` (``tests/fixtures/coco/images``), after an
optional fixed ``--latency-ms`` per request. Every URL is distinct, so nothing is cached.

The sides run as subprocesses, A/B interleaved ``--reps`` times (the order alternates each rep),
each into a fresh folder under ``--workdir``. Per run: wall seconds (process start to exit, imports
and Ray start/stop included), rows/s over wall, steady-state rows/s, success count, and the peak
resident memory of the whole process tree (the side's process plus all its children, e.g. Ray's
GCS, raylet and workers or img2dataset's pool; RSS summed, sampled with psutil every 0.2 s; shared
pages count once per process, as ``ps`` shows them). Steady state is measured at the server, the
same way for both sides: rows served between the 10th and the 90th percentile request time,
divided by that span (no start-up, no ramp-up, no tail). ``commit rows/s`` is the shard-based view
(rows of the 2nd..last committed shard over first-to-last shard mtime); it needs 3+ shards, so it is
``-`` at 2,000 rows. Medians per side, ``os.getloadavg()`` before every run, and the ratio
(capfilt / img2dataset, rows/s; peak RSS the other way round) printed last.

Settings mapping (both sides get the same values):

================  ==============================================  ===================================
what              capfilt (``--set``)                             img2dataset CLI
================  ==============================================  ===================================
image size        ``download.image_size=S``                       ``--image_size S``
resize            ``download.resize_mode=keep_ratio``             ``--resize_mode keep_ratio``
encoding          ``download.encode_format=jpg``, ``..._quality``  ``--encode_format jpg --encode_quality Q``
threads           ``download.thread_count=T`` (per task)          ``--thread_count T`` (per process)
processes         ``resources.download.concurrency=P`` (at most    ``--processes_count P``
                  P download processes: worker processes in-
                  process, Ray workers under ``--executor ray``)
shard             ``--rows-per-shard 1000``                       ``--number_sample_per_shard 1000``
timeout, retries  ``download.timeout=10``, ``download.retries=0``  ``--timeout 10 --retries 0``
small images      ``download.min_image_size=0``                   ``--min_image_size 0`` (its default)
hash              sha256 (always)                                 ``--compute_hash sha256`` (default)
EXIF              not extracted                                   ``--extract_exif False``
================  ==============================================  ===================================

capfilt also checks ``X-Robots-Tag`` opt-outs (img2dataset only with
``--disallowed_header_directives``; the server sends none) and resolves and checks every host
address (``--allow-private-network`` lets 127.0.0.1 through). ``--capfilt-set KEY=VALUE`` adds
capfilt overrides after these (later wins), e.g. ``resources.download.num_cpus=0.25``,
``download.thread_count=32`` or ``resources.download.concurrency=null`` (capfilt's default: as
many tasks as ``num_cpus`` allows).

Commands (issue 15, targets 4 and 5; run on a quiet machine):

    PYTHONPATH=. python benchmarks/bench_download.py --rows 2000 --latency-ms 0 --reps 3
    PYTHONPATH=. python benchmarks/bench_download.py --rows 2000 --latency-ms 50 --reps 3
    PYTHONPATH=. python benchmarks/bench_download.py --rows 10000 --latency-ms 0 --reps 3
    PYTHONPATH=. python benchmarks/bench_download.py --rows 10000 --latency-ms 50 --reps 3
    PYTHONPATH=. python benchmarks/bench_download.py --memory-scan 1000,10000
    PYTHONPATH=. python benchmarks/bench_download.py --memory-scan 10000,100000
    # smoke test (shared machine): flock /tmp/capfilt-heavy.lock nice -n 19 \\
    #   env PYTHONPATH=. python benchmarks/bench_download.py --rows 200 --reps 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHOTOS = ROOT / "tests" / "fixtures" / "coco" / "images"
ENV = {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "NO_ALBUMENTATIONS_UPDATE": "1",
       "HF_HUB_OFFLINE": "1"}
SIDES = ("capfilt", "img2dataset")


# -- server (runs in its own process: its threads never share a GIL with the sampler or a side) --
def serve(latency_ms: float) -> None:
    """Serve ``/img/N.jpg`` (photo ``N % 79``) forever; print the port on stdout.

    ``/_times`` answers the request times (``time.time()`` seconds, float) of the ``/img/``
    requests since the last ``/_reset``, as a JSON list; ``/_reset`` clears them.
    """
    from tests.helpers.httpserver import ImageServer

    photos = sorted(PHOTOS.glob("*.jpg"))
    bodies = [p.read_bytes() for p in photos]
    times: list[float] = []
    lock = threading.Lock()

    def send(req, body: bytes, ctype: str) -> None:
        """Answer ``req`` with 200 and ``body`` (bytes) of content type ``ctype``."""
        req.send_response(200)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    def fallback(req, path: str) -> None:
        """Serve ``/_times`` (request start times, JSON), ``/_reset`` and ``/img/N.jpg`` (photo ``N % 79``,
        after the configured latency); anything else is 404."""
        if path == "/_times":
            with lock:
                body = json.dumps(times).encode()
            return send(req, body, "application/json")
        if path == "/_reset":
            with lock:
                times.clear()
            return send(req, b"ok", "text/plain")
        if not path.startswith("/img/"):
            req.send_response(404)
            req.send_header("Content-Length", "0")
            return req.end_headers()
        if latency_ms:
            time.sleep(latency_ms / 1000)
        n = int(path[len("/img/"):].split(".")[0])
        send(req, bodies[n % len(bodies)], "image/jpeg")
        with lock:
            times.append(time.time())

    srv = ImageServer(fallback=fallback)
    srv.httpd.socket.listen(1024)  # http.server's backlog of 5 drops SYNs under 100+ parallel connects
    srv.start()
    print(srv.port, flush=True)
    while True:
        time.sleep(3600)


class Server:
    """The server process: ``with Server(latency_ms) as s: s.base, s.reset(), s.times()``."""

    def __init__(self, latency_ms: float):
        self.latency_ms = latency_ms

    def __enter__(self) -> "Server":
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", "--latency-ms", str(self.latency_ms)],
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, **ENV})
        self.base = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    def _get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.base + path, timeout=30) as r:
            return r.read()

    def reset(self) -> None:
        """Forget the request times recorded so far."""
        self._get("/_reset")

    def times(self) -> list[float]:
        """Sorted ``time.time()`` of each image request served since :meth:`reset`."""
        return sorted(json.loads(self._get("/_times")))


# -- input and measuring ---------------------------------------------------------------------
def write_input(path: Path, rows: int, base: str) -> None:
    """``rows`` rows of ``url`` (distinct, on ``base``) and ``caption`` as one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"url": [f"{base}/img/{i}.jpg?i={i}" for i in range(rows)],
                             "caption": [f"photo number {i}" for i in range(rows)]}), path)


def tree_rss(proc) -> int:
    """Resident bytes of ``proc`` (a :class:`psutil.Process`) plus all its descendants, summed."""
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # exited between listing and reading: it holds no memory now
            pass
    return total


def run_measured(cmd: list[str], log: Path) -> tuple[float, int, int]:
    """Run ``cmd`` (stdout+stderr to ``log``); ``(wall seconds, exit code, peak tree RSS bytes)``."""
    import psutil

    with open(log, "w") as fh:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **ENV}, cwd=ROOT)
        ps = psutil.Process(p.pid)
        peak = 0
        while p.poll() is None:
            peak = max(peak, tree_rss(ps))
            time.sleep(0.2)
        wall = time.perf_counter() - t0
    return wall, p.returncode, peak


def count_success(out: Path) -> tuple[int, int, list[float]]:
    """``(rows, successes, shard mtimes)`` over the top-level ``*.parquet`` files of ``out``."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rows = ok = 0
    mtimes = []
    for f in sorted(out.glob("*.parquet")):
        status = pq.read_table(f, columns=["status"]).column("status")
        rows += len(status)
        ok += pc.sum(pc.equal(status, "success")).as_py() or 0
        mtimes.append(f.stat().st_mtime)
    return rows, ok, sorted(mtimes)


def steady(times: list[float]) -> float | None:
    """Rows/s between the 10th and 90th percentile request times (``None`` under 10 requests)."""
    if len(times) < 10:
        return None
    lo, hi = int(0.1 * (len(times) - 1)), int(0.9 * (len(times) - 1))
    span = times[hi] - times[lo]
    return (hi - lo) / span if span > 0 else None


def commit_rate(mtimes: list[float], rows_per_shard: int) -> float | None:
    """Rows/s of the 2nd..last committed shard over first-to-last shard mtime (``None`` under 3 shards)."""
    if len(mtimes) < 3 or mtimes[-1] <= mtimes[0]:
        return None
    return (len(mtimes) - 1) * rows_per_shard / (mtimes[-1] - mtimes[0])


def commands(side: str, inp: Path, out: Path, a: argparse.Namespace) -> list[str]:
    """The command line of ``side`` with the settings of the mapping table in the module docstring."""
    if side == "capfilt":
        sets = [f"download.image_size={a.image_size}", "download.resize_mode=keep_ratio",
                "download.encode_format=jpg", f"download.encode_quality={a.quality}",
                f"download.thread_count={a.threads}", f"resources.download.concurrency={a.processes}",
                "download.timeout=10", "download.retries=0", "download.min_image_size=0"] + a.capfilt_set
        cmd = [sys.executable, "-m", "capfilt.cli", "run", "--pipeline", "download", "--input", str(inp),
               "--output", str(out), "--allow-private-network", "--no-progress",
               "--rows-per-shard", str(a.rows_per_shard), "--executor", a.capfilt_executor]
        for s in sets:
            cmd += ["--set", s]
        return cmd
    exe = shutil.which("img2dataset") or "img2dataset"
    return [exe, "--url_list", str(inp), "--input_format", "parquet", "--url_col", "url",
            "--caption_col", "caption", "--output_format", "parquet", "--output_folder", str(out),
            "--processes_count", str(a.processes), "--thread_count", str(a.threads),
            "--image_size", str(a.image_size), "--resize_mode", "keep_ratio", "--encode_format", "jpg",
            "--encode_quality", str(a.quality), "--number_sample_per_shard", str(a.rows_per_shard),
            "--timeout", "10", "--retries", "0", "--min_image_size", "0", "--extract_exif", "False",
            "--enable_wandb", "False", "--distributor", "multiprocessing"]


def one_run(side: str, server: Server, inp: Path, rows: int, a: argparse.Namespace) -> dict:
    """Run ``side`` once into a fresh folder; return its measurements (and remove the folder)."""
    work = Path(tempfile.mkdtemp(prefix=f"bench-dl-{side}-", dir=a.workdir))
    out = work / "out"
    load = os.getloadavg()[0]
    server.reset()
    try:
        wall, rc, peak = run_measured(commands(side, inp, out, a), work / "log.txt")
        if rc != 0:
            tail = (work / "log.txt").read_text(errors="replace")[-3000:]
            raise SystemExit(f"{side} exited with {rc}; last lines of its log:\n{tail}")
        n, ok, mtimes = count_success(out)
        served = server.times()
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    if n != rows:
        raise SystemExit(f"{side} wrote {n} rows for {rows} input rows")
    return {"wall": wall, "rps": rows / wall, "steady": steady(served), "commit": commit_rate(mtimes, a.rows_per_shard),
            "ok": ok, "served": len(served), "peak": peak, "load": load}


def fmt(v: float | None, spec: str = ".1f") -> str:
    """``v`` formatted, or ``-`` for ``None``."""
    return "-" if v is None else format(v, spec)


def show(side: str, r: dict) -> None:
    """Print one run's line."""
    print(f"  {side:<12} wall {r['wall']:7.2f} s  {r['rps']:7.1f} rows/s wall  {fmt(r['steady']):>7} steady  "
          f"{fmt(r['commit']):>7} commit  ok {r['ok']:>6}/{r['served']:<6} served  peak RSS "
          f"{r['peak'] / 2**30:5.2f} GiB  load {r['load']:.2f}", flush=True)


def med(runs: list[dict], key: str) -> float | None:
    """Median of ``key`` over ``runs`` (``None`` values skipped; ``None`` if none)."""
    vals = [r[key] for r in runs if r[key] is not None]
    return statistics.median(vals) if vals else None


def ratio(a: float | None, b: float | None) -> str:
    """``a / b`` as ``1.23x`` (``-`` when either is missing)."""
    return "-" if a is None or not b else f"{a / b:.2f}x"


def main() -> None:
    """Parse the options; run the side-by-side comparison or the memory scan."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--latency-ms", type=float, default=0.0, help="fixed server delay per request")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--side", choices=["capfilt", "img2dataset", "both"], default="both")
    p.add_argument("--capfilt-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra capfilt --set override (repeatable; after the matched settings)")
    p.add_argument("--capfilt-executor", default="auto", choices=["auto", "ray", "local"],
                   help="capfilt's --executor (default auto, what a user gets: in-process for the download "
                        "recipe at any size, one download process per core)")
    p.add_argument("--memory-scan", default=None, metavar="N1,N2,...",
                   help="capfilt only: one run per row count, peak RSS each and the last/first ratio")
    p.add_argument("--threads", type=int, default=64, help="download threads per process/task")
    p.add_argument("--processes", type=int, default=2, help="img2dataset processes = capfilt download tasks")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--rows-per-shard", type=int, default=1000)
    p.add_argument("--workdir", default=None, help="parent of the per-run folders (default: the temp dir)")
    p.add_argument("--keep", action="store_true", help="keep each run's folder (output and log)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve:
        return serve(a.latency_ms)

    import psutil

    print(f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, {os.cpu_count()} CPUs, "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}, psutil {psutil.__version__}, "
          f"img2dataset {_version('img2dataset')}, ray {_version('ray')}")
    print(f"rows {a.memory_scan or a.rows}, latency {a.latency_ms:g} ms, threads {a.threads}, processes {a.processes}, "
          f"image_size {a.image_size}, rows/shard {a.rows_per_shard}, capfilt sets {a.capfilt_set}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-dl-in-", dir=a.workdir))
    try:
        with Server(a.latency_ms) as server:
            if a.memory_scan:
                return memory_scan([int(x) for x in a.memory_scan.split(",")], server, tmp, a)
            inp = tmp / "in.parquet"
            write_input(inp, a.rows, server.base)
            sides = SIDES if a.side == "both" else (a.side,)
            runs: dict[str, list[dict]] = {s: [] for s in sides}
            for rep in range(a.reps):
                print(f"rep {rep + 1}/{a.reps}", flush=True)
                for side in (sides if rep % 2 == 0 else sides[::-1]):
                    runs[side].append(one_run(side, server, inp, a.rows, a))
                    show(side, runs[side][-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"medians over {a.reps} rep(s):")
    for side in sides:
        m = {k: med(runs[side], k) for k in ("wall", "rps", "steady", "commit", "ok", "served", "peak", "load")}
        show(side, m)
    oks = {s: sorted({r["ok"] for r in runs[s]}) for s in sides}
    print("success counts: " + ", ".join(f"{s} {oks[s]}" for s in sides)
          + ("" if len(sides) < 2 or oks["capfilt"] == oks["img2dataset"] else "  (DIFFERENT)"))
    if len(sides) == 2:
        c, i = runs["capfilt"], runs["img2dataset"]
        print(f"ratio capfilt/img2dataset ({a.rows} rows, {a.latency_ms:g} ms): "
              f"wall rows/s {ratio(med(c, 'rps'), med(i, 'rps'))}, steady {ratio(med(c, 'steady'), med(i, 'steady'))}, "
              f"commit {ratio(med(c, 'commit'), med(i, 'commit'))}; peak RSS {ratio(med(c, 'peak'), med(i, 'peak'))} "
              f"(target: rows/s >= 1.00x)")


def memory_scan(sizes: list[int], server: Server, tmp: Path, a: argparse.Namespace) -> None:
    """capfilt once per size in ``sizes``; print peak tree RSS each and last/first (target ±15 %)."""
    peaks = []
    for n in sizes:
        inp = tmp / f"in-{n}.parquet"
        write_input(inp, n, server.base)
        r = one_run("capfilt", server, inp, n, a)
        show(f"capfilt {n}", r)
        peaks.append(r["peak"])
    print("peak RSS: " + ", ".join(f"{n} rows {pk / 2**30:.2f} GiB" for n, pk in zip(sizes, peaks)))
    print(f"ratio peak RSS {sizes[-1]} / {sizes[0]} rows: {peaks[-1] / peaks[0]:.2f}x (target 0.85-1.15x)")


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    main()
