"""capfilt.io.fetch: URL cleaning, address checks, redirects, limits, opt-out — against a real 127.0.0.1 server."""

from __future__ import annotations

import functools
import socket
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from capfilt import schema
from capfilt.config import DownloadConfig
from capfilt.io import fetch as fetch_mod
from capfilt.io.fetch import address_block_reason, fetch, normalize_url, resolve_host, user_agent
from tests.helpers.httpserver import ImageServer

TRICKY = Path(__file__).resolve().parents[1] / "fixtures" / "tricky"
HOPPER = (TRICKY / "pillow_hopper.jpg").read_bytes()


@pytest.fixture(scope="module")
def server():
    with ImageServer(root=TRICKY) as srv:
        yield srv


@pytest.fixture
def connections(monkeypatch):
    """Record every TCP connection urllib3 opens (host, port), while still opening it."""
    seen: list[tuple[str, int]] = []
    from urllib3.connection import HTTPConnection

    real = HTTPConnection._new_conn

    def spy(self):
        seen.append((self.host, self.port))
        return real(self)

    monkeypatch.setattr(HTTPConnection, "_new_conn", spy)
    return seen


def cfg(**kw) -> DownloadConfig:
    # robots.txt off: these tests count requests and connections of the image fetch itself
    # (robots.txt has its own tests in tests/io/test_robots.py)
    base = dict(timeout=2.0, allow_private_network=True, robots_txt=False)
    base.update(kw)
    return DownloadConfig(**base)


# ---------------------------------------------------------------------------------------------
# URL cleaning
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, clean", [
    ("  http://example.com/a b.jpg \n", "http://example.com/a%20b.jpg"),
    ("http://example.com/©photo.jpg", "http://example.com/%C2%A9photo.jpg"),
    ("http://example.com/i.jpg?a=1&amp;b=2", "http://example.com/i.jpg?a=1&amp;b=2"),
    ("http://example.com/already%20escaped.jpg", "http://example.com/already%20escaped.jpg"),
    ("HTTP://Example.COM:8080/x.jpg#frag", "http://example.com:8080/x.jpg"),
    ("http://bücher.de/x.jpg", "http://xn--bcher-kva.de/x.jpg"),
    ("https://example.com", "https://example.com/"),
    ("http://[::1]:8080/x", "http://[::1]:8080/x"),
    ("http://a.com/x,y,z.jpg", "http://a.com/x,y,z.jpg"),
])
def test_normalize_url_cleans_real_world_urls(raw, clean):
    assert normalize_url(raw) == clean


@pytest.mark.parametrize("raw, fragment", [
    (None, "no URL"),
    ("", "empty URL"),
    ("   ", "empty URL"),
    ("UNLIKELY", "not a URL"),
    ("ftp://example.com/x.jpg", "unsupported scheme 'ftp'"),
    ("javascript:alert(1)", "unsupported scheme 'javascript'"),
    ("data:image/png;base64,AAAA", "unsupported scheme 'data'"),
    ("file:///etc/passwd", "file:// URLs are not allowed"),
    ("http://", "no host"),
    ("http://example.com:99999/x", "port"),
    ("http://exa mple.com/x", "invalid host name"),
    (12, "not a string"),
])
def test_invalid_urls_are_refused_with_a_reason(raw, fragment):
    r = fetch(raw, DownloadConfig())
    assert r.status == schema.INVALID_URL
    assert fragment in r.error_message
    assert r.tries == 0 and r.data is None


def test_user_agent_has_img2dataset_format():
    ua = user_agent("capfilt")
    assert ua.endswith("(compatible; capfilt; +https://github.com/rom1504/img2dataset)")
    assert user_agent(None) == fetch_mod.BROWSER_UA


# ---------------------------------------------------------------------------------------------
# address checks (never contact the private addresses themselves)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("addr, reason", [
    ("127.0.0.1", "loopback"),
    ("127.8.9.10", "loopback"),
    ("::1", "loopback"),
    ("169.254.169.254", "link-local"),
    ("fe80::1", "link-local"),
    ("10.0.0.1", "private"),
    ("172.16.5.4", "private"),
    ("192.168.1.1", "private"),
    ("fd00::1", "private"),
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:127.0.0.1", "loopback"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("100.64.0.1", "non-global"),
    ("8.8.8.8", None),
    ("2606:4700:4700::1111", None),
    ("93.184.216.34", None),
])
def test_address_block_reason(addr, reason):
    assert address_block_reason(addr) == reason


