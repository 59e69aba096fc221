"""Fetch one URL safely: scheme, address, redirect, size and time limits (img2dataset semantics, hardened).

Why not img2dataset's ``download_image``: it reads the whole body with no size bound, has only a
per-socket timeout (a server that trickles one byte every half second never ends), and lets
urllib follow redirects with no address check (a public URL redirecting to
``http://169.254.169.254/`` reaches the cloud metadata endpoint). capfilt keeps img2dataset's
*semantics*: the ``X-Robots-Tag`` opt-out follows ``img2dataset.downloader.is_disallowed``
(:func:`robots_tag_forbids`, checked against it in the tests) and the User-Agent string has img2dataset's format
(``... (compatible; <token>; +https://github.com/rom1504/img2dataset)``). The transport is urllib3
(one connection per request, as img2dataset opens one urllib request per image).

What one :func:`fetch` call guarantees:

- **Schemes**: ``http`` and ``https`` only; ``file://`` only with ``allow_file_urls``; anything
  else (``ftp:``, ``javascript:``, ``data:``, a bare word, ``''``, ``None``) is ``invalid_url``,
  and so is a URL over :data:`MAX_URL_CHARS` characters (no connection is made).
  The URL is cleaned first (:func:`normalize_url`): surrounding whitespace stripped, spaces and
  non-ASCII characters percent-encoded (real LAION URLs contain literal spaces and ``©``), IDN
  hosts IDNA-encoded, existing escapes and HTML entities such as ``&amp;`` left as they are.
- **Addresses**: the host is resolved with :func:`socket.getaddrinfo` and refused with
  ``blocked_address`` when *any* of its addresses is loopback, private, link-local, multicast,
  reserved, unspecified or otherwise not globally routable (IPv4-mapped IPv6 addresses are
  checked as their IPv4 address) unless ``allow_private_network``. The check happens before any
  connection is made, and again for every redirect hop (redirects are followed by hand, at most
  ``max_redirects``).
- **No DNS rebinding**: the TCP connection goes to an IP address that was checked (each of the
  resolver's addresses in turn until one accepts), never to the host name (the ``Host`` header,
  TLS SNI and the certificate's host name check still use the name), so DNS cannot answer
  differently between the check and the connect.
- **Time**: one deadline of ``timeout`` seconds per try covers connect, request, headers and
  body. A watchdog shuts the socket down at the deadline, so a trickling or never-ending
  response is cut off on time. Not covered: the system resolver (``getaddrinfo`` cannot be
  interrupted; it is bounded by the resolver's own timeout, see ``resolv.conf``).
- **Size**: a ``Content-Length`` above ``max_bytes`` is refused before reading; otherwise the
  body is read in chunks and refused (``too_large``) as soon as it passes ``max_bytes``. A
  0-byte body is ``failed_to_download``.
- **No decompression**: ``Accept-Encoding: identity`` is sent, and a body that still arrives with a
  ``Content-Encoding`` (gzip, deflate, br, zstd) is *not* decoded: it is kept as the raw bytes
  that came over the wire, which must then decode as an image (a gzip stream does not, and the
  row fails ``failed_to_download``, "not an image (gzip data ...)"). img2dataset's urllib does
  not decode either. So a gzip bomb (kilobytes on the wire, gigabytes decoded) costs only its
  wire size in memory, whatever urllib3's own decompression limits (urllib3 >= 2.7 is required
  anyway: CVE-2025-66471, CVE-2026-21441, CVE-2026-44432).
- **Retries**: ``retries`` extra tries, only for transient failures (timeouts, connection
  errors, HTTP 408/425/429/5xx); never for 4xx, blocked or invalid URLs, opt-outs or size limits.
- **Retry-After**: a 429 or 503 with a ``Retry-After`` (seconds or an HTTP date) pauses every
  request of this worker to that host for that long (``io/hosts.HostLimiter.defer``) and the row
  is tried again after the pause (at most :data:`MAX_RETRY_AFTER_WAITS` times, on top of
  ``retries``); a pause longer than ``retry_after_max`` fails the host's rows at once
  (``failed_to_download``, transient).
- **Opt-outs**: ``X-Robots-Tag`` (img2dataset's rule), ``tdm-reservation: 1`` (W3C TDMRep, when
  ``tdm_reservation``) and the host's ``robots.txt`` (``io/robots.py``, when ``robots_txt``,
  checked before each hop's request) give ``opted_out`` with the reason.
- **Politeness and DNS** (``io/hosts.py``): each hop's request holds one of its host's
  ``per_host_concurrency`` slots and respects ``per_host_rate``; names are resolved through the
  worker's DNS cache (``dns_ttl``, ``dns_negative_ttl``). Time spent waiting for a slot or for
  robots.txt is not part of the ``timeout`` deadline.

Environment proxies (``HTTP_PROXY``) are not used: a proxy would make the address check moot.
"""

