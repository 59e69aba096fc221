"""Failure classes: every failed row's cause as one short word (``error_class``), and whether it is transient.

A row's ``error_message`` names the host, the URL or the size, so 1,000 unreachable LAION rows give
hundreds of distinct messages; its ``error_class`` groups them by cause (``dns``, ``timeout``,
``http_5xx``, ...). :func:`classify` is the one mapping from a row's ``status`` and
``error_message`` to its class; it reads the messages :mod:`capfilt.io.fetch` and
:mod:`capfilt.io.imaging` write, so a new message there needs a rule here (the tests pin one real
failure of each class). Outputs written before the column existed are classified the same way on
reading (:func:`classes_of`).

A class is *transient* when another try later could succeed (:data:`TRANSIENT_CLASSES`): those are
the rows ``capfilt run --retry-failed`` fetches again by default.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from urllib.parse import urlsplit

import pyarrow as pa

from capfilt import schema

DNS = "dns"
CONNECT = "connect"
TIMEOUT = "timeout"
HTTP_4XX = "http_4xx"
HTTP_5XX = "http_5xx"
HTTP_429 = "http_429"
TLS = "tls"
TOO_LARGE = "too_large"
REDIRECT = "redirect"
BLOCKED_ADDRESS = "blocked_address"
BAD_URL = "bad_url"
DECODE = "decode"
TOO_SMALL = "too_small"
OPTED_OUT = "opted_out"
MODEL = "model"
INTERNAL = "internal"

#: Every class, what it means (shown by ``capfilt run --help`` and in the report).
CLASSES: dict[str, str] = {
    DNS: "the host name does not resolve",
    CONNECT: "the connection was refused, reset or broken",
    TIMEOUT: "no complete answer within download.timeout seconds (also HTTP 408)",
    HTTP_4XX: "the server answered 4xx (not found, forbidden, gone, ...), 429 excepted",
    HTTP_5XX: "the server answered 5xx (server error, bad gateway, unavailable, ...)",
    HTTP_429: "the server answered 429 Too Many Requests",
    TLS: "TLS handshake or certificate failure",
    TOO_LARGE: "body over download.max_bytes, or image over the pixel/aspect limits",
    REDIRECT: "redirect loop, too many redirects, or a bad redirect target",
    BLOCKED_ADDRESS: "the host is loopback/private/link-local (allowed with --allow-private-network)",
    BAD_URL: "the URL is empty, not http(s) or malformed",
    DECODE: "the body is not an image, is empty, or cannot be decoded or resized",
    TOO_SMALL: "the image's shorter side is below download.min_image_size",
    OPTED_OUT: "the server opted out (X-Robots-Tag and other signals)",
    MODEL: "the captioner or the filter raised on this row",
    INTERNAL: "a bug in capfilt on this row (please report it)",
}

#: Classes worth another try by default (``--retry-failed`` with no list).
TRANSIENT_CLASSES: frozenset[str] = frozenset({DNS, CONNECT, TIMEOUT, HTTP_5XX, HTTP_429})

#: Statuses that are decisions of a filter, not failures: their rows get no class.
FILTER_STATUSES: frozenset[str] = frozenset({schema.DUPLICATE, schema.BLOCKED_CONTENT, schema.WRONG_LANGUAGE,
                                             schema.CONTAMINATED, schema.NSFW})

_BY_STATUS = {schema.TOO_LARGE: TOO_LARGE, schema.TOO_SMALL: TOO_SMALL, schema.OPTED_OUT: OPTED_OUT,
              schema.INVALID_URL: BAD_URL, schema.BLOCKED_ADDRESS: BLOCKED_ADDRESS,
              schema.FAILED_TO_RESIZE: DECODE, schema.FAILED_TO_CAPTION: MODEL, schema.FAILED_TO_SCORE: MODEL}
_HTTP = re.compile(r"^HTTP (\d{3})\b")
#: ``failed_to_download`` messages (:mod:`capfilt.io.fetch`, :mod:`capfilt.io.imaging`) by their start.
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("cannot resolve host", DNS),
    ("timed out", TIMEOUT),
    ("connection refused", CONNECT),
    ("connection error", CONNECT),
    ("TLS error", TLS),
    ("bad redirect target", REDIRECT),
    ("redirect loop", REDIRECT),
    ("more than ", REDIRECT),  # "more than N redirects"
    ("not an image", DECODE),
    ("empty body", DECODE),
    ("empty file", DECODE),
    ("internal error", INTERNAL),
    ("not a file", BAD_URL),
    ("cannot read ", CONNECT),  # a file:// URL that cannot be read (I/O error)
)


def classify(status: str | None, message: str | None) -> str | None:
    """The failure class of one row.

    Args:
        status: the row's ``status`` (:data:`capfilt.schema.STATUSES`).
        message: its ``error_message`` (may be ``None``).

    Returns:
        One of :data:`CLASSES`; ``None`` for ``success``, a null status and the filter decisions
        (:data:`FILTER_STATUSES`). A ``failed_to_download`` message no rule knows is ``connect``
        when it names a transport error type, else ``internal``.
    """
    if status is None or status == schema.SUCCESS or status in FILTER_STATUSES:
        return None
    text = (message or "").strip()
    if status == schema.FAILED_TO_DOWNLOAD:
        m = _HTTP.match(text)
        if m:
            return http_class(int(m.group(1)))
        if "redirect" in text and text.startswith("HTTP"):
            return REDIRECT  # "HTTP 302 redirect without a Location"
        for prefix, cls in _PREFIXES:
            if text.startswith(prefix):
                return cls
        if re.match(r"^\w*(Error|Exception)\b", text):  # "RemoteDisconnected: ..." from the transport
            return CONNECT
        return INTERNAL
    if status in _BY_STATUS:
        if status == schema.FAILED_TO_RESIZE and text.startswith("internal error"):
            return INTERNAL
        return _BY_STATUS[status]
    return INTERNAL


def http_class(code: int) -> str:
    """The class of an HTTP error status: ``http_429``, ``timeout`` (408), ``http_5xx``, else ``http_4xx``."""
    if code == 429:
        return HTTP_429
    if code == 408:
        return TIMEOUT
    return HTTP_5XX if code >= 500 else HTTP_4XX


def is_transient(error_class: str | None, transient: Iterable[str] = TRANSIENT_CLASSES) -> bool:
    """Whether a row of ``error_class`` is worth another try (``transient``: the classes that are)."""
    return error_class is not None and error_class in set(transient)


def domain_of(url: object) -> str:
    """The host of ``url``, lower-cased without ``www.`` (``"(no host)"`` for a URL without one)."""
    if not isinstance(url, str):
        return "(no host)"
    try:
        host = (urlsplit(url.strip()).hostname or "").lower()
    except ValueError:
        host = ""
    if host.startswith("www."):
        host = host[4:]
    return host or "(no host)"


def classes_of(table: pa.Table | pa.RecordBatch) -> list[str | None]:
    """Each row's class: its ``error_class`` column where set, else :func:`classify` of its status and message."""
    n = table.num_rows
    names = table.schema.names
    given = table.column("error_class").to_pylist() if "error_class" in names else [None] * n
    status = table.column("status").to_pylist() if "status" in names else [None] * n
    message = table.column("error_message").to_pylist() if "error_message" in names else [None] * n
    return [g if g is not None else classify(s, m) for g, s, m in zip(given, status, message)]


