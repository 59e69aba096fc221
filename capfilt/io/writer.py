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

A shard that streams through the stages as several blocks (``output.block_rows``) is committed
whole all the same: each block is first *staged* as ``OUT/_capfilt/staging/SSSSS/OOOOOO-NNNNNN.parquet``
(its first row offset and row count; written to a temporary name and moved, like a part), and the
block that completes the shard gathers the staged blocks into one part and commits it by the
steps above, then deletes the staging folder. Staged blocks are invisible to readers of the
output; after a crash the next run turns them into parts before planning (nothing is redone).

On object stores (``s3://``, ``gs://``) there is no rename: pyarrow's ``move`` is a server-side
copy followed by a delete of the temporary object. A crash between the two leaves a shard object
without its stats object (plus a temporary object); resume treats both as leftovers, deletes them
and redoes those rows, so the stats-last rule keeps resume correct without an atomic rename.
Each object (shard, stats) appears whole or not at all, since S3 and GCS publish an upload only
when it completes. Retried Ray tasks rewrite the same part names, so a retry never duplicates rows.
"""

from __future__ import annotations

import json
import posixpath
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
    try:
        with loc.fs.open_output_stream(tmp) as f:
            f.write(data)
        loc.fs.move(tmp, loc.path)
    except OSError:  # a full disk: do not leave the half-written temporary behind
        try:
            loc.fs.delete_file(tmp)
        except OSError:  # best effort: scan_output deletes capfilt temp files on the next resume
            pass
        raise


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


STAGING_DIR = "staging"
STAGED_RE = re.compile(r"^(\d{6,})-(\d{6,})\.parquet$")


def staging_folder(out: Location, shard_id: int) -> Location:
    """``OUT/_capfilt/staging/SSSSS``: where the streamed blocks of one shard wait for the rest."""
    return out.join(META_DIR, STAGING_DIR, f"{shard_id:05d}")


def stage_block(out: Location, shard_id: int, offset: int, table: pa.Table) -> None:
    """Stage one streamed block of a shard (uncompressed Parquet, whole or not at all).

    The name holds the block's first row offset and row count, so a block Ray re-executes
    rewrites the same file and :func:`staged_blocks` counts it once.

    Args:
        out: the output folder.
        shard_id: the shard the block belongs to.
        offset: the block's first row offset within the shard.
        table: the block's rows with every column, internal ones included.
    """
    folder = staging_folder(out, shard_id)
    tmp = out.join(META_DIR, "tmp", f"staged-{shard_id:05d}-{offset:06d}.{uuid.uuid4().hex}.parquet")
    out.fs.create_dir(out.join(META_DIR, "tmp").path, recursive=True)
    out.fs.create_dir(folder.path, recursive=True)
    with out.fs.open_output_stream(tmp.path) as f:
        pq.write_table(table, f, compression="none")
    out.fs.move(tmp.path, folder.join(f"{offset:06d}-{table.num_rows:06d}.parquet").path)


def staged_blocks(out: Location, shard_id: int) -> list[tuple[str, int, int]]:
    """The staged blocks of a shard: ``(path, first row offset, rows)`` sorted by offset."""
    found = []
    for path in _files(staging_folder(out, shard_id), False):
        m = STAGED_RE.match(posixpath.basename(path))
        if m:
            found.append((path, int(m.group(1)), int(m.group(2))))
    return sorted(found, key=lambda b: b[1])


def staged_shards(out: Location) -> list[int]:
    """Shard ids that have a staging folder (blocks of a shard not yet committed)."""
    root = out.join(META_DIR, STAGING_DIR)
    if not root.exists():
        return []
    infos = root.fs.get_file_info(pafs.FileSelector(root.path, recursive=False))
    return sorted(int(i.base_name) for i in infos if i.type == pafs.FileType.Directory and i.base_name.isdigit())


def read_staged(out: Location, blocks: list[tuple[str, int, int]]) -> pa.Table | None:
    """The rows of ``blocks`` (from :func:`staged_blocks`) as one table, or ``None`` if one vanished.

    A block vanishes when another writer committed the shard and deleted its staging folder
    in the meantime.
    """
    tables = []
    for path, _offset, _rows in blocks:
        try:
            with out.fs.open_input_file(path) as f:
                tables.append(pq.read_table(f))
        except FileNotFoundError:
            return None
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def drop_staging(out: Location, shard_id: int) -> None:
    """Delete a shard's staging folder (after its part was committed); absent is fine."""
    folder = staging_folder(out, shard_id)
    try:
        out.fs.delete_dir(folder.path)
    except FileNotFoundError:
        pass  # already deleted (by the writer that committed the shard, or a flush): nothing to do


@dataclass(frozen=True)
class ShardListing:
    """A Parquet file found in an output folder by :func:`list_shards`.

    Attributes:
        name: path relative to the output folder (``00012.parquet``, ``sub/part-0.parquet``).
        path: filesystem path of the Parquet file.
        size: bytes.
        stats_path: filesystem path of its stats file, or ``None`` when it has none (an
            uncommitted part).
    """

    name: str
    path: str
    size: int
    stats_path: str | None


def stats_candidates(out_path: str, rel: str) -> tuple[str, ...]:
    """Where the stats file of shard ``rel`` (relative to the output folder) may be.

    ``OUT/_stats/<stem>.stats.json`` (this writer), or beside the shard as
    ``<stem>.stats.json`` / ``<name>.stats.json`` (img2dataset-style layouts).
    """
    stem = rel[: -len(".parquet")] if rel.endswith(".parquet") else rel
    return (posixpath.join(out_path, STATS_DIR, stem + STATS_SUFFIX),
            posixpath.join(out_path, stem + STATS_SUFFIX),
            posixpath.join(out_path, rel + STATS_SUFFIX))


def _files(loc: Location, recursive: bool) -> dict[str, int]:
    """Files under ``loc``: filesystem path -> size in bytes (empty if ``loc`` does not exist)."""
    if not loc.exists():
        return {}
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=recursive))
    return {i.path: int(i.size or 0) for i in infos if i.type == pafs.FileType.File}