from __future__ import annotations

import heapq
import ipaddress
import os
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit, urlunsplit
from urllib.request import url2pathname

from capfilt import schema
from capfilt.errors import row_message, shorten
from capfilt.io import hosts
from capfilt.io.failures import HTTP_429, classify
from capfilt.io.robots import ROBOTS, ROBOTS_MAX_BYTES, RobotsFile

#: Statuses after which another try could succeed.
_TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
_REDIRECT_CODES = {301, 302, 303, 307, 308}
_CHUNK = 64 * 1024
# Characters left as they are when percent-encoding a URL: RFC 3986 reserved + unreserved + '%'.
_SAFE_URL_CHARS = "%:/?#[]@!$&'()*+,;=-._~"

#: Longest URL capfilt requests (characters, before and after cleaning). Longer ones are
#: ``invalid_url`` without any connection: servers refuse request lines past ~8 KB (Apache's
#: ``LimitRequestLine`` 8190, nginx's 8 KB header buffers), and img2dataset-scale metadata has no
#: real image URL near it; a multi-megabyte "URL" is junk or an attack on the server.
MAX_URL_CHARS = 8192

#: Most extra tries a row gets for ``Retry-After`` answers (each waits out the host's pause).
MAX_RETRY_AFTER_WAITS = 3

BROWSER_UA = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"


def user_agent(token: str | None) -> str:
    """The User-Agent header, in img2dataset's format (``downloader.download_image``).

    Args:
        token: the crawler's user-agent token (``DownloadConfig.user_agent_token``), or ``None``.

    Returns:
        ``"<browser UA> (compatible; <token>; +https://github.com/rom1504/img2dataset)"``, or the
        browser UA alone when ``token`` is empty.
    """
    if token:
        return f"{BROWSER_UA} (compatible; {token}; +https://github.com/rom1504/img2dataset)"
    return BROWSER_UA


@dataclass(frozen=True)
class FetchResult:
    """The outcome of one :func:`fetch`.

    Attributes:
        status: ``success`` or one of ``failed_to_download``, ``too_large``, ``opted_out``,
            ``invalid_url``, ``blocked_address`` (see :data:`capfilt.schema.STATUSES`).
        error_message: a short readable reason (one line, at most
            :data:`capfilt.errors.ROW_MESSAGE_CHARS` characters), ``None`` on success.
        data: the response body (``bytes``, 1..max_bytes long) on success, else ``None``.
        content_type: the final response's ``Content-Type`` header, if any.
        final_url: the URL the body came from (after redirects), if a request was made.
        tries: how many tries were made (0 when the URL was refused before connecting).
        error_class: the failure's class (:data:`capfilt.io.failures.CLASSES`), ``None`` on success.
    """

    status: str
    error_message: str | None = None
    data: bytes | None = None
    content_type: str | None = None
    final_url: str | None = None
    tries: int = 0
    error_class: str | None = None

    @property
    def ok(self) -> bool:
        """True when ``status`` is ``success``."""
        return self.status == schema.SUCCESS


