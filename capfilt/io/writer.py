"""Shard writing and the commit protocol that makes resume safe.

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
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from capfilt.io.filesystem import Location, locate
from capfilt.schema import SCHEMA_VERSION, SOURCE_SYNTHETIC, SOURCE_WEB, SUCCESS, conform
from capfilt.stages.base import Stage

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


def _write_bytes(loc: Location, data: bytes) -> None:
    tmp = loc.path + f".{uuid.uuid4().hex}.tmp"
    with loc.fs.open_output_stream(tmp) as f:
        f.write(data)
    loc.fs.move(tmp, loc.path)


def shard_stats(table: pa.Table, name: str, shard_id: int, run_id: str) -> dict:
    """Per-shard statistics written next to the shard (all counts are rows unless named otherwise).

    Keys: ``rows``, ``status`` (count per status), ``keep`` (rows kept), ``texts_kept``
    (``web``/``synthetic``), ``seconds`` (per stage, summed over rows: stage wall time),
    ``images_captioned``, ``captions_generated``, ``texts_scored``, ``image_bytes``.
    """
    status = Counter(table.column("status").to_pylist()) if "status" in table.column_names else Counter()
    kept = int(pc.sum(table.column("keep")).as_py() or 0) if "keep" in table.column_names else 0
    sources = Counter()
    if "caption_sources" in table.column_names:
        for lst in table.column("caption_sources").to_pylist():
            sources.update(lst or [])
    seconds = {}
    for c in table.column_names:
        if c.startswith("_seconds_"):
            seconds[c[len("_seconds_"):]] = float(pc.sum(table.column(c)).as_py() or 0.0)
    texts_scored = int(pc.sum(table.column("_texts_score")).as_py() or 0) if "_texts_score" in table.column_names else 0
    n_caps, n_imgs = 0, 0
    if "synthetic_captions" in table.column_names:
        for lst in table.column("synthetic_captions").to_pylist():
            if lst is not None:
                n_imgs += 1
                n_caps += len(lst)
    img_bytes = 0
    if "image" in table.column_names:
        img_bytes = int(pc.sum(pc.binary_length(table.column("image"))).as_py() or 0)
    return {
        "name": name, "shard_id": shard_id, "run_id": run_id, "schema_version": SCHEMA_VERSION,
        "rows": table.num_rows, "status": dict(sorted(status.items())), "success": status.get(SUCCESS, 0),
        "keep": kept, "texts_kept": {SOURCE_WEB: sources.get(SOURCE_WEB, 0),
                                     SOURCE_SYNTHETIC: sources.get(SOURCE_SYNTHETIC, 0)},
        "seconds": seconds, "images_captioned": n_imgs, "captions_generated": n_caps,
        "texts_scored": texts_scored, "image_bytes": img_bytes, "written_at": time.time(),
    }


class ShardWriter(Stage):
    """Write each batch as committed shard part(s); returns one small stats row per part.

    Input: the pipeline table with internal ``_shard`` (int64 shard id) and ``_offset`` (int64 row
    offset within the shard) columns. Rows of one shard are written together; the output table
    (``name: string, shard_id: int64, rows: int64, stats: string`` JSON) goes back to the driver,
    which never sees the image bytes.
    """

    name: ClassVar[str] = "write"

    def __init__(self, output_uri: str, schema: pa.Schema, run_id: str, compression: str = "zstd"):
        self.output_uri = output_uri
        self.schema = schema
        self.run_id = run_id
        self.compression = None if compression == "none" else compression

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = locate(self.output_uri)
        names, ids, rows, stats = [], [], [], []
        shard_col = batch.column("_shard").to_pylist()
        for shard_id in sorted(set(shard_col)):
            part = batch.filter(pc.equal(batch.column("_shard"), shard_id))
            offset = int(pc.min(part.column("_offset")).as_py())
            name = part_name(shard_id, offset)
            st = shard_stats(part, name, shard_id, self.run_id)
            table = conform(part, self.schema)
            tmp = out.join(META_DIR, "tmp", f"{name}.{uuid.uuid4().hex}.parquet")
            out.fs.create_dir(out.join(META_DIR, "tmp").path, recursive=True)
            with out.fs.open_output_stream(tmp.path) as f:
                pq.write_table(table, f, compression=self.compression)
            out.fs.move(tmp.path, out.join(f"{name}.parquet").path)
            out.fs.create_dir(out.join(STATS_DIR).path, recursive=True)
            _write_bytes(out.join(STATS_DIR, name + STATS_SUFFIX), json.dumps(st, indent=1).encode())
            names.append(name), ids.append(shard_id), rows.append(table.num_rows), stats.append(json.dumps(st))
        return pa.table({"name": pa.array(names, pa.string()), "shard_id": pa.array(ids, pa.int64()),
                         "rows": pa.array(rows, pa.int64()), "stats": pa.array(stats, pa.string())})


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
