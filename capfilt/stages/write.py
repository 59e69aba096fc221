"""The sink: commit each shard's rows as a Parquet part with its statistics (:mod:`capfilt.io.writer`)."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from capfilt.io.failures import fill_classes
from capfilt.io.filesystem import Location, locate
from capfilt.io.writer import (STATS_DIR, STATS_SUFFIX, commit_part, drop_staging, part_name, read_staged,
                               scan_output, stage_block, staged_blocks, staged_shards)
from capfilt.schema import SCHEMA_VERSION, SUCCESS, conform
from capfilt.stages.base import RunContext, Stage, column_or_nulls
from capfilt.stages.read import PART_ROWS

if TYPE_CHECKING:
    from capfilt.config import PipelineConfig

log = logging.getLogger(__name__)

#: Prefix of the internal per-row seconds columns (``_seconds_<stage name>``).
SECONDS_PREFIX = "_seconds_"

#: Schema of the rows the sink returns to the driver, one per committed part.
STATS_ROW_SCHEMA = pa.schema([("name", pa.string()), ("shard_id", pa.int64()), ("rows", pa.int64()),
                              ("stats", pa.string())])


def shard_stats(table: pa.Table, name: str, shard_id: int, run_id: str,
                stats_from: tuple[type[Stage], ...] = ()) -> dict[str, Any]:
    """Per-shard statistics written next to the shard (all counts are rows unless named otherwise).

    Keys: ``name``, ``shard_id``, ``run_id``, ``schema_version``, ``rows``, ``status`` (count per
    status), ``success``, then each stage's own counters (:meth:`Stage.stats` of ``stats_from``),
    ``seconds`` (per stage, summed over rows: stage wall time) and ``written_at`` (Unix seconds).
    """
    status = Counter(column_or_nulls(table, "status")) if "status" in table.column_names else Counter()
    out: dict[str, Any] = {"name": name, "shard_id": shard_id, "run_id": run_id, "schema_version": SCHEMA_VERSION,
                           "rows": table.num_rows, "status": dict(sorted(status.items())),
                           "success": status.get(SUCCESS, 0)}
    for cls in stats_from:
        out.update(cls.stats(table))
    out["seconds"] = {c[len(SECONDS_PREFIX):]: float(pc.sum(table.column(c)).as_py() or 0.0)
                      for c in table.column_names if c.startswith(SECONDS_PREFIX)}
    out["written_at"] = time.time()
    return out


class ShardWriter(Stage):
    """Write each batch as committed shard part(s); returns one small stats row per part.

    Input: the pipeline table with internal ``_shard`` (int64 shard id) and ``_offset`` (int64 row
    offset within the shard) columns. Rows of one shard are written together. A streaming block of
    a longer shard (it has ``_part_rows``, the rows its shard produces in this run, and fewer rows
    than that) is staged (:func:`capfilt.io.writer.stage_block`); the call that stages the last
    missing block commits the whole shard as one part and returns its stats row, the others
    return none. The output table
    (:data:`STATS_ROW_SCHEMA`: ``name: string, shard_id: int64, rows: int64, stats: string`` JSON)
    goes back to the driver, which never sees the image bytes.

    Args:
        output_uri: the output folder.
        schema: the run's shard schema (:func:`capfilt.stages.registry.output_schema`).
        run_id: stored in each part's statistics.
        compression: ``zstd`` | ``snappy`` | ``gzip`` | ``none``.
        stats_from: stage classes whose :meth:`Stage.stats` go into each part's statistics.
    """

    name: ClassVar[str] = "write"
    shape: ClassVar[str] = "sink"

    def __init__(self, output_uri: str, schema: pa.Schema, run_id: str, compression: str = "zstd",
                 stats_from: tuple[type[Stage], ...] = ()):
        self.output_uri = output_uri
        self.schema = schema
        self.run_id = run_id
        self.compression = None if compression == "none" else compression
        self.stats_from = tuple(stats_from)

    @classmethod
    def build(cls, cfg: PipelineConfig, ctx: RunContext) -> ShardWriter:
        """The writer of this run's output folder."""
        return cls(ctx.output_uri, ctx.schema, ctx.run_id, cfg.output.compression, ctx.stats_from)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = locate(self.output_uri)
        names, ids, rows, stats = [], [], [], []
        shard_col = batch.column("_shard").to_pylist()
        for shard_id in sorted(set(shard_col)):
            part = fill_classes(batch.filter(pc.equal(batch.column("_shard"), shard_id)))
            if PART_ROWS in part.column_names:
                expected = int(part.column(PART_ROWS)[0].as_py())
                if part.num_rows < expected:
                    part = self._gather(out, shard_id, part, expected)
                    if part is None:
                        continue  # the shard still waits for other blocks
            offset = int(pc.min(part.column("_offset")).as_py())
            name = part_name(shard_id, offset)
            st = shard_stats(part, name, shard_id, self.run_id, self.stats_from)
            table = conform(part, self.schema)
            commit_part(out, name, table, st, self.compression)
            if PART_ROWS in part.column_names:
                drop_staging(out, shard_id)
            names.append(name), ids.append(shard_id), rows.append(table.num_rows), stats.append(json.dumps(st))
        return pa.Table.from_arrays([pa.array(names, pa.string()), pa.array(ids, pa.int64()),
                                     pa.array(rows, pa.int64()), pa.array(stats, pa.string())],
                                    schema=STATS_ROW_SCHEMA)

    @staticmethod
    def _gather(out: Location, shard_id: int, block: pa.Table, expected: int) -> pa.Table | None:
        """Stage ``block``; if the shard's staged blocks now hold ``expected`` rows, return them all.

        Returns:
            The shard's rows sorted by offset (each key once), or ``None`` while blocks are missing
            (or when another writer committed the shard meanwhile and removed its staging).
        """
        stage_block(out, shard_id, int(pc.min(block.column("_offset")).as_py()), block)
        blocks = staged_blocks(out, shard_id)
        if sum(rows for _, _, rows in blocks) < expected:
            return None
        table = read_staged(out, blocks)
        if table is None:
            return None
        table = _unique_keys(table).sort_by("_offset")
        return table if table.num_rows >= expected else None


