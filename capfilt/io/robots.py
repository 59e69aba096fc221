"""robots.txt opt-out: is this URL disallowed for capfilt or for a common AI crawler?

Before every request (each redirect hop too) :func:`capfilt.io.fetch.fetch` asks
:data:`ROBOTS` for the verdict on the URL. The host's ``/robots.txt`` is fetched once per origin
(scheme, host, port) and worker process by the function the fetcher passes in
(``fetch._load_robots``: the same SSRF-safe path as images, i.e. address check on every hop,
redirects by hand, one deadline of ``download.timeout``, the per-host politeness slot), read up
to :data:`ROBOTS_MAX_BYTES` bytes. This module makes no request itself. It is parsed with Scrapy's ``protego`` (RFC 9309: longest match wins, ``Allow`` wins a
tie, ``*`` and ``$`` wildcards; the stdlib ``urllib.robotparser`` has neither wildcards nor
longest match, so ``Disallow: /*.jpg$`` would not work there).

The URL is opted out when the rules disallow it for ``download.user_agent_token`` (``capfilt``)
or for any agent of ``download.robots_agents`` (``GPTBot``, ``CCBot``, ``Google-Extended``, ...):
a site that keeps AI crawlers out has said no to AI training, whoever asks. Each agent without a
group of its own follows the ``User-agent: *`` group, as RFC 9309 says.

Outcomes of the robots.txt request (RFC 9309 §2.3.1):

- 2xx: its rules apply (an empty or unparseable file has none).
- 4xx except 429 ("unavailable"): no rules, everything allowed.
- 429, 5xx, a timeout, a connection or TLS error, a body over :data:`ROBOTS_MAX_BYTES`
  ("unreachable"): ``download.robots_unreachable`` decides: ``allow`` (default) or ``disallow``.
- a refused address or URL (``blocked_address``, ``invalid_url``): no rules; the image request
  itself fails with the same reason.

Verdicts are cached per origin for :data:`ROBOTS_TTL` seconds (RFC 9309 asks for no more than
24 h; an unreachable file for :data:`UNREACHABLE_TTL`), at most :data:`ROBOTS_CACHE_ORIGINS` origins per process (least recently used dropped);
threads asking about one origin at once make one request.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from capfilt.errors import shorten

#: Bytes of a robots.txt read at most (RFC 9309 asks crawlers to read at least 500 KiB).
ROBOTS_MAX_BYTES = 512 * 1024
#: Seconds a fetched robots.txt (or its failure) is reused.
ROBOTS_TTL = 3600.0
#: Seconds an unreachable robots.txt (5xx, timeout, ...) is remembered before it is asked for again.
UNREACHABLE_TTL = 300.0
#: Most origins whose robots.txt a worker process keeps.
ROBOTS_CACHE_ORIGINS = 2048


@dataclass(frozen=True)
class RobotsFile:
    """The outcome of requesting one ``/robots.txt`` (what the loader passed to :meth:`RobotsCache.verdict` returns).

    Attributes:
        body: the file's bytes (2xx), or ``None`` when there are no rules (4xx, refused address).
        unreachable: why the file could not be read (5xx, 429, timeout, too large), else ``None``.
    """

    body: bytes | None = None
    unreachable: str | None = None


@dataclass(frozen=True)
class RobotsRules:
    """What one origin's robots.txt said.

    Attributes:
        expires: ``time.monotonic()`` after which it is fetched again.
        parser: a ``protego.Protego`` of the file, or ``None`` when there are no rules.
        unreachable: why the file could not be read (5xx, timeout, ...), else ``None``.
    """

    expires: float
    parser: object | None = None
    unreachable: str | None = None


def origin_of(url: str) -> tuple[str, str]:
    """``(origin, shown host)`` of a cleaned http(s) URL: ``("http://a.com:8080", "a.com:8080")``."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{netloc}", netloc