@pytest.mark.parametrize("url, message", [
    ("http://169.254.169.254/latest/meta-data/", "host 169.254.169.254 is a link-local address"),
    ("http://10.0.0.1/x.jpg", "host 10.0.0.1 is a private address"),
    ("http://[::1]/x.jpg", "host ::1 is a loopback address"),
    ("http://[::ffff:169.254.169.254]/", "is a link-local address"),
    ("http://localhost/x.jpg", "host localhost (127.0.0.1) is a loopback address"),
])
def test_private_addresses_are_refused_before_any_connection(url, message, connections):
    r = fetch(url, DownloadConfig(timeout=0.5))
    assert r.status == schema.BLOCKED_ADDRESS
    assert message in r.error_message
    assert connections == []


@pytest.mark.parametrize("host", ["10.0.0.1", "169.254.169.254", "::1"])
def test_allow_private_network_lifts_the_check(host):
    with pytest.raises(fetch_mod.FetchFailure) as e:
        resolve_host(host, 80, allow_private_network=False)
    assert e.value.status == schema.BLOCKED_ADDRESS
    assert resolve_host(host, 80, allow_private_network=True) == host


def test_flag_makes_fetch_connect_to_the_checked_ip(monkeypatch):
    """With the flag on, the fetcher goes on to connect to exactly the checked IP (refused here, never sent)."""
    from urllib3.connection import HTTPConnection

    attempts = []

    def refuse(self):
        attempts.append(self.host)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(HTTPConnection, "_new_conn", refuse)
    for host, url in [("10.0.0.1", "http://10.0.0.1/x.jpg"), ("169.254.169.254", "http://169.254.169.254/")]:
        r = fetch(url, DownloadConfig(timeout=0.5, allow_private_network=True))
        assert r.status == schema.FAILED_TO_DOWNLOAD, r
        assert "connection refused" in r.error_message
    assert attempts == ["10.0.0.1", "169.254.169.254"]


def test_loopback_server_refused_by_default_and_allowed_with_flag(server):
    assert fetch(server.url("pillow_hopper.jpg"), DownloadConfig()).status == schema.BLOCKED_ADDRESS
    before = server.hits.get("/never-fetched.jpg", 0)
    assert fetch(server.url("never-fetched.jpg"), DownloadConfig()).status == schema.BLOCKED_ADDRESS
    assert server.hits.get("/never-fetched.jpg", 0) == before == 0
    r = fetch(server.url("pillow_hopper.jpg"), cfg())
    assert r.status == schema.SUCCESS and r.data == HOPPER


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_ipv6_loopback_refused_by_default_and_allowed_with_flag():
    try:
        httpd = _V6Server(("::1", 0), functools.partial(_QuietHandler, directory=str(TRICKY)))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://[::1]:{httpd.server_address[1]}/pillow_hopper.jpg"
        refused = fetch(url, DownloadConfig(timeout=2))
        assert refused.status == schema.BLOCKED_ADDRESS
        assert refused.error_message == "host ::1 is a loopback address (pass --allow-private-network to allow it)"
        ok = fetch(url, cfg())
        assert ok.status == schema.SUCCESS and ok.data == HOPPER
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_redirect_to_loopback_is_refused_at_the_hop(server, monkeypatch):
    """The first hop is treated as public; its redirect to 127.0.0.1 is checked again and refused."""
    real = fetch_mod.address_block_reason
    first = [True]

    def once_public(addr):
        if first and addr == "127.0.0.1":
            first.pop()
            return None
        return real(addr)

    monkeypatch.setattr(fetch_mod, "address_block_reason", once_public)

    def to_loopback(req):
        req.send_response(302)
        req.send_header("Location", f"http://127.0.0.1:{server.port}/redirect-target-hopper.jpg")
        req.send_header("Content-Length", "0")
        req.end_headers()

    server.add_route("/to-loopback", to_loopback)
    r = fetch(server.url("to-loopback"), DownloadConfig(timeout=2))
    assert r.status == schema.BLOCKED_ADDRESS
    assert r.error_message == "host 127.0.0.1 is a loopback address (pass --allow-private-network to allow it)"
    assert server.hits["/to-loopback"] == 1
    assert server.hits.get("/redirect-target-hopper.jpg", 0) == 0