def _unique_keys(table: pa.Table) -> pa.Table:
    """``table`` with each ``key`` once (the first occurrence)."""
    seen: set[str] = set()
    take = []
    for i, k in enumerate(table.column("key").to_pylist()):
        if k not in seen:
            seen.add(k)
            take.append(i)
    return table if len(take) == table.num_rows else table.take(pa.array(take, pa.int64()))


def flush_staging(out: Location, schema: pa.Schema, run_id: str, stats_from: tuple[type[Stage], ...] = (),
                  compression: str | None = "zstd") -> list[str]:
    """Commit the staged blocks an interrupted run left (``_capfilt/staging/``) as parts.

    Called before a run plans its shards (so rows staged before a crash are not redone) and after
    the stream ends. Per shard, staged rows whose key a committed part already holds are dropped
    (the crash came between committing the shard and deleting its staging), the rest become one
    part named after their first offset, and the staging folder is deleted.

    Args:
        out: the output folder.
        schema: the run's shard schema (:func:`capfilt.stages.registry.output_schema`).
        run_id: recorded in the parts' statistics.
        stats_from: stage classes whose :meth:`Stage.stats` go into the statistics.
        compression: Parquet codec of the parts (``None`` for none).

    Returns:
        Readable notes, one per shard whose staging was flushed.
    """
    import pyarrow.parquet as pq

    shards = staged_shards(out)
    if not shards:
        return []
    parts, _ = scan_output(out)
    notes = []
    for shard_id in shards:
        blocks = staged_blocks(out, shard_id)
        table = read_staged(out, blocks) if blocks else None
        committed: set[str] = set()
        for p in parts:
            if shard_of(p.name) == shard_id:
                with out.fs.open_input_file(p.parquet) as f:
                    committed.update(pq.read_table(f, columns=["key"]).column("key").to_pylist())
        if table is not None and table.num_rows:
            table = _unique_keys(table)
            table = table.filter(pa.array([k not in committed for k in table.column("key").to_pylist()]))
        if table is not None and table.num_rows:
            table = table.sort_by("_offset")
            name = part_name(shard_id, int(table.column("_offset")[0].as_py()))
            st = shard_stats(table, name, shard_id, run_id, stats_from)
            commit_part(out, name, conform(table, schema), st, compression)
            notes.append(f"committed {table.num_rows} staged rows of shard {shard_id} as part {name}")
        drop_staging(out, shard_id)
    for n in notes:
        log.warning("%s: %s (left by an interrupted run)", out.uri, n)
    return notes


