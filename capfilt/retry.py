"""``capfilt run ... --retry-failed``: fetch the failed rows of an output again and replace them in place.

A retry picks, in the committed parts of an output, the rows whose failure class (or status) is in
the wanted set (default: the transient classes, :data:`capfilt.io.failures.TRANSIENT_CLASSES`),
sends only those rows through the recipe's stages after ``read`` (download, filters, caption, score,
select), and puts each result back in place of its row: same key, same part, same position.

Commit protocol (a part is replaced whole; nothing is ever half-merged or duplicated):

1. :class:`RetryReadStage` (fanout) reads the picked rows of one part (identity and pass-through
   columns only, so the download stage fetches them afresh).
2. :class:`RetryWriter` (sink) *stages* each part's results under ``OUT/_capfilt/retry/``:
   ``<part>.<uuid>.parquet`` and then, last, ``<part>.<uuid>.json`` (its statistics) marking it complete.
3. The driver :func:`merge_staged`: per part, read the part and its staged rows, replace the rows by
   key, commit the new part with :func:`capfilt.io.writer.commit_part` (temporary file, move over the
   old part, statistics last), and only then delete the staged files (marker first).

A kill at any point leaves an output that the same command completes: staged files without their
marker are deleted and their rows retried again; complete staged files are merged at the start of the
next run (merging is idempotent: a row replaced twice by the same staged row is the same row).
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from capfilt import schema
from capfilt.config import ConfigError
from capfilt.io.failures import CLASSES, TRANSIENT_CLASSES, classes_of, fill_classes
from capfilt.io.filesystem import Location, locate
from capfilt.io.writer import META_DIR, CommittedPart, commit_part, scan_output, write_bytes
from capfilt.schema import conform
from capfilt.stages.base import RunContext, Stage
from capfilt.stages.write import STATS_ROW_SCHEMA, shard_of, shard_stats

if TYPE_CHECKING:
    from capfilt.config import PipelineConfig

log = logging.getLogger(__name__)

#: Where staged retry results live inside the output.
RETRY_DIR = "retry"
#: What ``--retry-failed`` with no list retries.
DEFAULT = "transient"

#: The input of :class:`RetryReadStage`: one row per part with rows to retry.
RETRY_SPEC_SCHEMA = pa.schema([("part", pa.string()), ("path", pa.string()), ("rows", pa.list_(pa.int64()))])


def wanted_set(items: Sequence[str] | None) -> frozenset[str]:
    """The classes and statuses to retry.

    Args:
        items: names from ``--retry-failed`` (classes of :data:`capfilt.io.failures.CLASSES`,
            statuses of :data:`capfilt.schema.STATUSES`, or ``transient``; each may be
            comma-separated); empty or ``None``: ``transient``.

    Returns:
        Class and status names; ``transient`` expands to :data:`TRANSIENT_CLASSES`.

    Raises:
        ConfigError: a name is neither a class nor a failure status (the message lists them).
    """
    names = [n.strip() for item in (items or [DEFAULT]) for n in item.split(",") if n.strip()] or [DEFAULT]
    out: set[str] = set()
    for n in names:
        if n == DEFAULT:
            out |= TRANSIENT_CLASSES
        elif n in CLASSES or (n in schema.STATUSES and n != schema.SUCCESS):
            out.add(n)
        else:
            raise ConfigError(f"--retry-failed: {n!r} is not a failure class or status. Classes: "
                              f"{', '.join(CLASSES)}; statuses: "
                              f"{', '.join(s for s in schema.STATUSES if s != schema.SUCCESS)}; or 'transient' "
                              f"(the default: {', '.join(sorted(TRANSIENT_CLASSES))}).")
    return frozenset(out)


def pick_rows(out: Location, parts: list[CommittedPart], wanted: frozenset[str]
              ) -> tuple[pa.Table, Counter[str]]:
    """The rows to retry, per part, and their classes.

    A row is picked when its ``error_class`` (:func:`capfilt.io.failures.classes_of`) or its ``status``
    is in ``wanted``.

    Returns:
        ``(specs, before)``: a :data:`RETRY_SPEC_SCHEMA` table (one row per part with picked rows,
        ``rows``: their 0-based positions in the part) and ``{class: picked rows}``.
    """
    specs, before = [], Counter()
    for p in parts:
        with out.fs.open_input_file(p.parquet) as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in ("status", "error_message", "error_class") if c in pf.schema_arrow.names]
            t = pf.read(columns=cols)
        status = t.column("status").to_pylist() if "status" in cols else [None] * t.num_rows
        rows = []
        for i, (s, c) in enumerate(zip(status, classes_of(t))):
            if (c is not None and c in wanted) or (s in wanted):
                rows.append(i)
                before[c or s] += 1
        if rows:
            specs.append({"part": p.name, "path": p.parquet, "rows": rows})
    return pa.Table.from_pylist(specs, schema=RETRY_SPEC_SCHEMA), before


class RetryReadStage(Stage):
    """Fanout: one spec row (a part and row positions) in, those rows of the part out.

    Output: the identity columns (``key``, ``url``, ``caption``) and pass-through input columns of the
    picked rows, plus internal ``_shard`` (int64, from the part name), ``_offset`` (int64, the row's
    position in the part) and ``_part`` (string, the part name); the download stage's and later
    stages' columns are dropped so that they are computed afresh.
    """

    name: ClassVar[str] = "read"
    shape: ClassVar[str] = "fanout"

    def __init__(self, output_uri: str):
        self.output_uri = output_uri

    def __call__(self, batch: pa.Table) -> pa.Table:
        loc = locate(self.output_uri)
        contract = schema.CONTRACT_COLUMNS - {f.name for f in schema.ID_FIELDS}
        tables = []
        for spec in batch.to_pylist():
            with loc.fs.open_input_file(spec["path"]) as f:
                pf = pq.ParquetFile(f)
                cols = [c for c in pf.schema_arrow.names if c not in contract]
                t = pf.read(columns=cols).replace_schema_metadata(None)
            rows = pa.array(spec["rows"], pa.int64())
            t = t.take(rows)
            t = t.append_column("_shard", pa.array([shard_of(spec["part"])] * t.num_rows, pa.int64()))
            t = t.append_column("_offset", rows)
            tables.append(t.append_column("_part", pa.array([spec["part"]] * t.num_rows, pa.string())))
        return pa.concat_tables(tables, promote_options="permissive")


class RetryWriter(Stage):
    """Sink: stage the retried rows of each part under ``OUT/_capfilt/retry/`` (marker last).

    Returns one :data:`capfilt.stages.write.STATS_ROW_SCHEMA` row per staged file (``name`` is the
    part's name; ``stats`` the staged rows' statistics as JSON).

    Args:
        output_uri: the output folder.
        schema: the run's shard schema (rows are cast to it).
        run_id: stored in the statistics.
        stats_from: stage classes whose :meth:`Stage.stats` go into the statistics.
    """

    name: ClassVar[str] = "write"
    shape: ClassVar[str] = "sink"

    def __init__(self, output_uri: str, schema: pa.Schema, run_id: str, stats_from: tuple[type[Stage], ...] = ()):
        self.output_uri, self.schema, self.run_id, self.stats_from = output_uri, schema, run_id, tuple(stats_from)

    @classmethod
    def build(cls, cfg: PipelineConfig, ctx: RunContext) -> RetryWriter:
        """The retry writer of this run's output folder."""
        return cls(ctx.output_uri, ctx.schema, ctx.run_id, ctx.stats_from)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = locate(self.output_uri)
        folder = out.join(META_DIR, RETRY_DIR)
        out.fs.create_dir(folder.path, recursive=True)
        names, ids, rows, stats = [], [], [], []
        parts = batch.column("_part").to_pylist()
        for part in sorted(set(parts)):
            t = fill_classes(batch.filter(pa.array([p == part for p in parts])))
            st = shard_stats(t, part, shard_of(part), self.run_id, self.stats_from)
            stem = f"{part}.{uuid.uuid4().hex}"
            write_bytes(folder.join(stem + ".parquet"), _parquet_bytes(conform(t, self.schema)))
            write_bytes(folder.join(stem + ".json"), json.dumps(st).encode())
            names.append(part), ids.append(shard_of(part)), rows.append(t.num_rows), stats.append(json.dumps(st))
        return pa.Table.from_arrays([pa.array(names, pa.string()), pa.array(ids, pa.int64()),
                                     pa.array(rows, pa.int64()), pa.array(stats, pa.string())],
                                    schema=STATS_ROW_SCHEMA)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _staged(out: Location) -> tuple[dict[str, list[str]], list[str]]:
    """Complete staged files by part name (stems, oldest first), and leftover paths (no marker)."""
    folder = out.join(META_DIR, RETRY_DIR)
    if not folder.exists():
        return {}, []
    infos = [i for i in out.fs.get_file_info(pafs.FileSelector(folder.path)) if i.type == pafs.FileType.File]
    names = {posixpath.basename(i.path): i for i in infos}
    complete: dict[str, list[tuple[float, str]]] = {}
    leftovers = []
    for name, info in names.items():
        stem, ext = posixpath.splitext(name)
        if ext == ".parquet" and stem + ".json" in names:
            complete.setdefault(stem.split(".", 1)[0], []).append((info.mtime_ns or 0, stem))
        elif ext == ".json" and stem + ".parquet" in names:
            continue
        else:
            leftovers.append(info.path)
    return {p: [s for _, s in sorted(v)] for p, v in complete.items()}, leftovers