def test_redirect_to_other_scheme_is_not_followed(server):
    def to_file(req):
        req.send_response(302)
        req.send_header("Location", "file:///etc/passwd")
        req.send_header("Content-Length", "0")
        req.end_headers()

    server.add_route("/to-file", to_file)
    r = fetch(server.url("to-file"), cfg(allow_file_urls=True))
    assert r.status == schema.FAILED_TO_DOWNLOAD
    assert "bad redirect target" in r.error_message and "file://" in r.error_message


# ---------------------------------------------------------------------------------------------
# server misbehaviours, each bounded in time
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path, status, message, max_s", [
    ("pillow_hopper.jpg", schema.SUCCESS, None, 1.0),
    ("status/404", schema.FAILED_TO_DOWNLOAD, "HTTP 404 Not Found", 1.0),
    ("status/500", schema.FAILED_TO_DOWNLOAD, "HTTP 500 Internal Server Error", 1.0),
    ("redirect/3/pillow_hopper.jpg", schema.SUCCESS, None, 1.0),
    ("redirect/6/pillow_hopper.jpg", schema.FAILED_TO_DOWNLOAD, "more than 5 redirects", 1.0),
    ("loop", schema.FAILED_TO_DOWNLOAD, "redirect loop (http://127.0.0.1:", 1.0),
    ("empty", schema.FAILED_TO_DOWNLOAD, "empty body (0 bytes)", 1.0),
    ("big/300000", schema.TOO_LARGE, "body is 300,000 bytes, over the limit of 200,000", 1.0),
    ("never", schema.TOO_LARGE, "body is over the limit of 200,000 bytes", 1.0),
    ("trickle", schema.FAILED_TO_DOWNLOAD, "timed out after 1.0 s", 1.8),
    ("slow/5/pillow_hopper.jpg", schema.FAILED_TO_DOWNLOAD, "timed out after 1.0 s", 1.8),
    ("robots/noai/pillow_hopper.jpg", schema.OPTED_OUT, "X-Robots-Tag: noai", 1.0),
    ("robots/capfilt:%20noimageai/pillow_hopper.jpg", schema.OPTED_OUT, "X-Robots-Tag: capfilt: noimageai", 1.0),
    ("robots/otherbot:%20noai/pillow_hopper.jpg", schema.SUCCESS, None, 1.0),
    ("robots/nofollow/pillow_hopper.jpg", schema.SUCCESS, None, 1.0),
])
def test_server_misbehaviours(server, path, status, message, max_s):
    t0 = time.monotonic()
    r = fetch(server.url(path), cfg(timeout=1.0, max_bytes=200_000))
    took = time.monotonic() - t0
    assert r.status == status, r
    if message is None:
        assert r.error_message is None
    else:
        assert r.error_message.startswith(message), r.error_message
    assert took < max_s
    if status == schema.SUCCESS:
        assert r.data == HOPPER and r.content_type == "image/jpeg"


def test_never_ending_body_is_cut_at_the_deadline(server):
    t0 = time.monotonic()
    r = fetch(server.url("never"), cfg(timeout=1.0, max_bytes=10**12))
    took = time.monotonic() - t0
    # either the deadline or the byte cap ends it; with a 1 TB cap it must be the deadline
    assert (r.status, r.error_message) == (schema.FAILED_TO_DOWNLOAD, "timed out after 1.0 s")
    assert 0.9 < took < 1.8