def shard_of(part: str) -> int:
    """The shard id of a part stem (``00012`` or ``00012-000250`` -> ``12``)."""
    return int(part.split("-", 1)[0])


def reconcile_parts(out: Location, run_id: str, stats_from: tuple[type[Stage], ...] = ()) -> list[str]:
    """Make every key appear in at most one committed part; return what was changed.

    Part names come from a shard id and the first row offset of the block that wrote them, so when
    Ray re-executes a lost block and its rows arrive split differently, a part of the first
    execution can overlap a part of the second (a stale sibling). Per shard, parts are taken
    largest first: a part whose keys are all in parts already taken is deleted; a part that
    overlaps them only in part is rewritten with the rows no other part has (statistics
    recomputed; stage seconds kept). Stats are removed before the Parquet file each time, so an
    interruption leaves an uncommitted leftover that resume redoes, never a duplicate.

    Args:
        out: the output folder.
        run_id: recorded in rewritten parts' statistics.
        stats_from: stage classes whose :meth:`Stage.stats` go into rewritten parts' statistics.

    Returns:
        Readable notes, one per deleted or rewritten part (empty when nothing overlapped).
    """
    import pyarrow.parquet as pq

    parts, _ = scan_output(out)
    by_shard: dict[int, list] = {}
    for p in parts:
        by_shard.setdefault(shard_of(p.name), []).append(p)
    notes: list[str] = []
    for shard_id, group in sorted(by_shard.items()):
        if len(group) < 2:
            continue
        keyed = []
        for p in group:
            with out.fs.open_input_file(p.parquet) as f:
                keyed.append((p, pq.read_table(f, columns=["key"]).column("key").to_pylist()))
        taken: set[str] = set()
        for p, keys in sorted(keyed, key=lambda pk: (-len(pk[1]), pk[0].name)):
            dup = [k in taken for k in keys]
            if not any(dup):
                taken.update(keys)
                continue
            stats_path = out.join(STATS_DIR, p.name + STATS_SUFFIX).path
            out.fs.delete_file(stats_path)
            if all(dup):
                out.fs.delete_file(p.parquet)
                notes.append(f"deleted part {p.name}: all {len(keys)} rows are in other parts of shard {shard_id}")
                continue
            with out.fs.open_input_file(p.parquet) as f:
                pf = pq.ParquetFile(f)
                compression = pf.metadata.row_group(0).column(0).compression
                table = pf.read()
            kept = table.filter(pa.array([not d for d in dup]))
            st = shard_stats(kept, p.name, shard_id, run_id, stats_from)
            st["seconds"] = p.stats.get("seconds", {})
            commit_part(out, p.name, kept.replace_schema_metadata(table.schema.metadata), st,
                        None if compression == "UNCOMPRESSED" else compression.lower())
            taken.update(k for k, d in zip(keys, dup) if not d)
            notes.append(f"rewrote part {p.name} without {sum(dup)} rows that other parts of shard {shard_id} hold")
    for n in notes:
        log.warning("%s: %s (a re-executed block wrote its rows under another split)", out.uri, n)
    return notes