def fill_classes(table: pa.Table) -> pa.Table:
    """``table`` with its ``error_class`` column set for every row (:func:`classes_of`): a row that a later
    stage failed (``failed_to_caption``) gets its class too. A table without ``status`` is returned as is."""
    if "status" not in table.column_names:
        return table
    values = pa.array(classes_of(table), pa.string())
    if "error_class" in table.column_names:
        return table.set_column(table.column_names.index("error_class"), "error_class", values)
    return table.append_column("error_class", values)


def class_counts(table: pa.Table | pa.RecordBatch) -> dict[str, int]:
    """``{class: rows}`` of a table's failed rows (classes with no row are left out), sorted by name."""
    return dict(sorted(Counter(c for c in classes_of(table) if c is not None).items()))


def domain_counts(table: pa.Table | pa.RecordBatch, limit: int | None = None) -> dict[str, int]:
    """``{domain: failed rows}`` (rows with a class), most failures first; ``limit``: keep only the top ones."""
    if "url" not in table.schema.names:
        return {}
    urls = table.column("url").to_pylist()
    c = Counter(domain_of(u) for u, cls in zip(urls, classes_of(table)) if cls is not None)
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:limit])


__all__ = ["CLASSES", "TRANSIENT_CLASSES", "FILTER_STATUSES", "classify", "http_class", "is_transient",
           "domain_of", "classes_of", "fill_classes", "class_counts", "domain_counts"]
