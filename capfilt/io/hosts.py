"""Per-host state of one worker process: a DNS cache and the per-host politeness limiter.

A download worker (one Ray worker process, or the driver with ``--executor local``) runs many
fetch threads; everything here is shared by those threads through the module-level
:data:`DNS` and :data:`LIMITER` and is thread-safe. Nothing is shared *between* processes: with
``N`` download tasks running at once, one host sees at most ``N * per_host_concurrency`` requests
in flight.

- :class:`DnsCache`: host name -> checked addresses, reused for ``dns_ttl`` seconds
  (``getaddrinfo`` gives no TTL, so the bound is capfilt's), failed lookups remembered for
  ``dns_negative_ttl`` seconds; concurrent misses on one name make one lookup (the other threads
  wait for it); at most :data:`DNS_CACHE_HOSTS` names (least recently used dropped first). The
  resolver function is replaceable (:meth:`DnsCache.use_resolver`), which is how tests and
  ``benchmarks/bench_politeness.py`` give many host names the address 127.0.0.1 without
  touching ``/etc/hosts``.
- :class:`HostLimiter`: at most ``cap`` requests in flight per host name, at most ``rate``
  request starts per second per host, and a host-wide pause after a ``Retry-After``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

#: Most host names the DNS cache holds (least recently used are dropped first).
DNS_CACHE_HOSTS = 10_000

Resolver = Callable[..., list]


def host_key(url: object) -> str:
    """The politeness key of a URL: its host name, lower-cased (``""`` if it has none).

    Ports are ignored (``a.com:8080`` and ``a.com`` are one host); IP literals are their own key.
    Never raises: a URL that cannot be split gives ``""`` (such rows fail before any request).
    """
    if not isinstance(url, str):
        return ""
    try:
        return (urlsplit(url.strip()).hostname or "").lower()
    except ValueError:
        return ""


class ResolveError(Exception):
    """A host name did not resolve (the message is the resolver's reason, e.g. ``Name or service not known``)."""


@dataclass
class _DnsEntry:
    expires: float
    addresses: list[str] | None
    error: str | None


class DnsCache:
    """Thread-safe, bounded, TTL-bounded cache of :func:`socket.getaddrinfo` answers.

    Args:
        resolver: a ``getaddrinfo``-compatible function (``resolver(host, port, type=...)`` returning
            ``[(family, type, proto, canonname, sockaddr), ...]``); default: whatever
            :func:`socket.getaddrinfo` is at the time of each lookup.
        max_hosts: most names kept.
    """

    def __init__(self, resolver: Resolver | None = None, max_hosts: int = DNS_CACHE_HOSTS):
        self.resolver: Resolver | None = resolver
        self.max_hosts = max_hosts
        self.lookups = 0  # resolver calls made (for tests and benchmarks)
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _DnsEntry] = OrderedDict()
        self._pending: dict[str, threading.Event] = {}

    def clear(self) -> None:
        """Forget every cached answer."""
        with self._lock:
            self._entries.clear()

    @contextlib.contextmanager
    def use_resolver(self, resolver: Resolver | None) -> Iterator["DnsCache"]:
        """Resolve with ``resolver`` inside the ``with`` block (cache cleared on entry and exit)."""
        old = self.resolver
        self.resolver = resolver
        self.clear()
        try:
            yield self
        finally:
            self.resolver = old
            self.clear()

    def resolve(self, host: str, port: int, ttl: float = 0.0, negative_ttl: float = 0.0) -> list[str]:
        """The addresses of ``host`` as text, in the resolver's order, without repeats.

        Args:
            host: host name or IP literal (IPv6 without brackets).
            port: TCP port (passed to the resolver only).
            ttl: seconds a successful answer may be reused (0: ask the resolver, use no cached answer).
            negative_ttl: seconds a failure may be reused (0: ask again, use no cached failure).

        Raises:
            ResolveError: the name does not resolve (or a failure of it is cached).
        """
        key = host.lower()
        while True:
            with self._lock:
                entry = self._entries.get(key)
                now = time.monotonic()
                usable = entry is not None and entry.expires > now and (
                    ttl > 0 if entry.addresses is not None else negative_ttl > 0)
                if usable:
                    self._entries.move_to_end(key)
                    if entry.addresses is None:
                        raise ResolveError(entry.error)
                    return list(entry.addresses)
                waiter = self._pending.get(key)
                if waiter is None:
                    self._pending[key] = threading.Event()
                    break
            waiter.wait()  # another thread is looking this name up: use its answer (or look up after it)
        try:
            addresses, error = self._lookup(host, port)
            keep = ttl if addresses is not None else negative_ttl
            if keep > 0:
                with self._lock:
                    self._entries[key] = _DnsEntry(time.monotonic() + keep, addresses, error)
                    self._entries.move_to_end(key)
                    while len(self._entries) > self.max_hosts:
                        self._entries.popitem(last=False)
        finally:
            with self._lock:
                self._pending.pop(key).set()
        if addresses is None:
            raise ResolveError(error)
        return list(addresses)

    def _lookup(self, host: str, port: int) -> tuple[list[str] | None, str | None]:
        self.lookups += 1
        try:
            infos = (self.resolver or socket.getaddrinfo)(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError, OSError) as e:
            return None, (e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__)
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            return None, "no addresses"
        return addresses, None


