"""Decoded input tables shared by the shards of one run, and by nothing else.

Reading a 1000-row shard out of a text file means parsing the whole file, and out of a Parquet
row group decoding the whole group (1M rows in some LAION exports). A :class:`ReadCache` keeps
the last decoded tables so that the shards a worker reads from one file (or row group) share one
decode. It belongs to one run's read stage: a new cache in a process empties every older one, so
no table decoded for one call (``api.run``, a test, a notebook cell) is ever served to another,
and the memory of the last run is returned as soon as the next run reads.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import ClassVar

import pyarrow as pa

#: Default budget of one cache (bytes of decoded Arrow data). The most recent table is kept even
#: when it alone is larger, so a big file is still decoded once per worker rather than per shard.
DEFAULT_MAX_BYTES = 1 << 30


class ReadCache:
    """An LRU map from a key (file, row group, columns) to a decoded ``pyarrow.Table``.

    Args:
        max_bytes: bytes of decoded tables kept (older tables are dropped first; the newest is
            always kept).

    Creating a cache clears every other live cache of this process (one run at a time owns the
    decoded input). Thread-safe.
    """

    _live: ClassVar[weakref.WeakSet[ReadCache]] = weakref.WeakSet()
    _live_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, pa.Table] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # how many tables were decoded (tests and the benchmark read it)
        with ReadCache._live_lock:
            for other in list(ReadCache._live):
                other.clear()
            ReadCache._live.add(self)

    def get(self, key: Hashable, load: Callable[[], pa.Table]) -> pa.Table:
        """The table stored under ``key``, else ``load()`` (stored, then returned)."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        table = load()
        with self._lock:
            self.loads += 1
            self._entries[key] = table
            self._entries.move_to_end(key)
            while len(self._entries) > 1 and sum(t.nbytes for t in self._entries.values()) > self.max_bytes:
                self._entries.popitem(last=False)
        return table

    def clear(self) -> None:
        """Drop every stored table."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