class FetchFailure(Exception):
    """A fetch ended with a non-success status (internal; turned into a :class:`FetchResult`).

    ``error_class`` defaults to :func:`capfilt.io.failures.classify` of ``status`` and ``message``.
    """

    def __init__(self, status: str, message: str, transient: bool = False, error_class: str | None = None, *,
                 http_status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.transient = transient
        self.error_class = error_class or classify(status, message)
        self.http_status = http_status  # the HTTP status of the answer that failed, if one came
        self.retry_after = retry_after  # seconds a 429/503 asked to wait (``Retry-After``), if it did


# ---------------------------------------------------------------------------------------------
# URL cleaning
# ---------------------------------------------------------------------------------------------
def normalize_url(url: object, allow_file_urls: bool = False) -> str:
    """Clean a raw URL from metadata into one that can be requested.

    Strips surrounding whitespace, lower-cases the scheme, IDNA-encodes a non-ASCII host,
    percent-encodes spaces and non-ASCII characters (as UTF-8) in path, query and userinfo, and
    drops the fragment. Existing ``%XX`` escapes and ``&amp;`` are left unchanged (the server sees
    what the page author wrote).

    Args:
        url: the value from the ``url`` column (any type; only a non-empty ``str`` can pass).
        allow_file_urls: accept ``file://`` URLs (``DownloadConfig.allow_file_urls``).

    Returns:
        The cleaned URL, e.g. ``"http://a.b/x%20y%C2%A9.jpg?a=1&amp;b=2"``.

    Raises:
        FetchFailure: with status ``invalid_url`` if ``url`` is not a string, empty, longer than
            :data:`MAX_URL_CHARS` (raw or cleaned), has no ``scheme://host``, has an unsupported scheme or an invalid port/host.
    """
    if not isinstance(url, str):
        message = "no URL" if url is None else f"URL is not a string ({type(url).__name__})"
        raise FetchFailure(schema.INVALID_URL, message)
    raw = url.strip()
    if not raw:
        raise FetchFailure(schema.INVALID_URL, "empty URL")
    if len(raw) > MAX_URL_CHARS:
        raise FetchFailure(schema.INVALID_URL, f"URL is {len(raw):,} characters long, over the limit of "
                                               f"{MAX_URL_CHARS:,}: {shorten(raw, 60)!r}")
    if any(c in raw for c in "\r\n\t\0"):
        raw = "".join(c for c in raw if c not in "\r\n\t\0")
    try:
        parts = urlsplit(raw)
    except ValueError as e:
        raise FetchFailure(schema.INVALID_URL, f"malformed URL ({e})") from None
    scheme = parts.scheme.lower()
    if scheme == "file":
        if not allow_file_urls:
            raise FetchFailure(schema.INVALID_URL, "file:// URLs are not allowed (allow_file_urls is off)")
        if parts.netloc not in ("", "localhost"):
            raise FetchFailure(schema.INVALID_URL, f"file:// URL names a remote host {parts.netloc!r}")
        return urlunsplit(("file", "", quote(parts.path, safe=_SAFE_URL_CHARS), "", ""))
    if scheme not in ("http", "https"):
        shown = shorten(raw, 40)
        if not scheme or not parts.netloc and ":" not in raw:
            raise FetchFailure(schema.INVALID_URL, f"not a URL: {shown!r}")
        raise FetchFailure(schema.INVALID_URL, f"unsupported scheme {scheme!r} (only http/https)")
    if not parts.netloc:
        raise FetchFailure(schema.INVALID_URL, f"URL has no host: {shorten(raw, 40)!r}")
    try:
        host = parts.hostname or ""
        port = parts.port
    except ValueError as e:
        raise FetchFailure(schema.INVALID_URL, f"malformed host or port ({e})") from None
    if not host:
        raise FetchFailure(schema.INVALID_URL, f"URL has no host: {shorten(raw, 40)!r}")
    host = _encode_host(host)
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        netloc = quote(userinfo, safe=_SAFE_URL_CHARS) + "@" + netloc
    path = quote(parts.path, safe=_SAFE_URL_CHARS) or "/"
    query = quote(parts.query, safe=_SAFE_URL_CHARS)
    clean = urlunsplit((scheme, netloc, path, query, ""))
    if len(clean) > MAX_URL_CHARS:
        raise FetchFailure(schema.INVALID_URL, f"URL is {len(clean):,} characters long once percent-encoded, over "
                                               f"the limit of {MAX_URL_CHARS:,}: {shorten(raw, 60)!r}")
    return clean


def _encode_host(host: str) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        host.encode("ascii")
        ascii_host = host
    except UnicodeEncodeError:
        try:
            ascii_host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise FetchFailure(schema.INVALID_URL, f"invalid host name {host!r}") from None
    if not all(c.isalnum() or c in "-._" for c in ascii_host):
        raise FetchFailure(schema.INVALID_URL, f"invalid host name {shorten(host, 40)!r}")
    return ascii_host.lower()


# ---------------------------------------------------------------------------------------------
# address check
# ---------------------------------------------------------------------------------------------
def address_block_reason(address: str) -> str | None:
    """Why an IP address must not be contacted, or ``None`` when it is globally routable.

    IPv4-mapped IPv6 addresses (``::ffff:10.0.0.1``) are judged as their IPv4 address.

    Args:
        address: an IPv4 or IPv6 address as text (an IPv6 zone ``%eth0`` is ignored).

    Returns:
        ``"loopback"``, ``"link-local"``, ``"multicast"``, ``"unspecified"``, ``"private"``,
        ``"reserved"`` or ``"non-global"``; ``None`` if the address may be contacted.

    Raises:
        ValueError: if ``address`` is not an IP address.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "non-global"
    return None


def resolve_addresses(host: str, port: int, allow_private_network: bool = False, *, ttl: float = 0.0,
                      negative_ttl: float = 0.0) -> list[str]:
    """Resolve ``host`` and return the addresses to connect to, refusing non-public addresses.

    Every address the resolver returns is checked (a name that resolves to one public and one
    private address is refused), so a DNS answer cannot smuggle a private address in second place.

    Args:
        host: a host name or IP literal (IPv6 without brackets).
        port: the TCP port (used only for the resolver call).
        allow_private_network: skip the address check (``DownloadConfig.allow_private_network``).
        ttl, negative_ttl: seconds the worker's DNS cache may reuse an answer / a failure
            (:data:`capfilt.io.hosts.DNS`; 0: ask the resolver).

    Returns:
        The resolved IP addresses as text, in the resolver's order, without repeats (at least one).

    Raises:
        FetchFailure: ``blocked_address`` for a refused address (message like
            ``"host 10.0.0.1 is a private address"``), ``failed_to_download`` (transient) if the
            name does not resolve.
    """
    try:
        addresses = hosts.DNS.resolve(host, port, ttl, negative_ttl)
    except hosts.ResolveError as e:
        raise FetchFailure(schema.FAILED_TO_DOWNLOAD, f"cannot resolve host {host} ({e})", transient=True) from None
    if not allow_private_network:
        for addr in addresses:
            reason = address_block_reason(addr)
            if reason is not None:
                shown = host if host == addr else f"{host} ({addr})"
                raise FetchFailure(schema.BLOCKED_ADDRESS, f"host {shown} is a {reason} address (pass "
                                                                 f"--allow-private-network to allow it)")
    return addresses


def resolve_host(host: str, port: int, allow_private_network: bool = False) -> str:
    """The first address of :func:`resolve_addresses` (same checks, same errors)."""
    return resolve_addresses(host, port, allow_private_network)[0]


# ---------------------------------------------------------------------------------------------
# the fetch
# ---------------------------------------------------------------------------------------------
def robots_tag_forbids(value: str, user_agent_token: str | None, directives: set[str]) -> bool:
    """Whether one ``X-Robots-Tag`` header value forbids this crawler (img2dataset's rule).

    A value is ``[<token>:] d1, d2, ...``. Without a token it applies to every crawler; with one
    (compared lower-cased) only to the crawler with that token. It forbids when one of its
    directives (stripped, lower-cased) is in ``directives``. This is the rule of
    ``img2dataset.downloader.is_disallowed``, checked value for value against it in
    ``tests/io/test_fetch.py``. It is written here rather than imported because importing that
    module imports img2dataset's logger and with it ``wandb`` and ``fsspec``: 0.8-1 s of start-up
    and tens of MB in every download process (``python -X importtime``).

    Args:
        value: one header value, e.g. ``"noai"`` or ``"capfilt: noimageai, nofollow"``.
        user_agent_token: this crawler's token, lower-cased, or ``None``.
        directives: lower-cased forbidding directives, e.g. ``{"noai", "noimageai"}``.
    """
    parts = value.split(":", 1)
    token = parts[0].lower() if len(parts) == 2 else None
    if token is not None and token != user_agent_token:
        return False
    return any(d.strip().lower() in directives for d in parts[-1].split(","))


def is_opted_out(headers, user_agent_token: str | None, directives: list[str]) -> str | None:
    """The ``X-Robots-Tag`` value that opts this response out, or ``None``.

    Same token/directive rules as img2dataset (:func:`robots_tag_forbids`): an
    ``X-Robots-Tag: <token>: noai`` applies only to crawlers with that token.

    Args:
        headers: urllib3 ``HTTPHeaderDict`` of the response.
        user_agent_token: this crawler's token (compared lower-cased).
        directives: disallowed directives, e.g. ``["noai", "noimageai"]``.
    """
    values = headers.getlist("X-Robots-Tag")
    if not directives or not values:
        return None
    token = None if user_agent_token is None else user_agent_token.strip().lower()
    wanted = {d.strip().lower() for d in directives}
    if any(robots_tag_forbids(v, token, wanted) for v in values):
        return ", ".join(values)
    return None


def fetch(url: object, cfg, *, allow_private_network: bool | None = None) -> FetchResult:
    """Download one URL within the limits of ``cfg`` (a :class:`capfilt.config.DownloadConfig`).

    Args:
        url: the raw URL (anything; non-strings and bad URLs give ``invalid_url``).
        cfg: a ``DownloadConfig``: ``timeout`` (s per try), ``retries``, ``max_bytes``,
            ``max_redirects``, ``user_agent_token``, ``disallowed_header_directives``,
            ``allow_private_network``, ``allow_file_urls``, the opt-out switches (``robots_txt``,
            ``robots_agents``, ``robots_unreachable``, ``tdm_reservation``) and the politeness
            and DNS settings (``per_host_concurrency``, ``per_host_rate``, ``retry_after_max``,
            ``dns_ttl``, ``dns_negative_ttl``).
        allow_private_network: overrides ``cfg.allow_private_network`` when given.

    Returns:
        A :class:`FetchResult`; never raises for anything a URL or a server can do.
    """
    allow_private = cfg.allow_private_network if allow_private_network is None else allow_private_network
    try:
        clean = normalize_url(url, cfg.allow_file_urls)
    except FetchFailure as f:
        return FetchResult(f.status, row_message(f.message), error_class=f.error_class)
    if clean.startswith("file:"):
        return _fetch_file(clean, cfg.max_bytes)
    last: FetchFailure | None = None
    tries = failures = waits = 0
    while True:
        tries += 1
        try:
            data, ctype, final = _fetch_once(clean, cfg, allow_private)
            return FetchResult(schema.SUCCESS, None, data, ctype, final, tries)
        except FetchFailure as f:
            last = f
            if f.retry_after is not None and waits < MAX_RETRY_AFTER_WAITS:
                waits += 1  # the next try waits out the host's pause in its slot (or fails if too long)
                continue
            failures += 1
            if not f.transient or failures > cfg.retries:
                break
    message = last.message
    if last.retry_after is not None and waits:
        message += f" (still refused after {waits} Retry-After waits)"
    return FetchResult(last.status, row_message(message), None, None, None, tries, last.error_class)


def _fetch_file(url: str, max_bytes: int) -> FetchResult:
    path = Path(url2pathname(urlsplit(url).path))
    try:
        size = path.stat().st_size
        if not path.is_file():
            return FetchResult(schema.FAILED_TO_DOWNLOAD, f"not a file: {path}")
        if size > max_bytes:
            return FetchResult(schema.TOO_LARGE, f"file is {size:,} bytes, over the limit of {max_bytes:,}")
        if size == 0:
            return FetchResult(schema.FAILED_TO_DOWNLOAD, "empty file (0 bytes)")
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as e:
        return FetchResult(schema.FAILED_TO_DOWNLOAD, f"cannot read {path}: {_oserror_text(e)}")
    if len(data) > max_bytes:
        return FetchResult(schema.TOO_LARGE, f"file is over the limit of {max_bytes:,} bytes")
    return FetchResult(schema.SUCCESS, None, data, None, url, 1)


def _fetch_once(url: str, cfg, allow_private: bool) -> tuple[bytes, str | None, str]:
    """One try: follow up to ``max_redirects`` redirects, each hop address-checked; one deadline.

    Before each hop: the robots.txt verdict (``cfg.robots_txt``), then one of the host's politeness
    slots (``io/hosts.LIMITER``), held for the hop's request. The ``timeout`` budget is spent only
    while requests run, not while waiting for robots.txt or a slot.
    """
    budget = cfg.timeout
    seen = {url}
    current = url
    for _hop in range(cfg.max_redirects + 1):
        if cfg.robots_txt:
            reason = ROBOTS.verdict(current, cfg, lambda robots_url: _load_robots(robots_url, cfg, allow_private))
            if reason is not None:
                raise FetchFailure(schema.OPTED_OUT, reason)
        result, budget = _polite_request(current, cfg, allow_private, budget)
        if isinstance(result, tuple):
            return result
        location = _header_text(result)
        target = urljoin(current, location)
        try:
            target = normalize_url(target, allow_file_urls=False)
        except FetchFailure as f:
            raise FetchFailure(schema.FAILED_TO_DOWNLOAD, f"bad redirect target ({f.message})") from None
        if target in seen:
            raise FetchFailure(schema.FAILED_TO_DOWNLOAD, f"redirect loop ({shorten(target, 80)})")
        seen.add(target)
        current = target
    raise FetchFailure(schema.FAILED_TO_DOWNLOAD, f"more than {cfg.max_redirects} redirects")


def _load_robots(url: str, cfg, allow_private: bool) -> RobotsFile:
    """Request a ``robots.txt`` like an image (same checks and limits, at most ``ROBOTS_MAX_BYTES``), no retries.

    RFC 9309 §2.3.1: a 2xx body holds the rules (an empty one none); 4xx other than 429 means no
    rules; 429, 5xx, timeouts, connection/TLS errors and an oversized file are "unreachable". A
    refused address or URL means no rules (the image request then fails for the same reason).
    """
    rcfg = cfg.model_copy(update={"robots_txt": False, "tdm_reservation": False, "retries": 0,
                                  "disallowed_header_directives": [], "max_bytes": ROBOTS_MAX_BYTES})
    try:
        body, _ctype, _final = _fetch_once(url, rcfg, allow_private)
    except FetchFailure as f:
        code = f.http_status
        if f.status in (schema.BLOCKED_ADDRESS, schema.INVALID_URL):
            return RobotsFile()
        if code is not None and (200 <= code < 300 or (400 <= code < 500 and code != 429)):
            return RobotsFile()
        if f.status == schema.TOO_LARGE:
            return RobotsFile(unreachable=f"over {ROBOTS_MAX_BYTES // 1024} KiB")
        return RobotsFile(unreachable=f.message)
    return RobotsFile(body=body)


def _polite_request(url: str, cfg, allow_private: bool, budget: float):
    """:func:`_request` inside one of the host's slots; returns ``(its result, budget left)``."""
    host = hosts.host_key(url)
    try:
        with hosts.LIMITER.slot(host, cfg.per_host_concurrency, cfg.per_host_rate, cfg.retry_after_max):
            started = time.monotonic()
            try:
                return _request(url, cfg, allow_private, started + budget), budget - (time.monotonic() - started)
            except FetchFailure as f:
                if f.retry_after is not None:
                    hosts.LIMITER.defer(host, f.retry_after)
                raise
    except hosts.HostDeferred as d:
        raise FetchFailure(schema.FAILED_TO_DOWNLOAD,
                           f"{host} asked to wait {d.seconds:.0f} s (Retry-After), over download.retry_after_max "
                           f"({cfg.retry_after_max:g} s)", transient=True, error_class=HTTP_429) from None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date (RFC 9110 §10.2.3).

    Args:
        value: the header value (``"120"``, ``"Wed, 21 Oct 2015 07:28:00 GMT"``) or ``None``.
        now: the current POSIX time (default: ``time.time()``), for dates.

    Returns:
        Seconds (>= 0; a date in the past gives 0), or ``None`` when absent or unreadable.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _Deadlines:
    """One thread that fires every pending request's deadline (instead of a timer thread per request).

    A :class:`threading.Timer` per request starts and joins one OS thread per image: at 64 fetch
    threads that is measurable CPU and GIL traffic on small machines. Here every :class:`_Watchdog`
    is an entry in one heap, served by one daemon thread per process (started on first use, again
    after a fork). Cancelled entries are dropped lazily when they reach the top of the heap.
    """

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, "_Watchdog"]] = []
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._pid = 0
        self.started = 0  # threads started so far in this process (tests: one, however many requests)

    def add(self, when: float, dog: "_Watchdog") -> None:
        """Fire ``dog`` at ``time.monotonic()`` value ``when`` unless it is cancelled first."""
        with self._cond:
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._heap = [e for e in self._heap if not e[2].cancelled] if self._pid == os.getpid() else []
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="capfilt-fetch-deadlines", daemon=True)
                self._thread.start()
                self.started += 1
            self._seq += 1
            heapq.heappush(self._heap, (when, self._seq, dog))
            if self._heap[0][2] is dog:
                self._cond.notify()

    def pending(self) -> int:
        """Entries still in the heap (cancelled ones included until they are dropped)."""
        with self._cond:
            return len(self._heap)

    def _run(self) -> None:
        """Fire each due deadline (outside the lock); sleep until the next one or a new earlier one."""
        while True:
            with self._cond:
                while self._heap and self._heap[0][2].cancelled:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                when, _seq, dog = self._heap[0]
                wait = when - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._heap)
            dog._fire()  # outside the lock: shutting a socket down can take a moment