def merge_staged(out: Location, run_id: str, stats_from: tuple[type[Stage], ...]) -> dict[str, Any]:
    """Merge every complete staged retry result into its part (see the module docs); delete leftovers.

    Each part with staged rows is rewritten whole: its rows whose key has a staged row are replaced
    (position kept, the latest staged row winning), its statistics recomputed (stage seconds: the old
    part's plus the retry's). A staged row whose key is in no part of that name is looked up in every
    committed part (the part was redone under another name after a crash); one whose key is nowhere
    is dropped (its row is not in the output, so the normal resume writes it).

    Returns:
        ``{"parts": parts rewritten, "rows": rows replaced, "status": {status: rows} of the merged rows,
        "error_class": {class: rows} of the merged rows that failed again}``.
    """
    staged, leftovers = _staged(out)
    for path in leftovers:
        out.fs.delete_file(path)
    result: dict[str, Any] = {"parts": 0, "rows": 0, "status": Counter(), "error_class": Counter()}
    if not staged:
        return {**result, "status": {}, "error_class": {}}
    folder = out.join(META_DIR, RETRY_DIR)
    parts = {p.name: p for p in scan_output(out)[0]}
    new_rows: dict[str, dict[str, Any]] = {}  # key -> staged row (latest wins)
    seconds: dict[str, Counter] = {}
    for part, stems in staged.items():
        for stem in stems:
            with out.fs.open_input_file(folder.join(stem + ".parquet").path) as f:
                t = pq.read_table(f)
            with out.fs.open_input_stream(folder.join(stem + ".json").path) as f:
                seconds.setdefault(part, Counter()).update(json.loads(f.read()).get("seconds") or {})
            for row in t.to_pylist():
                new_rows[row["key"]] = row
    homes = _homes(out, parts, staged, new_rows)
    for name, keys in sorted(homes.items()):
        p = parts[name]
        with out.fs.open_input_file(p.parquet) as f:
            pf = pq.ParquetFile(f)
            compression = pf.metadata.row_group(0).column(0).compression if pf.metadata.num_row_groups else "ZSTD"
            old = pf.read()
        rows = old.to_pylist()
        for i, row in enumerate(rows):
            if row["key"] in keys:
                rows[i] = {c: new_rows[row["key"]].get(c, row.get(c)) for c in old.column_names}
                result["rows"] += 1
                result["status"][rows[i].get("status")] += 1
                if rows[i].get("error_class"):
                    result["error_class"][rows[i]["error_class"]] += 1
        table = pa.Table.from_pylist(rows, schema=old.schema)
        st = shard_stats(table, name, shard_of(name), run_id, stats_from)
        st["seconds"] = dict(Counter(p.stats.get("seconds") or {}) + seconds.get(name, Counter()))
        commit_part(out, name, table, st, None if compression == "UNCOMPRESSED" else compression.lower())
        result["parts"] += 1
    for stems in staged.values():  # only now: a kill before this merges the same rows again next time
        for stem in stems:
            out.fs.delete_file(folder.join(stem + ".json").path)
            out.fs.delete_file(folder.join(stem + ".parquet").path)
    return {**result, "status": dict(result["status"]), "error_class": dict(result["error_class"])}


