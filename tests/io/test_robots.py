"""robots.txt and TDMRep opt-outs (capfilt.io.robots + fetch) against real 127.0.0.1 servers."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt import schema
from capfilt.config import DownloadConfig
from capfilt.io import hosts
from capfilt.io.fetch import fetch
from capfilt.io.robots import ROBOTS, ROBOTS_MAX_BYTES
from tests.helpers.httpserver import ImageServer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
HOPPER = (FIXTURES / "tricky" / "pillow_hopper.jpg").read_bytes()
COCO = sorted((FIXTURES / "coco" / "images").glob("*.jpg"))


def cfg(**kw) -> DownloadConfig:
    base = dict(timeout=2.0, allow_private_network=True)
    base.update(kw)
    return DownloadConfig(**base)


@pytest.fixture(autouse=True)
def _fresh_state():
    """No robots.txt verdict or host pause of another test (or another server on a reused port)."""
    ROBOTS.clear()
    hosts.LIMITER.clear()
    yield
    ROBOTS.clear()
    hosts.LIMITER.clear()


def _server(robots: str | bytes | None = None, robots_code: int = 200, **routes) -> ImageServer:
    """A server with ``/robots.txt`` (None: 404), ``/tdm/<v>.jpg`` with ``tdm-reservation: <v>``, and images."""
    srv = ImageServer(root=FIXTURES)
    if robots is not None:
        body = robots.encode() if isinstance(robots, str) else robots
        srv.add_route("/robots.txt", lambda req: srv._send(req, robots_code, body, "text/plain"))
    for value in ("0", "1"):
        srv.add_route(f"/tdm/{value}.jpg", lambda req, v=value: srv._send(req, 200, HOPPER, "image/jpeg",
                                                                          {"tdm-reservation": v}))
    for path, handler in routes.items():
        srv.add_route(path, handler)
    return srv


def test_robots_txt_disallowing_capfilt_opts_out_only_that_host_in_a_real_run(tmp_path):
    """Acceptance (issue 11): a real `capfilt run` (Ray, download pipeline) over two hosts; the one
    whose robots.txt disallows capfilt has every row `opted_out` with the reason, the other none."""
    from capfilt.api import RunOptions, run

    private = f"/p-{uuid.uuid4().hex[:8]}/"  # unique: a reused port in a reused Ray worker cannot match it
    blocked = _server(f"User-agent: capfilt\nDisallow: {private}\n\nUser-agent: *\nAllow: /\n")
    free = _server(None)
    for srv in (blocked, free):
        for i, p in enumerate(COCO[:6]):
            srv.add_route(f"{private}{i}.jpg", lambda req, p=p, srv=srv: srv._send(req, 200, p.read_bytes(), "image/jpeg"))
    with blocked, free:
        urls = [s.url(f"{private}{i}.jpg") for i in range(6) for s in (blocked, free)]
        pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(12)]}), tmp_path / "in.parquet")
        res = run(RunOptions(inputs=[str(tmp_path / "in.parquet")], output=str(tmp_path / "out"), pipeline="download",
                             executor="ray", progress=False,
                             overrides={"download.allow_private_network": True, "download.image_size": 64}))
        image_hits_blocked = sum(n for p, n in blocked.hits.items() if p.startswith(private))
    rows = {r["url"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert len(rows) == 12 and res.totals["rows"] == 12
    for i in range(6):
        r = rows[blocked.url(f"{private}{i}.jpg")]
        assert (r["status"], r["error_message"]) == (
            schema.OPTED_OUT, f"robots.txt of 127.0.0.1:{blocked.port} disallows capfilt for {private}{i}.jpg")
        assert r["image"] is None
        assert rows[free.url(f"{private}{i}.jpg")]["status"] == schema.SUCCESS
    assert res.totals["status"] == {schema.OPTED_OUT: 6, schema.SUCCESS: 6}
    assert image_hits_blocked == 0  # the opted-out images were never requested
    assert 1 <= blocked.hits["/robots.txt"] <= 2  # once per worker process that met the host


@pytest.mark.parametrize("agent", ["GPTBot", "CCBot", "Google-Extended", "anthropic-ai", "ClaudeBot", "img2dataset"])
def test_ai_crawler_agents_opt_out(agent):
    with _server(f"User-agent: {agent}\nDisallow: /\n") as srv:
        r = fetch(srv.url("tricky/pillow_hopper.jpg"), cfg())
        assert (r.status, r.error_message) == (
            schema.OPTED_OUT, f"robots.txt of 127.0.0.1:{srv.port} disallows {agent} for /tricky/pillow_hopper.jpg")
        assert srv.hits.get("/tricky/pillow_hopper.jpg", 0) == 0 and r.error_class == "opted_out"
        # the agent list is configurable, and the whole check can be switched off
        assert fetch(srv.url("tricky/pillow_hopper.jpg"), cfg(robots_agents=[])).ok
        assert fetch(srv.url("tricky/pillow_hopper.jpg"), cfg(robots_txt=False)).ok


def test_rfc9309_matching_wildcards_longest_match_and_star_group():
    robots = ("User-agent: *\nDisallow: /*.png$\nDisallow: /tricky/\nAllow: /tricky/pillow_hopper.jpg$\n\n"
              "User-agent: Googlebot\nDisallow: /\n")
    with _server(robots) as srv:
        ok = fetch(srv.url("tricky/pillow_hopper.jpg"), cfg())  # Allow is the longer match
        png = fetch(srv.url("tricky/pillow_transparent.png"), cfg())
        other = fetch(srv.url("tricky/pillow_hopper.jpg?v=1"), cfg())
        photo = fetch(srv.url("coco/images/000000000139.jpg"), cfg())
    assert ok.ok and photo.ok  # Googlebot's group is not ours
    assert png.error_message == f"robots.txt of 127.0.0.1:{srv.port} disallows capfilt for /tricky/pillow_transparent.png"
    assert other.status == schema.OPTED_OUT and other.error_message.endswith("for /tricky/pillow_hopper.jpg?v=1")


def test_robots_txt_is_fetched_once_per_origin_by_many_threads():
    with _server("User-agent: *\nDisallow: /nope/\n") as srv, _server(None) as other:
        results = []
        lock = threading.Lock()

        def one(i):
            r = fetch((srv if i % 2 else other).url("tricky/pillow_hopper.jpg"), cfg())
            with lock:
                results.append(r.status)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [schema.SUCCESS] * 24
        assert srv.hits["/robots.txt"] == 1 and other.hits["/robots.txt"] == 1  # two origins (ports), one each
        assert srv.hits["/tricky/pillow_hopper.jpg"] == 12


def test_missing_robots_allows_and_unreachable_follows_the_setting():
    with _server(None) as srv:  # 404
        assert fetch(srv.url("tricky/pillow_hopper.jpg"), cfg(robots_unreachable="disallow")).ok
    with _server("oops", robots_code=500) as srv:
        assert fetch(srv.url("tricky/pillow_hopper.jpg"), cfg()).ok  # default: allow
        ROBOTS.clear()
        r = fetch(srv.url("tricky/pillow_hopper.jpg"), cfg(robots_unreachable="disallow"))
        assert (r.status, r.error_message) == (
            schema.OPTED_OUT, f"robots.txt of 127.0.0.1:{srv.port} could not be read (HTTP 500 Internal Server "
                              f"Error) and download.robots_unreachable=disallow")


def test_robots_txt_is_bounded_in_size_and_follows_redirects():
    huge = "User-agent: *\nDisallow: /\n" + "# padding\n" * (ROBOTS_MAX_BYTES // 10 + 10)
    with _server(huge) as srv:
        r = fetch(srv.url("tricky/pillow_hopper.jpg"), cfg(robots_unreachable="disallow"))
        assert r.status == schema.OPTED_OUT and "could not be read (over 512 KiB)" in r.error_message
    with _server(None) as srv:
        srv.add_route("/robots.txt", lambda req: srv._send(req, 301, b"", "text/plain", {"Location": "/real-robots"}))
        srv.add_route("/real-robots", lambda req: srv._send(req, 200, b"User-agent: capfilt\nDisallow: /tricky/",
                                                            "text/plain"))
        r = fetch(srv.url("tricky/pillow_hopper.jpg"), cfg())
        assert r.status == schema.OPTED_OUT and srv.hits["/real-robots"] == 1


def test_robots_txt_of_each_redirect_hop_is_checked():
    with _server("User-agent: *\nDisallow: /tricky/\n") as target, _server(None) as start:
        start.add_route("/go", lambda req: start._send(req, 302, b"", "text/plain",
                                                      {"Location": target.url("tricky/pillow_hopper.jpg")}))
        r = fetch(start.url("go"), cfg())
    assert r.status == schema.OPTED_OUT
    assert r.error_message == f"robots.txt of 127.0.0.1:{target.port} disallows capfilt for /tricky/pillow_hopper.jpg"
    assert target.hits.get("/tricky/pillow_hopper.jpg", 0) == 0


def test_robots_txt_request_is_address_checked():
    """robots.txt goes through the same SSRF checks: with private networks refused, a loopback host's
    robots.txt is never requested (and the image is refused with blocked_address as before)."""
    with _server("User-agent: *\nDisallow: /\n") as srv:
        r = fetch(srv.url("tricky/pillow_hopper.jpg"), DownloadConfig(timeout=2.0))
    assert r.status == schema.BLOCKED_ADDRESS and srv.hits == {}


def test_tdm_reservation_header_opts_out():
    with _server(None) as srv:
        r = fetch(srv.url("tdm/1.jpg"), cfg())
        assert (r.status, r.error_message) == (
            schema.OPTED_OUT, "tdm-reservation: 1 (TDMRep: text and data mining rights reserved)")
        assert fetch(srv.url("tdm/0.jpg"), cfg()).ok
        assert fetch(srv.url("tdm/1.jpg"), cfg(tdm_reservation=False)).ok
