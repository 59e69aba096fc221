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
from capfilt.io.writer import STATS_DIR, STATS_SUFFIX, commit_part, part_name, scan_output
from capfilt.schema import SCHEMA_VERSION, SUCCESS, conform
from capfilt.stages.base import RunContext, Stage, column_or_nulls

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
    offset within the shard) columns. Rows of one shard are written together; the output table
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
            offset = int(pc.min(part.column("_offset")).as_py())
            name = part_name(shard_id, offset)
            st = shard_stats(part, name, shard_id, self.run_id, self.stats_from)
            table = conform(part, self.schema)
            commit_part(out, name, table, st, self.compression)
            names.append(name), ids.append(shard_id), rows.append(table.num_rows), stats.append(json.dumps(st))
        return pa.Table.from_arrays([pa.array(names, pa.string()), pa.array(ids, pa.int64()),
                                     pa.array(rows, pa.int64()), pa.array(stats, pa.string())],
                                    schema=STATS_ROW_SCHEMA)


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