def test_deadlines_share_one_thread_instead_of_a_timer_per_request(server):
    """12 requests in flight at once: no Timer thread per request, one deadline thread per process."""
    from concurrent.futures import ThreadPoolExecutor

    timers_seen = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            timers_seen.append(sum(isinstance(t, threading.Timer) for t in threading.enumerate()))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(12) as ex:
            results = list(ex.map(lambda i: fetch(server.url(f"slow/0.3/pillow_hopper.jpg?n={i}"), cfg(timeout=5.0)),
                                  range(12)))
    finally:
        stop.set()
        watcher.join()
    assert [r.status for r in results] == [schema.SUCCESS] * 12
    assert timers_seen and max(timers_seen) == 0
    names = [t.name for t in threading.enumerate() if t.name == "capfilt-fetch-deadlines"]
    assert names == ["capfilt-fetch-deadlines"]
    started = fetch_mod.DEADLINES.started
    assert fetch(server.url("pillow_hopper.jpg"), cfg()).status == schema.SUCCESS
    assert fetch_mod.DEADLINES.started == started  # the next request reuses the thread


def test_slow_but_in_time_succeeds(server):
    r = fetch(server.url("slow/0.3/pillow_hopper.jpg"), cfg(timeout=2.0))
    assert r.status == schema.SUCCESS and r.data == HOPPER


def test_retries_only_transient_errors(server):
    calls = {"n": 0}

    def flaky(req):
        calls["n"] += 1
        code, body = (503, b"") if calls["n"] == 1 else (200, HOPPER)
        req.send_response(code)
        req.send_header("Content-Type", "image/jpeg")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    server.add_route("/flaky", flaky)
    r = fetch(server.url("flaky"), cfg(retries=2))
    assert r.status == schema.SUCCESS and r.tries == 2 and calls["n"] == 2

    before = server.hits.get("/status/404", 0)
    r = fetch(server.url("status/404"), cfg(retries=3))
    assert r.status == schema.FAILED_TO_DOWNLOAD and r.tries == 1
    assert server.hits["/status/404"] == before + 1

    before = server.hits.get("/status/500", 0)
    r = fetch(server.url("status/500"), cfg(retries=2))
    assert r.tries == 3 and server.hits["/status/500"] == before + 3


def test_request_headers(server):
    seen = {}

    def record(req):
        seen.update({k.lower(): v for k, v in req.headers.items()})
        req.send_response(200)
        req.send_header("Content-Length", str(len(HOPPER)))
        req.end_headers()
        req.wfile.write(HOPPER)

    server.add_route("/headers", record)
    r = fetch(server.url("headers"), cfg())
    assert r.status == schema.SUCCESS
    assert seen["host"] == f"127.0.0.1:{server.port}"
    assert "(compatible; capfilt; +https://github.com/rom1504/img2dataset)" in seen["user-agent"]
    assert seen["accept-encoding"] == "identity"


def _hopper_recording(paths: list[str]):
    """A route that appends the request path it sees to ``paths`` and answers with the Hopper JPEG."""
    def answer(req):
        paths.append(req.path)
        req.send_response(200)
        req.send_header("Content-Length", str(len(HOPPER)))
        req.end_headers()
        req.wfile.write(HOPPER)

    return answer


def test_spaces_and_non_ascii_reach_the_server_percent_encoded(server):
    got: list[str] = []
    server.add_route("/a b©.jpg", _hopper_recording(got))  # routes match the unquoted path
    r = fetch(f"  {server.base}/a b©.jpg?x=1&amp;y=2  ", cfg())
    assert r.status == schema.SUCCESS
    assert got == ["/a%20b%C2%A9.jpg?x=1&amp;y=2"]


def test_connection_refused_is_failed_to_download():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    r = fetch(f"http://127.0.0.1:{port}/x.jpg", cfg(timeout=1.0))
    assert (r.status, r.error_message) == (schema.FAILED_TO_DOWNLOAD, "connection refused")


def test_https_to_a_plain_http_server_fails_cleanly(server):
    r = fetch(server.url("pillow_hopper.jpg").replace("http://", "https://"), cfg(timeout=1.0))
    assert r.status == schema.FAILED_TO_DOWNLOAD
    assert r.error_message.startswith(("TLS error", "connection error"))


def test_unresolvable_host():
    r = fetch("http://no-such-host.invalid/x.jpg", DownloadConfig(timeout=1.0))
    assert r.status == schema.FAILED_TO_DOWNLOAD
    assert r.error_message.startswith("cannot resolve host no-such-host.invalid")


