"""Politeness and DNS (capfilt.io.hosts + fetch + the download stage) against real 127.0.0.1 servers.

Many host names reach one local server through the fetcher's resolver hook
(``hosts.DNS.use_resolver(loopback_resolver)``: ``*.test`` -> 127.0.0.1, nothing else touched).
"""

from __future__ import annotations

import io
import socket
import threading
import time

import pyarrow as pa
import pytest
from PIL import Image

from capfilt import schema
from capfilt.config import DownloadConfig
from capfilt.io import hosts
from capfilt.io.fetch import fetch, parse_retry_after
from capfilt.stages.download import DownloadStage
from tests.helpers.hostserver import CountingServer, loopback_resolver


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


JPEG = _jpeg()


def cfg(**kw) -> DownloadConfig:
    base = dict(timeout=5.0, allow_private_network=True, image_size=64, min_image_size=0)
    base.update(kw)
    return DownloadConfig(**base)


@pytest.fixture(autouse=True)
def _fresh_state():
    """Each test starts with no cached DNS answers, robots verdicts or host pauses, and leaves none."""
    from capfilt.io.robots import ROBOTS

    with hosts.DNS.use_resolver(loopback_resolver):
        ROBOTS.clear()
        hosts.LIMITER.clear()
        yield
        ROBOTS.clear()
        hosts.LIMITER.clear()


def _batch(urls) -> pa.Table:
    return pa.table({"key": [f"k{i:04d}" for i in range(len(urls))], "url": pa.array(urls, pa.string())})


# ---------------------------------------------------------------------------------------------
# per-host cap
# ---------------------------------------------------------------------------------------------
def test_one_host_200_urls_never_more_than_the_cap_in_flight():
    """Acceptance (issue 11): 1 host, 200 URLs, 64 threads: the server never sees more than the cap."""
    with CountingServer(JPEG, delay=0.03) as srv:
        urls = [srv.url("cdn.test", f"img/{i}.jpg") for i in range(200)]
        stage = DownloadStage(cfg(thread_count=64))  # per_host_concurrency: the default, 8
        out = stage(_batch(urls))
    assert DownloadConfig().per_host_concurrency == 8
    assert out.column("key").to_pylist() == [f"k{i:04d}" for i in range(200)]  # every row once, in order
    assert out.column("status").to_pylist() == [schema.SUCCESS] * 200
    assert srv.peak["cdn.test"] == 8  # the cap is reached (the threads are used) and never passed
    assert sum(1 for h, p in srv.paths if p.startswith("/img/")) == 200


def test_cap_is_per_host_and_other_hosts_run_alongside_a_big_one():
    """1 big host (120 URLs, first in the batch) + 30 small hosts: every small host's request starts
    while the big host still has most of its rows left (threads do not queue behind the capped host),
    and no host ever has more than 3 requests in flight."""
    with CountingServer(JPEG, delay=0.05) as srv:
        urls = [srv.url("big.test", f"b/{i}.jpg") for i in range(120)]
        urls += [srv.url(f"s{j}.test", f"s/{j}.jpg") for j in range(30)]
        out = DownloadStage(cfg(thread_count=24, per_host_concurrency=3))(_batch(urls))
    assert out.column("status").to_pylist() == [schema.SUCCESS] * 150
    assert max(srv.peak.values()) == 3 and srv.peak["big.test"] == 3
    assert srv.peak_total >= 8  # many hosts in flight at once
    big = srv.starts["big.test"]
    last_small = max(srv.starts[f"s{j}.test"][-1] for j in range(30))
    assert last_small < big[60], "small hosts waited behind the big one"


def test_many_hosts_use_all_threads():
    """40 host names x 5 URLs, cap 2, 32 threads: the cap holds per host while ~all threads stay busy."""
    with CountingServer(JPEG, delay=0.1) as srv:
        urls = [srv.url(f"h{j}.test", f"{i}.jpg") for i in range(5) for j in range(40)]
        out = DownloadStage(cfg(thread_count=32, per_host_concurrency=2))(_batch(urls))
    assert out.column("status").to_pylist() == [schema.SUCCESS] * 200
    assert max(srv.peak[f"h{j}.test"] for j in range(40)) <= 2
    assert srv.peak_total >= 24


