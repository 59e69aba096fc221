"""Parquet shard parts, the commit protocol that makes resume safe, and scanning an output for them.

The sink stage that turns pipeline rows into parts is :class:`capfilt.stages.write.ShardWriter`.

A shard part is committed in three steps (img2dataset's "stats written last" rule):
1. write ``OUT/_capfilt/tmp/<name>.<uuid>.parquet``;
2. move it to ``OUT/<name>.parquet``;
3. write ``OUT/_stats/<name>.stats.json`` (also via a temporary name).
A ``.parquet`` without its ``.stats.json`` is an uncommitted leftover of a crash: resume deletes
it and redoes its rows. Stats live in ``_stats/`` rather than beside the shards (img2dataset's
layout) so that ``pd.read_parquet(OUT)``, ``pq.read_table(OUT)`` and HF ``datasets`` can read the
output folder directly: they skip ``_``-prefixed names. ``<name>`` is ``SSSSS`` (shard id) for a shard's first part, or
``SSSSS-OOOOOO`` when a part starts at row offset ``O`` of the shard (a resumed partial shard, or
a block Ray split).

On object stores (``s3://``, ``gs://``) there is no rename: pyarrow's ``move`` is a server-side
copy followed by a delete of the temporary object. A crash between the two leaves a shard object
without its stats object (plus a temporary object); resume treats both as leftovers, deletes them
and redoes those rows, so the stats-last rule keeps resume correct without an atomic rename.
Each object (shard, stats) appears whole or not at all, since S3 and GCS publish an upload only
when it completes. Retried Ray tasks rewrite the same part names, so a retry never duplicates rows.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from capfilt.io.filesystem import Location, locate

STATS_SUFFIX = ".stats.json"
STATS_DIR = "_stats"
META_DIR = "_capfilt"


#: Names capfilt writes at the top of an output folder; nothing else there is ever deleted.
PART_RE = re.compile(r"^\d{5}(-\d{6})?\.parquet$")
TMP_RE = re.compile(r"^.+\.[0-9a-f]{32}\.tmp$")


def is_capfilt_file(name: str) -> bool:
    """True for a shard part (``00012.parquet``, ``00012-000250.parquet``) or a capfilt temp file."""
    return bool(PART_RE.match(name) or TMP_RE.match(name))


def part_name(shard_id: int, offset: int) -> str:
    """File stem of a shard part: ``00012`` or ``00012-000250`` (offset within the shard)."""
    return f"{shard_id:05d}" if offset == 0 else f"{shard_id:05d}-{offset:06d}"


@dataclass(frozen=True)
class CommittedPart:
    """A committed shard part found in an output folder."""

    name: str
    parquet: str
    stats: dict


def write_bytes(loc: Location, data: bytes) -> None:
    """Write ``data`` to ``loc`` whole or not at all (temporary name, then move)."""
    tmp = loc.path + f".{uuid.uuid4().hex}.tmp"
    with loc.fs.open_output_stream(tmp) as f:
        f.write(data)
    loc.fs.move(tmp, loc.path)


def write_json(loc: Location, data: dict, indent: int = 2) -> None:
    """Write strict JSON atomically (:func:`write_bytes`), creating the parent folder.

    Raises:
        ValueError: ``data`` holds NaN or infinity (not JSON).
    """
    loc.fs.create_dir(loc.path.rsplit("/", 1)[0], recursive=True)
    write_bytes(loc, json.dumps(data, indent=indent, default=str, allow_nan=False).encode())


def commit_part(out: Location, name: str, table: pa.Table, stats: dict, compression: str | None) -> None:
    """Commit one shard part: Parquet under a temporary name, moved into place, then its stats.

    Args:
        out: the output folder.
        name: the part's stem (:func:`part_name`).
        table: the rows, already cast to the run's schema.
        stats: the part's statistics, written last to ``_stats/<name>.stats.json``.
        compression: Parquet codec (``zstd``, ``snappy``, ``gzip``) or ``None``.
    """
    tmp = out.join(META_DIR, "tmp", f"{name}.{uuid.uuid4().hex}.parquet")
    out.fs.create_dir(out.join(META_DIR, "tmp").path, recursive=True)
    with out.fs.open_output_stream(tmp.path) as f:
        pq.write_table(table, f, compression=compression)
    out.fs.move(tmp.path, out.join(f"{name}.parquet").path)
    out.fs.create_dir(out.join(STATS_DIR).path, recursive=True)
    write_bytes(out.join(STATS_DIR, name + STATS_SUFFIX), json.dumps(stats, indent=1).encode())


def scan_output(out: Location) -> tuple[list[CommittedPart], list[str]]:
    """Committed parts of an output folder, and leftover files of interrupted writes.

    Returns:
        ``(parts, leftovers)``: ``parts`` have both ``NAME.parquet`` and ``_stats/NAME.stats.json``;
        ``leftovers`` are paths of capfilt-named parquet parts without stats and capfilt temporary
        files, to delete before resuming. Files with other names are never listed (nor deleted).
    """
    if not out.exists():
        return [], []
    def listing(loc: Location) -> dict[str, str]:
        """Files directly in ``loc``: name -> filesystem path (empty if ``loc`` does not exist)."""
        if not loc.exists():
            return {}
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False))
        return {i.path.rsplit("/", 1)[-1]: i.path for i in infos if i.type == pafs.FileType.File}

    files, stats_files = listing(out), listing(out.join(STATS_DIR))
    parts, leftovers = [], []
    for fname, path in sorted(files.items()):
        if not is_capfilt_file(fname):
            continue
        if fname.endswith(".tmp"):
            leftovers.append(path)
        elif fname.endswith(".parquet"):
            stem = fname[: -len(".parquet")]
            if stem + STATS_SUFFIX in stats_files:
                with out.fs.open_input_stream(stats_files[stem + STATS_SUFFIX]) as f:
                    try:
                        stats = json.loads(f.read())
                    except ValueError:
                        leftovers += [path, stats_files[stem + STATS_SUFFIX]]
                        continue
                parts.append(CommittedPart(stem, path, stats))
            else:
                leftovers.append(path)
    leftovers += [p for n, p in stats_files.items()
                  if TMP_RE.match(n) or (n.endswith(STATS_SUFFIX) and n[: -len(STATS_SUFFIX)] + ".parquet" not in files)]
    tmp = out.join(META_DIR, "tmp")
    if tmp.exists():
        leftovers += [i.path for i in out.fs.get_file_info(pafs.FileSelector(tmp.path, recursive=True))
                      if i.type == pafs.FileType.File]
    return parts, leftovers


def committed_keys(out: Location, parts: list[CommittedPart]) -> list[str]:
    """Keys of every row in the committed parts (reads only the ``key`` column)."""
    keys: list[str] = []
    for p in parts:
        with out.fs.open_input_file(p.parquet) as f:
            keys += pq.read_table(f, columns=["key"]).column("key").to_pylist()
    return keys


def shard_files(out_uri: str) -> list[str]:
    """Paths of committed shard parquet files of an output, sorted by name."""
    out = locate(out_uri)
    parts, _ = scan_output(out)
    return [p.parquet for p in parts]