def test_file_urls_only_with_flag(tmp_path):
    p = tmp_path / "hopper image.jpg"
    p.write_bytes(HOPPER)
    url = p.as_uri()
    assert fetch(url, DownloadConfig()).status == schema.INVALID_URL
    r = fetch(url, DownloadConfig(allow_file_urls=True))
    assert r.status == schema.SUCCESS and r.data == HOPPER
    big = fetch(url, DownloadConfig(allow_file_urls=True, max_bytes=100))
    assert big.status == schema.TOO_LARGE
    (tmp_path / "empty.jpg").write_bytes(b"")
    empty = fetch((tmp_path / "empty.jpg").as_uri(), DownloadConfig(allow_file_urls=True))
    assert (empty.status, empty.error_message) == (schema.FAILED_TO_DOWNLOAD, "empty file (0 bytes)")
    missing = fetch((tmp_path / "missing.jpg").as_uri(), DownloadConfig(allow_file_urls=True))
    assert missing.status == schema.FAILED_TO_DOWNLOAD and "missing.jpg" in missing.error_message


def _raw_route(server, path, status, headers: list[bytes], body: bytes = b"", chunks: list[bytes] | None = None):
    def handler(req):
        req.send_response(status)
        for h in headers:
            req._headers_buffer.append(h + b"\r\n")  # raw bytes, as some servers send them
        if chunks is None:
            req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if chunks is None:
            req.wfile.write(body)
        else:
            for c in chunks:
                req.wfile.write(b"%x\r\n" % len(c) + c + b"\r\n")
            req.wfile.write(b"0\r\n\r\n")

    server.add_route(path, handler)


def test_chunked_body(server):
    _raw_route(server, "/chunked", 200, [b"Transfer-Encoding: chunked"],
               chunks=[HOPPER[i:i + 1000] for i in range(0, len(HOPPER), 1000)])
    r = fetch(server.url("chunked"), cfg())
    assert r.status == schema.SUCCESS and r.data == HOPPER


def test_a_content_encoding_we_did_not_ask_for_is_not_decoded(server):
    import gzip

    # a server that gzips despite Accept-Encoding: identity: the body stays the bytes on the wire
    wire = gzip.compress(HOPPER)
    _raw_route(server, "/gz", 200, [b"Content-Type: image/jpeg", b"Content-Encoding: gzip"], wire)
    r = fetch(server.url("gz"), cfg())
    assert r.status == schema.SUCCESS and r.data == wire
    # ... which must then decode as an image: it does not, and the row fails cleanly
    from capfilt.stages.download import DownloadStage

    row = DownloadStage(cfg()).process_url(server.url("gz"))
    assert (row.status, row.error_message) == (
        schema.FAILED_TO_DOWNLOAD,
        "not an image (gzip data: a Content-Encoding capfilt does not decode, served as image/jpeg)")