def _homes(out: Location, parts: dict[str, CommittedPart], staged: dict[str, list[str]],
           new_rows: dict[str, dict]) -> dict[str, set[str]]:
    """``{part name: staged keys it holds}``: a staged key's own part first, else any part holding it."""
    homes: dict[str, set[str]] = {}
    lost: set[str] = set(new_rows)
    key_cache: dict[str, set[str]] = {}

    def keys_of(name: str) -> set[str]:
        """The keys of committed part ``name`` (read once)."""
        if name not in key_cache:
            with out.fs.open_input_file(parts[name].parquet) as f:
                key_cache[name] = set(pq.read_table(f, columns=["key"]).column("key").to_pylist())
        return key_cache[name]

    # the part a staged result was picked from first, then any committed part (a part renamed since)
    for name in [n for n in staged if n in parts] + list(parts):
        if not lost:
            break
        found = keys_of(name) & lost
        if found:
            homes.setdefault(name, set()).update(found)
            lost -= found
    if lost:
        log.warning("%s: %d staged retry rows belong to no committed part and were dropped (the rows are "
                    "redone by the resume)", out.uri, len(lost))
    return homes


def retry_entry(wanted: frozenset[str], before: Counter, merged: dict[str, Any], started: float,
                interrupted: bool = False) -> dict[str, Any]:
    """The run record's ``retries`` entry of one ``--retry-failed`` pass.

    Keys: ``started`` / ``finished`` (Unix s), ``wanted`` (classes and statuses asked for), ``rows``
    (picked), ``before`` (``{class: rows}`` picked), ``after`` (``{success | class: rows}`` of the
    merged rows), ``succeeded``, ``still_failed``, ``parts_rewritten``.
    """
    after = {"success": merged["status"].get(schema.SUCCESS, 0), **merged["error_class"]}
    return {"started": started, "finished": time.time(), "wanted": sorted(wanted), "rows": sum(before.values()),
            "before": dict(sorted(before.items())), "after": {k: v for k, v in after.items() if v},
            "succeeded": after["success"], "still_failed": merged["rows"] - after["success"],
            "parts_rewritten": merged["parts"], **({"interrupted": True} if interrupted else {})}