class HostDeferred(Exception):
    """The host asked (``Retry-After``) to be left alone for longer than the caller will wait.

    Attributes:
        host: the host name.
        seconds: how much longer the host asked to be left alone.
    """

    def __init__(self, host: str, seconds: float):
        super().__init__(f"{host} asked to be left alone for {seconds:.0f} s")
        self.host = host
        self.seconds = seconds


class _HostState:
    __slots__ = ("cond", "inflight", "waiters", "next_start", "not_before", "peak")

    def __init__(self, lock: threading.Lock):
        self.cond = threading.Condition(lock)
        self.inflight = 0
        self.waiters = 0
        self.next_start = 0.0
        self.not_before = 0.0
        self.peak = 0

    def idle(self, now: float) -> bool:
        """True when nothing is in flight or waiting for this host and no rate or Retry-After pause
        holds it at ``now`` (``time.monotonic()`` seconds): the entry can be dropped."""
        return self.inflight == 0 and self.waiters == 0 and self.next_start <= now and self.not_before <= now


class HostLimiter:
    """Per-host concurrency cap, request rate and ``Retry-After`` pause, shared by a process's threads.

    State is kept only for hosts with a request in flight, waiting, or paused, so it stays small
    however many hosts a worker meets. The cap and rate are given per call (two recipes in one
    process each get their own limits for their own requests).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._hosts: dict[str, _HostState] = {}

    @contextlib.contextmanager
    def slot(self, host: str, cap: int | None, rate: float | None = None,
             max_pause: float = float("inf")) -> Iterator[float]:
        """Hold one of ``host``'s request slots inside the ``with`` block.

        Waits (without a bound) until fewer than ``cap`` requests to ``host`` are in flight, until
        a ``Retry-After`` pause of the host is over, and until ``1 / rate`` seconds after the
        previous request start to the host.

        Args:
            host: the politeness key (:func:`host_key`); ``""`` is never limited.
            cap: most requests in flight to ``host`` (``None``: no cap).
            rate: most request starts per second to ``host`` (``None``: no limit).
            max_pause: longest ``Retry-After`` pause (seconds) to wait out.

        Yields:
            The seconds spent waiting for the slot.

        Raises:
            HostDeferred: the host's pause is longer than ``max_pause`` (nothing is held).
        """
        if not host:
            yield 0.0
            return
        t0 = time.monotonic()
        with self._lock:
            st = self._hosts.get(host)
            if st is None:
                st = self._hosts[host] = _HostState(self._lock)
            st.waiters += 1
            try:
                while True:
                    now = time.monotonic()
                    pause = st.not_before - now
                    if pause > max_pause:
                        raise HostDeferred(host, pause)
                    if cap is not None and st.inflight >= cap:
                        st.cond.wait()
                    elif pause > 0:
                        st.cond.wait(pause)
                    else:
                        break
            finally:
                st.waiters -= 1
            st.inflight += 1
            st.peak = max(st.peak, st.inflight)
            start_at = now
            if rate is not None:
                start_at = max(now, st.next_start)
                st.next_start = start_at + 1.0 / rate
        try:
            delay = start_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            yield time.monotonic() - t0
        finally:
            with self._lock:
                st.inflight -= 1
                st.cond.notify_all()
                self._forget_if_idle(host, st, time.monotonic())

    def defer(self, host: str, seconds: float) -> None:
        """Pause every new request to ``host`` for ``seconds`` (a ``Retry-After``); longer pauses win."""
        if not host or seconds <= 0:
            return
        with self._lock:
            st = self._hosts.get(host)
            if st is None:
                st = self._hosts[host] = _HostState(self._lock)
            st.not_before = max(st.not_before, time.monotonic() + seconds)
            st.cond.notify_all()

    def in_flight(self, host: str) -> int:
        """Requests to ``host`` in flight now."""
        with self._lock:
            st = self._hosts.get(host)
            return st.inflight if st is not None else 0

    def hosts_tracked(self) -> int:
        """How many hosts have state now (in flight, waiting, rate-spaced or paused)."""
        with self._lock:
            return len(self._hosts)

    def clear(self) -> None:
        """Forget every pause and rate reservation (requests in flight keep their slots)."""
        with self._lock:
            for host, st in list(self._hosts.items()):
                st.not_before = st.next_start = 0.0
                st.cond.notify_all()
                self._forget_if_idle(host, st, time.monotonic())

    def _forget_if_idle(self, host: str, st: _HostState, now: float) -> None:
        if st.idle(now):
            if self._hosts.get(host) is st:
                del self._hosts[host]
        if len(self._hosts) > 4 * DNS_CACHE_HOSTS:  # paused/rate-spaced hosts nobody asks for again
            for h, s in list(self._hosts.items()):
                if s is not st and s.idle(now):
                    del self._hosts[h]


def map_per_host(fn: Callable[[object], object], items: list, keys: list[str], threads: int,
                 cap: int | None, thread_name_prefix: str = "capfilt-host") -> list:
    """``[fn(x) for x in items]`` on ``threads`` threads, never more than ``cap`` items of one key at once.

    A thread picks the next item of the least recently served key that has a free place, so
    threads never sit blocked behind a busy host while other hosts have work: with one host of
    5,000 URLs and 50 others, the 50 others run alongside the capped one. Items of one key start
    in their input order. The key ``""`` has no cap.

    Args:
        fn: called once per item; must not raise (an exception ends the map and is re-raised).
        items: the inputs.
        keys: one politeness key per item (:func:`host_key`).
        threads: worker threads (>= 1; fewer are started when there are fewer items).
        cap: most items of one key in ``fn`` at once (``None``: no cap).

    Returns:
        The results, in the order of ``items``.
    """
    n = len(items)
    results: list = [None] * n
    if n == 0:
        return results
    queues: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        queues.setdefault(k, []).append(i)
    for q in queues.values():
        q.reverse()  # pop() from the end = input order
    running: dict[str, int] = dict.fromkeys(queues, 0)
    ready: list[str] = list(queues)  # keys with work and a free place, least recently served first
    ready_set = set(ready)
    head = 0  # ready[head:] is the live part of the ready queue (a list used as a deque)
    cond = threading.Condition()
    remaining = [n]
    errors: list[BaseException] = []

    def take() -> tuple[int, str] | None:
        """The next ``(row index, host key)`` from a host below its cap (blocks until one is free),
        or ``None`` when every row is taken or a worker failed."""
        nonlocal head
        with cond:
            while True:
                if errors or remaining[0] == 0:
                    cond.notify_all()  # wake the threads still waiting for work: there is none
                    return None
                if head < len(ready):
                    key = ready[head]
                    head += 1
                    ready_set.discard(key)
                    i = queues[key].pop()
                    running[key] += 1
                    remaining[0] -= 1
                    if queues[key] and (not key or cap is None or running[key] < cap):
                        ready.append(key)
                        ready_set.add(key)
                    if head > 1024 and head * 2 > len(ready):
                        del ready[:head]
                        head = 0
                    return i, key
                cond.wait()

    def done(key: str) -> None:
        """Release a slot of host ``key`` and requeue the host if it has rows left."""
        with cond:
            running[key] -= 1
            if queues[key] and key not in ready_set:
                ready.append(key)
                ready_set.add(key)
            cond.notify()

    def worker() -> None:
        """One thread: take rows and fetch them until there are none; the first error stops all."""
        while True:
            got = take()
            if got is None:
                return
            i, key = got
            try:
                results[i] = fn(items[i])
            except BaseException as e:  # noqa: BLE001 - handed to the caller below
                with cond:
                    errors.append(e)
                    cond.notify_all()
                return
            finally:
                done(key)

    workers = max(1, min(threads, n))
    if workers == 1:
        return [fn(x) for x in items]
    pool = [threading.Thread(target=worker, name=f"{thread_name_prefix}-{j}", daemon=True) for j in range(workers)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    return results


#: The worker process's DNS cache (used by :func:`capfilt.io.fetch.resolve_addresses`).
DNS = DnsCache()
#: The worker process's per-host limiter (used by :func:`capfilt.io.fetch.fetch` for every request).
LIMITER = HostLimiter()

__all__ = ["DNS", "LIMITER", "DnsCache", "HostLimiter", "HostDeferred", "ResolveError", "host_key", "map_per_host",
           "DNS_CACHE_HOSTS"]