def list_shards(out: Location, recursive: bool = False) -> tuple[list[ShardListing], dict[str, int]]:
    """The one scan of an output folder: its Parquet files and whether each has its stats file.

    Args:
        out: the output folder.
        recursive: also look in sub-folders (the report reads img2dataset-style outputs whose
            shards sit in sub-folders with stats beside them); ``_``- and ``.``-prefixed folders
            are skipped either way.

    Returns:
        ``(shards sorted by name, every file seen: path -> size)``.
    """
    files = _files(out, recursive)
    if not recursive:
        files.update(_files(out.join(STATS_DIR), False))
    shards = []
    for path, size in files.items():
        if not path.endswith(".parquet"):
            continue
        base = out.path.rstrip("/") + "/"
        rel = path[len(base):] if path.startswith(base) else posixpath.basename(path)  # no cwd (S3 keys)
        if any(part.startswith(("_", ".")) for part in rel.split("/")):
            continue
        stats = next((c for c in stats_candidates(out.path, rel) if c in files), None)
        shards.append(ShardListing(rel, path, size, stats))
    return sorted(shards, key=lambda s: s.name), files


def scan_output(out: Location) -> tuple[list[CommittedPart], list[str]]:
    """Committed parts of an output folder, and leftover files of interrupted writes.

    Returns:
        ``(parts, leftovers)``: ``parts`` have both ``NAME.parquet`` and ``_stats/NAME.stats.json``;
        ``leftovers`` are paths of capfilt-named parquet parts without stats and capfilt temporary
        files, to delete before resuming. Files with other names are never listed (nor deleted).
    """
    if not out.exists():
        return [], []
    shards, files = list_shards(out)
    parts, leftovers = [], []
    tops = {posixpath.basename(p) for p in files if posixpath.dirname(p) == out.path}
    for s in shards:
        if not is_capfilt_file(s.name):
            continue
        stem = s.name[: -len(".parquet")]
        expected = out.join(STATS_DIR, stem + STATS_SUFFIX).path
        if s.stats_path != expected:
            leftovers.append(s.path)
            continue
        with out.fs.open_input_stream(expected) as f:
            try:
                stats = json.loads(f.read())
            except ValueError:
                leftovers += [s.path, expected]
                continue
        parts.append(CommittedPart(stem, s.path, stats))
    for path in sorted(files):
        folder, name = posixpath.split(path)
        if folder == out.path and TMP_RE.match(name):
            leftovers.append(path)
        elif folder == out.join(STATS_DIR).path and (
                TMP_RE.match(name) or (name.endswith(STATS_SUFFIX)
                                       and name[: -len(STATS_SUFFIX)] + ".parquet" not in tops)):
            leftovers.append(path)
    leftovers += sorted(_files(out.join(META_DIR, "tmp"), True))
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