def test_cap_holds_across_threads_that_call_fetch_directly():
    """The fetcher's own limiter (not just the stage's scheduler) bounds one process's requests."""
    with CountingServer(JPEG, delay=0.05) as srv:
        c = cfg(per_host_concurrency=4)
        threads = [threading.Thread(target=lambda i=i: fetch(srv.url("one.test", f"{i}.jpg"), c)) for i in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert srv.peak["one.test"] == 4
    assert hosts.LIMITER.hosts_tracked() == 0  # nothing left behind


def test_per_host_rate_spaces_request_starts():
    with CountingServer(JPEG) as srv:
        urls = [srv.url("slow.test", f"{i}.jpg") for i in range(10)]
        out = DownloadStage(cfg(thread_count=8, per_host_rate=20.0))(_batch(urls))
    assert out.column("status").to_pylist() == [schema.SUCCESS] * 10
    starts = [t for t in srv.starts["slow.test"]][-10:]  # the image requests (robots.txt came first)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert min(gaps) >= 0.04 and starts[-1] - starts[0] >= 0.43  # 1/20 s apart (server-side clock)


def test_no_cap_when_configured_off():
    with CountingServer(JPEG, delay=0.1) as srv:
        urls = [srv.url("cdn.test", f"{i}.jpg") for i in range(40)]
        DownloadStage(cfg(thread_count=20, per_host_concurrency=None))(_batch(urls))
    assert srv.peak["cdn.test"] > 8


def test_map_per_host_keeps_order_and_runs_each_item_once():
    seen: list[int] = []
    lock = threading.Lock()

    def fn(x):
        with lock:
            seen.append(x)
        time.sleep(0.001)
        return x * 2

    items = list(range(500))
    keys = [f"h{i % 7}" if i % 5 else "" for i in items]
    assert hosts.map_per_host(fn, items, keys, threads=16, cap=2) == [x * 2 for x in items]
    assert sorted(seen) == items
    with pytest.raises(ZeroDivisionError):
        hosts.map_per_host(lambda x: 1 / (x - 3), list(range(10)), ["a"] * 10, threads=4, cap=2)


# ---------------------------------------------------------------------------------------------
# DNS cache
# ---------------------------------------------------------------------------------------------
def test_dns_answers_are_cached_for_the_ttl_and_failures_briefly():
    calls: list[str] = []

    def counting(host, port, *a, **kw):
        calls.append(host)
        if host == "dead.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return loopback_resolver(host, port, *a, **kw)

    with CountingServer(JPEG) as srv, hosts.DNS.use_resolver(counting):
        c = cfg(robots_txt=False, dns_ttl=0.5, dns_negative_ttl=0.5)
        out = DownloadStage(c.model_copy(update={"thread_count": 16}))(
            _batch([srv.url("a.test", f"{i}.jpg") for i in range(50)]))
        assert out.column("status").to_pylist() == [schema.SUCCESS] * 50
        assert calls.count("a.test") == 1  # 16 threads, 50 requests, one lookup
        dead = [fetch(f"http://dead.test:{srv.port}/{i}.jpg", c) for i in range(5)]
        assert {(r.status, r.error_message) for r in dead} == {
            (schema.FAILED_TO_DOWNLOAD, "cannot resolve host dead.test (Name or service not known)")}
        assert calls.count("dead.test") == 1
        time.sleep(0.6)  # both TTLs over: asked again
        assert fetch(srv.url("a.test", "x.jpg"), c).ok and calls.count("a.test") == 2
        fetch(f"http://dead.test:{srv.port}/x.jpg", c)
        assert calls.count("dead.test") == 2
        uncached = cfg(robots_txt=False, dns_ttl=0, dns_negative_ttl=0)
        for _ in range(3):
            assert fetch(srv.url("a.test", "x.jpg"), uncached).ok
        assert calls.count("a.test") == 5


def test_dns_cache_is_bounded():
    cache = hosts.DnsCache(resolver=loopback_resolver, max_hosts=10)
    for i in range(25):
        assert cache.resolve(f"n{i}.test", 80, ttl=60) == ["127.0.0.1"]
    assert len(cache._entries) == 10 and cache.lookups == 25
    cache.resolve("n24.test", 80, ttl=60)
    assert cache.lookups == 25  # the newest are kept


# ---------------------------------------------------------------------------------------------
# Retry-After
# ---------------------------------------------------------------------------------------------
def test_retry_after_is_waited_for_and_not_counted_in_the_timeout():
    def answer(host, path, n):
        return (429, {"Retry-After": "2"}) if path == "/a.jpg" and n == 1 else None

    with CountingServer(JPEG, answer=answer) as srv:
        t0 = time.monotonic()
        r = fetch(srv.url("busy.test", "a.jpg"), cfg(timeout=1.5, retries=0))  # the 2 s wait is not in it
        took = time.monotonic() - t0
    assert r.ok and r.tries == 2 and r.data == JPEG
    assert 1.95 <= took < 6.0


def test_retry_after_pauses_the_whole_host_and_stays_bounded():
    """A 503 with Retry-After pauses the host for every thread; a host that keeps refusing fails the row
    after MAX_RETRY_AFTER_WAITS waits with a transient reason."""
    from capfilt.io.fetch import MAX_RETRY_AFTER_WAITS

    def answer(host, path, n):
        return (503, {"Retry-After": "1"}) if path.startswith("/always") else None

    with CountingServer(JPEG, answer=answer) as srv:
        t0 = time.monotonic()
        r = fetch(srv.url("down.test", "always.jpg"), cfg(retries=0))
        took = time.monotonic() - t0
    assert r.status == schema.FAILED_TO_DOWNLOAD and r.tries == 1 + MAX_RETRY_AFTER_WAITS == 4
    assert r.error_message == "HTTP 503 Service Unavailable (still refused after 3 Retry-After waits)"
    assert r.error_class == "http_5xx"
    assert MAX_RETRY_AFTER_WAITS - 0.1 <= took < MAX_RETRY_AFTER_WAITS + 2.5


def test_retry_after_over_the_limit_fails_the_hosts_rows_at_once():
    def answer(host, path, n):
        return (429, {"Retry-After": "120"}) if host == "angry.test" else None

    with CountingServer(JPEG, answer=answer) as srv:
        t0 = time.monotonic()
        first = fetch(srv.url("angry.test", "1.jpg"), cfg(retry_after_max=30))
        second = fetch(srv.url("angry.test", "2.jpg"), cfg(retry_after_max=30))
        other = fetch(srv.url("calm.test", "3.jpg"), cfg(retry_after_max=30))
        took = time.monotonic() - t0
    assert took < 3
    for r in (first, second):
        assert r.status == schema.FAILED_TO_DOWNLOAD
        assert r.error_message.startswith("angry.test asked to wait 1") and r.error_message.endswith(
            "s (Retry-After), over download.retry_after_max (30 s)")
        assert r.error_class == "http_429"  # transient: worth a --retry-failed later
    assert ("angry.test", "/2.jpg") not in srv.paths  # the paused host got no second request
    assert other.ok


def test_parse_retry_after():
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = 1_445_412_480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now=now) == 30.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now=now) == 0.0