def test_gzip_bomb_costs_its_wire_size_in_memory_not_its_decoded_size(server):
    """64 MB of zeros gzip to ~64 kB. The limit (max_bytes, 128 MB) would allow the decoded body, so
    only not decoding keeps memory down: the old fetch (decode_content=True) held all 64 MB."""
    import gzip
    import tracemalloc

    decoded = 64 * 1024 * 1024
    bomb = gzip.compress(b"\0" * decoded, compresslevel=6)
    assert len(bomb) < decoded // 500
    _raw_route(server, "/gzbomb", 200, [b"Content-Type: image/jpeg", b"Content-Encoding: gzip"], bomb)
    from capfilt.stages.download import DownloadStage

    stage = DownloadStage(cfg(max_bytes=128 * 1024 * 1024))
    stage.setup()
    tracemalloc.start()
    try:
        row = stage.process_url(server.url("gzbomb"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"gzip bomb: {len(bomb):,} bytes on the wire, {decoded:,} decoded; peak traced memory {peak:,} bytes")
    assert peak < 8 * 1024 * 1024  # a few copies of the wire bytes, far below the 64 MB decoded size
    assert row.status == schema.FAILED_TO_DOWNLOAD and "gzip data" in row.error_message


def test_redirect_location_sent_as_raw_utf8(server):
    seen: list[str] = []
    server.add_route("/café.jpg", _hopper_recording(seen))
    _raw_route(server, "/utf8-location", 302, ["Location: /café.jpg".encode()])
    r = fetch(server.url("utf8-location"), cfg())
    assert r.status == schema.SUCCESS and r.data == HOPPER
    assert seen == ["/caf%C3%A9.jpg"] and r.final_url.endswith("/caf%C3%A9.jpg")


# ---------------------------------------------------------------------------------------------
# HTTPS: the connection goes to the checked IP, while SNI, certificate check and Host use the name
# ---------------------------------------------------------------------------------------------
def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    pytest.importorskip("cryptography")
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_https_uses_sni_and_verifies_the_name_while_connecting_to_the_ip(tmp_path, monkeypatch, connections):
    import ssl

    cert, key = _self_signed(tmp_path)
    sni: list[str | None] = []
    hosts: list[str] = []
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.sni_callback = lambda sock, server_name, _ctx: sni.append(server_name)

    class Handler(_QuietHandler):
        def do_GET(self):  # noqa: N802
            hosts.append(self.headers["Host"])
            return super().do_GET()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(TRICKY)))
    httpd.daemon_threads = True
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    url = f"https://localhost:{port}/pillow_hopper.jpg"
    try:
        untrusted = fetch(url, cfg())
        assert untrusted.status == schema.FAILED_TO_DOWNLOAD
        assert untrusted.error_message.startswith("TLS error") and "certificate" in untrusted.error_message

        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust the test certificate
        ok = fetch(url, cfg())
        assert ok.status == schema.SUCCESS and ok.data == HOPPER
        assert sni == ["localhost", "localhost"]
        assert hosts == [f"localhost:{port}"]
        assert connections == [("127.0.0.1", port), ("127.0.0.1", port)]  # the checked IP, not the name

        wrong_name = fetch(f"https://127.0.0.1:{port}/pillow_hopper.jpg", cfg())
        assert wrong_name.status == schema.FAILED_TO_DOWNLOAD and "TLS error" in wrong_name.error_message
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_next_checked_address_is_tried_when_one_refuses(server, monkeypatch, connections):
    """A name with an IPv6 and an IPv4 address: [::1] refuses (nothing listens there), 127.0.0.1 answers."""
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        if host == "dual.test":
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    url = f"http://dual.test:{server.port}/pillow_hopper.jpg"
    r = fetch(url, cfg())
    assert r.status == schema.SUCCESS and r.data == HOPPER
    assert connections == [("::1", server.port), ("127.0.0.1", server.port)]
    # every address is checked before the first connection: one private address blocks the name
    blocked = fetch(url, DownloadConfig(timeout=1.0))
    assert blocked.status == schema.BLOCKED_ADDRESS
    assert blocked.error_message == ("host dual.test (::1) is a loopback address (pass --allow-private-network "
                                     "to allow it)")
    assert len(connections) == 2


def test_public_name_with_a_private_second_address_is_refused(monkeypatch, connections):
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        if host == "rebind.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    r = fetch("http://rebind.test/latest/meta-data/", DownloadConfig(timeout=1.0))
    assert (r.status, r.error_message) == (schema.BLOCKED_ADDRESS,
                                           "host rebind.test (169.254.169.254) is a link-local address (pass --allow-private-network to allow it)")
    assert connections == []


def test_shorten_is_the_one_message_cutter():
    from capfilt.errors import one_line, shorten

    assert shorten("abcdef", 6) == "abcdef"
    assert shorten("abcdefg", 6) == "abcde…"
    assert shorten("abcdefg", 6, "...") == "abc..."
    assert shorten("abcdefg", 6, "") == "abcdef"
    assert one_line("a\n  b\tc ") == "a b c"