#: The process's deadline thread (see :class:`_Deadlines`).
DEADLINES = _Deadlines()


class _Watchdog:
    """Shuts a connection's socket down at the deadline so any blocked read returns at once.

    Served by :data:`DEADLINES` (one thread per process for all requests); :meth:`cancel` when the
    request ends in time.
    """

    def __init__(self, conn, seconds: float):
        self.conn = conn
        self.fired = False
        self.cancelled = False
        DEADLINES.add(time.monotonic() + max(seconds, 0.0), self)

    def _fire(self) -> None:
        if self.cancelled:
            return
        self.fired = True
        sock = getattr(self.conn, "sock", None)
        if sock is not None:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self) -> None:
        """Stop the deadline watchdog (the request finished in time); drops the connection reference."""
        self.cancelled = True
        self.conn = None


def _request(url: str, cfg, allow_private: bool, deadline: float):
    """One HTTP GET. Returns ``(body, content_type, url)`` or the ``Location`` of a redirect."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    addresses = resolve_addresses(host, port, allow_private, ttl=cfg.dns_ttl, negative_ttl=cfg.dns_negative_ttl)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise FetchFailure(schema.FAILED_TO_DOWNLOAD, f"timed out after {cfg.timeout:.1f} s", transient=True)
    host_header = f"[{host}]" if ":" in host else host
    if parts.port is not None and parts.port != (443 if https else 80):
        host_header += f":{parts.port}"
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    headers = {
        "Host": host_header,
        "User-Agent": user_agent(cfg.user_agent_token),
        "Accept": "image/*,*/*;q=0.8",
        "Accept-Encoding": "identity",
        "Connection": "close",
    }
    watchdog = _Watchdog(None, remaining)
    conn = None
    try:
        conn = _connect(addresses, port, https, host, deadline, watchdog, cfg.timeout)
        try:
            # decode_content=False: a Content-Encoding we did not ask for stays raw bytes (no gzip bombs)
            conn.request("GET", target, headers=headers, preload_content=False, decode_content=False)
            resp = conn.getresponse()
        except Exception as e:  # noqa: BLE001 - every transport error is row data
            raise _transport_failure(e, watchdog, cfg.timeout) from None
        code = resp.status
        if code in _REDIRECT_CODES:
            location = resp.headers.get("Location")
            if not location:
                raise FetchFailure(schema.FAILED_TO_DOWNLOAD, f"HTTP {code} redirect without a Location")
            return location
        if not 200 <= code < 300:
            retry_after = parse_retry_after(resp.headers.get("Retry-After")) if code in (429, 503) else None
            raise FetchFailure(schema.FAILED_TO_DOWNLOAD, f"HTTP {code} {_reason(code, resp.reason)}".rstrip(),
                               transient=code in _TRANSIENT_HTTP, http_status=code, retry_after=retry_after)
        optout = is_opted_out(resp.headers, cfg.user_agent_token, cfg.disallowed_header_directives)
        if optout is not None:
            raise FetchFailure(schema.OPTED_OUT, f"X-Robots-Tag: {shorten(optout, 80)}")
        if cfg.tdm_reservation and (resp.headers.get("tdm-reservation") or "").strip() == "1":
            raise FetchFailure(schema.OPTED_OUT, "tdm-reservation: 1 (TDMRep: text and data mining rights reserved)")
        length = resp.headers.get("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > cfg.max_bytes:
            raise FetchFailure(schema.TOO_LARGE, f"body is {int(length):,} bytes, over the limit of {cfg.max_bytes:,}")
        body = _read_body(resp, cfg.max_bytes, watchdog, cfg.timeout)
        if not body:
            raise FetchFailure(schema.FAILED_TO_DOWNLOAD, "empty body (0 bytes)", http_status=code)
        return body, resp.headers.get("Content-Type"), url
    finally:
        watchdog.cancel()
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass


def _connect(addresses: list[str], port: int, https: bool, host: str, deadline: float, watchdog: "_Watchdog",
             timeout: float):
    """Open a connection to the first checked address that accepts one (TCP, then TLS for https).

    The TCP connection goes to the IP itself; for https, SNI and the certificate check use ``host``.
    Another address is tried only after a TCP-level failure (refused, unreachable, connect timeout).
    """
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

    last: Exception | None = None
    for ip in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or watchdog.fired:
            break
        # ``timeout`` bounds each socket operation; the watchdog bounds the whole try.
        if https:
            conn = HTTPSConnection(ip, port, timeout=remaining, server_hostname=host, assert_hostname=host,
                                   cert_reqs="CERT_REQUIRED")
        else:
            conn = HTTPConnection(ip, port, timeout=remaining)
        watchdog.conn = conn
        try:
            conn.connect()
            return conn
        except (NewConnectionError, ConnectTimeoutError) as e:
            last = e
            conn.close()
        except Exception as e:  # noqa: BLE001 - TLS and other errors end the try
            conn.close()
            raise _transport_failure(e, watchdog, timeout) from None
    raise _transport_failure(last if last is not None else TimeoutError(), watchdog, timeout)


def _read_body(resp, max_bytes: int, watchdog: _Watchdog, timeout: float) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        try:
            chunk = resp.read1(_CHUNK)
        except Exception as e:  # noqa: BLE001
            raise _transport_failure(e, watchdog, timeout) from None
        if watchdog.fired:
            raise FetchFailure(schema.FAILED_TO_DOWNLOAD, f"timed out after {timeout:.1f} s", transient=True)
        if not chunk:
            break
        total += len(chunk)
        if total > max_bytes:
            raise FetchFailure(schema.TOO_LARGE, f"body is over the limit of {max_bytes:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _header_text(value: str) -> str:
    """Undo http.client's latin-1 decoding of a header that a server sent as raw UTF-8 bytes."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def _reason(code: int, reason: str | None) -> str:
    if reason:
        return reason
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return ""


