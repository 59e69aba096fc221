"""The export's destination folder: which shards are done, and committing one shard whole.

Layout of ``DEST`` (local or ``s3://...``):

- ``NAME.tar`` / ``NAME.parquet``: one shard per committed source part, named after it (with
  ``rows_per_file``: ``NAME_0000.tar``, ``NAME_0001.tar``, ... each holding a slice of its rows);
- ``_stats/NAME.stats.json``: that shard's counts, written last (the same stats-last rule as
  :mod:`capfilt.io.writer`): a shard without it is redone on the next export;
- ``_capfilt/export.json``: what is being exported (source, format, options) and, once finished,
  the summary; ``_capfilt/tmp/``: shards being written.

A shard is written under ``_capfilt/tmp/`` and moved into place, then its stats are written (both
through pyarrow's filesystem, so object stores work: there the move is a server-side copy and the
stats object appears whole or not at all). A shard counts as done only when its stats name the same
source part (name, size, rows) and the same export options, so a changed source or a changed
``--all`` redoes it.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from typing import Any, BinaryIO

import pyarrow.fs as pafs

from capfilt.io.filesystem import Location
from capfilt.io.writer import META_DIR, STATS_DIR, STATS_SUFFIX, write_json

#: The export's own record inside ``DEST/_capfilt/``.
EXPORT_JSON = "export.json"
#: Shard names the export writes at the top of ``DEST`` (nothing else there is ever deleted).
SHARD_RE = re.compile(r"^(\d{5}(?:-\d{6})?(?:_\d{4})?)\.(tar|parquet)$")


def read_json(loc: Location) -> Any:
    """The JSON at ``loc``, or ``None`` when it is missing or not JSON."""
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def top_files(dest: Location) -> list[str]:
    """Names of the files at the top of ``dest`` (empty when it does not exist)."""
    if not dest.exists():
        return []
    infos = dest.fs.get_file_info(pafs.FileSelector(dest.path, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


def shard_stats(dest: Location, name: str) -> dict | None:
    """The stats of destination shard ``name``, or ``None`` when it has none (not committed)."""
    data = read_json(dest.join(STATS_DIR, name + STATS_SUFFIX))
    return data if isinstance(data, dict) else None


def is_done(dest: Location, name: str, ext: str, expect: dict[str, Any], present: set[str]) -> dict | None:
    """The stats of shard ``name`` if it is committed for exactly ``expect`` (source + options), else ``None``.

    Args:
        present: file names at the top of ``dest`` (:func:`top_files`).
    """
    if f"{name}.{ext}" not in present:
        return None
    stats = shard_stats(dest, name)
    if not stats or any(stats.get(k) != v for k, v in expect.items()):
        return None
    return stats


def clear_temporaries(dest: Location) -> None:
    """Delete ``DEST/_capfilt/tmp/`` (shards a crashed export was writing)."""
    tmp = dest.join(META_DIR, "tmp")
    if tmp.exists():
        dest.fs.delete_dir(tmp.path)


def remove_shard(dest: Location, name: str, ext: str) -> None:
    """Delete shard ``name`` and its stats (stats first, so a crash in between leaves an uncommitted shard)."""
    for loc in (dest.join(STATS_DIR, name + STATS_SUFFIX), dest.join(f"{name}.{ext}")):
        try:
            dest.fs.delete_file(loc.path)
        except (FileNotFoundError, OSError):
            pass


def commit_shard(dest: Location, name: str, ext: str, write: Callable[[BinaryIO], dict], stats: dict) -> dict:
    """Write shard ``DEST/NAME.EXT`` whole, then its stats.

    Args:
        write: writes the shard into the stream it is given and returns its counts (merged into the stats).
        stats: the rest of the stats (source part, options).

    Returns:
        The stats written to ``DEST/_stats/NAME.stats.json``.
    """
    remove_shard(dest, name, ext)
    tmp = dest.join(META_DIR, "tmp", f"{name}.{uuid.uuid4().hex}.{ext}")
    dest.fs.create_dir(dest.join(META_DIR, "tmp").path, recursive=True)
    try:
        with dest.fs.open_output_stream(tmp.path) as f:
            counts = write(f)
        dest.fs.move(tmp.path, dest.join(f"{name}.{ext}").path)
    except BaseException:
        try:
            dest.fs.delete_file(tmp.path)
        except OSError:
            pass
        raise
    full = {**stats, **counts}
    write_json(dest.join(STATS_DIR, name + STATS_SUFFIX), full, indent=1)
    return full