class RobotsCache:
    """Per-process cache of robots.txt rules, keyed by origin; thread-safe.

    Args:
        max_origins: most origins kept (least recently used dropped first).
        ttl: seconds an origin's rules are reused.
    """

    def __init__(self, max_origins: int = ROBOTS_CACHE_ORIGINS, ttl: float = ROBOTS_TTL):
        self.max_origins = max_origins
        self.ttl = ttl
        self.fetches = 0  # robots.txt requests made (for tests)
        self._lock = threading.Lock()
        self._rules: OrderedDict[str, RobotsRules] = OrderedDict()
        self._pending: dict[str, threading.Event] = {}

    def clear(self) -> None:
        """Forget every origin's rules."""
        with self._lock:
            self._rules.clear()

    def verdict(self, url: str, cfg, load: Callable[[str], RobotsFile]) -> str | None:
        """Why ``url`` is opted out by its host's robots.txt, or ``None`` when it may be fetched.

        Args:
            url: a cleaned ``http``/``https`` URL (:func:`capfilt.io.fetch.normalize_url`).
            cfg: the ``DownloadConfig`` (``user_agent_token``, ``robots_agents``,
                ``robots_unreachable``, and the fetch limits used for the robots.txt request).
            load: requests a robots.txt URL (``"http://host:port/robots.txt"``); called at most once
                per origin and :data:`ROBOTS_TTL` by all threads together.

        Returns:
            e.g. ``"robots.txt of example.com disallows GPTBot for /img/1.jpg"``.
        """
        origin, shown = origin_of(url)
        rules = self._get(origin, load)
        if rules.unreachable is not None:
            if cfg.robots_unreachable == "disallow":
                return (f"robots.txt of {shown} could not be read ({shorten(rules.unreachable, 60)}) "
                        f"and download.robots_unreachable=disallow")
            return None
        if rules.parser is None:
            return None
        agents = ([cfg.user_agent_token] if cfg.user_agent_token else []) + list(cfg.robots_agents)
        for agent in agents:
            if not rules.parser.can_fetch(url, agent):
                parts = urlsplit(url)
                path = parts.path + ("?" + parts.query if parts.query else "")
                return f"robots.txt of {shown} disallows {agent} for {shorten(path, 80)}"
        return None

    def _get(self, origin: str, load: Callable[[str], RobotsFile]) -> RobotsRules:
        while True:
            with self._lock:
                rules = self._rules.get(origin)
                if rules is not None and rules.expires > time.monotonic():
                    self._rules.move_to_end(origin)
                    return rules
                waiter = self._pending.get(origin)
                if waiter is None:
                    self._pending[origin] = threading.Event()
                    break
            waiter.wait()  # another thread is fetching this origin's robots.txt
        try:
            self.fetches += 1
            got = load(origin + "/robots.txt")
            now = time.monotonic()
            if got.unreachable is not None:
                rules = RobotsRules(now + min(self.ttl, UNREACHABLE_TTL), unreachable=got.unreachable)
            else:
                rules = RobotsRules(now + self.ttl, parser=None if got.body is None else parse(got.body))
            with self._lock:
                self._rules[origin] = rules
                self._rules.move_to_end(origin)
                while len(self._rules) > self.max_origins:
                    self._rules.popitem(last=False)
            return rules
        finally:
            with self._lock:
                self._pending.pop(origin).set()


def parse(body: bytes):
    """A ``protego.Protego`` of a robots.txt body (UTF-8, bad bytes replaced), or ``None`` if it has no rules."""
    from protego import Protego

    text = body.decode("utf-8", errors="replace")
    try:
        return Protego.parse(text)
    except Exception:  # noqa: BLE001 - a file protego cannot read has no rules we can follow
        return None


#: The worker process's robots.txt cache (used by :func:`capfilt.io.fetch.fetch`).
ROBOTS = RobotsCache()

__all__ = ["ROBOTS", "RobotsCache", "RobotsFile", "RobotsRules", "origin_of", "parse", "ROBOTS_MAX_BYTES", "ROBOTS_TTL", "UNREACHABLE_TTL",
           "ROBOTS_CACHE_ORIGINS"]