def _transport_failure(e: Exception, watchdog: _Watchdog, timeout: float) -> FetchFailure:
    import ssl

    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ProtocolError, ReadTimeoutError

    root: BaseException = e
    while isinstance(root, (NewConnectionError, ProtocolError)) and (root.__cause__ or root.__context__):
        root = root.__cause__ or root.__context__
    timed_out = isinstance(root, (TimeoutError, socket.timeout, ReadTimeoutError)) or (
        isinstance(e, ConnectTimeoutError) and not isinstance(e, NewConnectionError))
    if watchdog.fired or timed_out:
        return FetchFailure(schema.FAILED_TO_DOWNLOAD, f"timed out after {timeout:.1f} s", transient=True)
    from urllib3.util.ssl_match_hostname import CertificateError

    if isinstance(root, (ssl.SSLError, ssl.CertificateError, CertificateError)):
        return FetchFailure(schema.FAILED_TO_DOWNLOAD, f"TLS error: {shorten(_oserror_text(root), 100)}")
    if isinstance(root, ConnectionRefusedError):
        return FetchFailure(schema.FAILED_TO_DOWNLOAD, "connection refused", transient=True)
    if isinstance(root, (ConnectionError, ProtocolError, OSError, NewConnectionError)):
        return FetchFailure(schema.FAILED_TO_DOWNLOAD, f"connection error: {shorten(_oserror_text(root), 100)}",
                            transient=True)
    return FetchFailure(schema.FAILED_TO_DOWNLOAD, f"{type(root).__name__}: {shorten(str(root), 100)}")


def _oserror_text(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


__all__ = [
    "FetchResult", "FetchFailure", "fetch", "normalize_url", "resolve_addresses", "resolve_host",
    "address_block_reason", "parse_retry_after", "MAX_RETRY_AFTER_WAITS",
    "is_opted_out", "user_agent",
]