def test_a_5mb_url_never_reaches_the_server_and_no_message_echoes_it(server, connections):
    from capfilt.errors import ROW_MESSAGE_CHARS

    path = "/huge-" + "a" * 5_000_000
    before = dict(server.hits)
    r = fetch(server.base + path, cfg())
    assert r.status == schema.INVALID_URL and r.tries == 0
    assert r.error_message.startswith(f"URL is {len(server.base + path):,} characters long, over the limit of 8,192")
    assert len(r.error_message) <= ROW_MESSAGE_CHARS
    assert server.hits == before and connections == []  # not one connection, let alone a request
    # the limit is on the cleaned URL too: 3,000 spaces become 9,000 characters of %20
    r = fetch(server.url("sp" + " " * 3000 + ".jpg"), cfg())
    assert r.status == schema.INVALID_URL and "once percent-encoded" in r.error_message
    assert server.hits == before and connections == []
    # a URL just under the limit is requested as usual
    from capfilt.io.fetch import MAX_URL_CHARS

    ok = server.url("pillow_hopper.jpg") + "?" + "q" * (MAX_URL_CHARS - len(server.url("pillow_hopper.jpg")) - 1)
    assert len(ok) == MAX_URL_CHARS and fetch(ok, cfg()).status == schema.SUCCESS


def test_every_row_message_is_capped_even_when_it_quotes_the_input(server):
    """A 7,000-character host name that does not resolve: the resolver's message names the host."""
    from capfilt.errors import ROW_MESSAGE_CHARS
    from capfilt.stages.download import DownloadStage
    import pyarrow as pa

    host = "a" * 7000 + ".invalid"
    r = fetch(f"http://{host}/x.jpg", cfg(retries=0))
    assert r.status == schema.FAILED_TO_DOWNLOAD and r.error_message.startswith("cannot resolve host aaaa")
    assert len(r.error_message) == ROW_MESSAGE_CHARS and r.error_message.endswith("...")
    out = DownloadStage(cfg(retries=0))(pa.table({"url": [f"http://{host}/x.jpg", "http://x/" + "b" * 5_000_000]}))
    messages = out.column("error_message").to_pylist()
    assert out.column("status").to_pylist() == [schema.FAILED_TO_DOWNLOAD, schema.INVALID_URL]
    assert all(len(m) <= ROW_MESSAGE_CHARS for m in messages), [len(m) for m in messages]


# ---------------------------------------------------------------------------------------------
# X-Robots-Tag: img2dataset's rule, without importing its downloader module
# ---------------------------------------------------------------------------------------------
ROBOTS_VALUES = ["noai", "NoAI", " noimageai , nofollow", "nofollow", "noindex, noarchive", "capfilt: noai",
                 "CapFilt: noimageai", "otherbot: noai", "capfilt: nofollow", "capfilt : noai", "", ":",
                 "a:b:noai", "noai:capfilt", "none, NOIMAGEAI"]


@pytest.mark.parametrize("token", [None, "capfilt", "otherbot"])
def test_robots_tag_rule_matches_img2dataset_value_for_value(token):
    """capfilt's rule gives img2dataset's ``is_disallowed`` answer for every value and token."""
    from email.message import Message

    from img2dataset.downloader import is_disallowed

    from capfilt.io.fetch import robots_tag_forbids

    directives = {"noai", "noimageai"}
    answers = []
    for value in ROBOTS_VALUES:
        msg = Message()
        msg["X-Robots-Tag"] = value
        theirs = is_disallowed(msg, token, directives)
        assert robots_tag_forbids(value, token, directives) == theirs, (value, token)
        answers.append(theirs)
    assert set(answers) == {True, False}  # the table has both outcomes for every token


def test_a_download_process_never_imports_wandb(server):
    """Fetching (with and without an X-Robots-Tag opt-out) and resizing import no ``wandb``/img2dataset logger."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from capfilt.config import DownloadConfig\n"
        "from capfilt.io.fetch import fetch\n"
        "from capfilt.io.imaging import ImageProcessor\n"
        "cfg = DownloadConfig(timeout=5.0, allow_private_network=True, robots_txt=False)\n"
        f"ok = fetch({server.url('pillow_hopper.jpg')!r}, cfg)\n"
        f"out = fetch({server.url('robots/noai/pillow_hopper.jpg')!r}, cfg)\n"
        "image = ImageProcessor(cfg)(ok.data)\n"
        "print(ok.status, out.status, image.status, 'wandb' in sys.modules,"
        " any(m.endswith('img2dataset.logger') for m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [schema.SUCCESS, schema.OPTED_OUT, schema.SUCCESS, "False", "False"]
