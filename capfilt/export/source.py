"""The export's input: a capfilt output folder's committed shard parts, read one batch at a time.

A part is committed when ``OUT/_stats/NAME.stats.json`` exists (:mod:`capfilt.io.writer`'s
stats-last rule); parts without it (an interrupted or running ``capfilt run``) are listed as
``incomplete`` and never exported. Which rows are exported and why the others are not is decided
here, once, for every format: :func:`row_fate`.
"""

from __future__ import annotations

import base64
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt import schema
from capfilt.errors import OutputError, one_line, shorten
from capfilt.io.filesystem import Location, locate
from capfilt.io.run_record import RunRecord, read_run_record
from capfilt.io.writer import list_shards

#: Rows handed to a writer at a time. pyarrow decodes one Parquet row group at a time, so memory is
#: bounded by a row group (capfilt's writer puts a part in one) plus this batch as Python objects.
BATCH_ROWS = 256
#: Leading bytes of the image formats capfilt stores, and the file extension each gets.
MAGIC: tuple[tuple[bytes, int, str], ...] = ((b"\xff\xd8\xff", 0, "jpg"), (b"\x89PNG\r\n\x1a\n", 0, "png"),
                                             (b"WEBP", 8, "webp"), (b"GIF8", 0, "gif"))


@dataclass(frozen=True)
class SourcePart:
    """A committed shard part of the output being exported.

    Attributes:
        name: the part's stem (``00012``, ``00012-000250``); the destination shard gets the same name.
        path: filesystem path of its Parquet file.
        size: bytes of the Parquet file (a changed size means the part was rewritten).
        rows: rows its stats file says it holds (``None`` if the stats do not say).
    """

    name: str
    path: str
    size: int
    rows: int | None


@dataclass(frozen=True)
class Source:
    """A capfilt output opened for export.

    Attributes:
        out: its location.
        parts: committed parts, sorted by name.
        incomplete: names of Parquet files without their stats file (skipped).
        record: the run record (``None`` when missing or unreadable; ``problems`` says why).
    """

    out: Location
    parts: list[SourcePart]
    incomplete: list[str]
    record: RunRecord | None
    problems: list[str]

    @property
    def encode_format(self) -> str | None:
        """``download.encode_format`` of the run (``jpg``, ``png``, ``webp``), if the record has it."""
        cfg = (self.record.config if self.record else None) or {}
        fmt = (cfg.get("download") or {}).get("encode_format")
        return fmt if isinstance(fmt, str) else None


def open_source(uri: str) -> Source:
    """List the committed parts of the capfilt output ``uri`` (local or ``s3://...``).

    Raises:
        OutputError: ``uri`` is not a folder, or holds neither shards nor ``_capfilt/run.json``
            (not a capfilt output), or cannot be listed.
    """
    try:
        return _open_source(locate(uri))
    except (OSError, ValueError) as e:  # ValueError: a URI scheme with no filesystem
        raise OutputError(f"cannot read the output {uri} ({shorten(one_line(e), 300)}): check the path and, for "
                          f"s3://, the AWS_* credentials and endpoint.") from None


def _open_source(out: Location) -> Source:
    import json

    if not out.is_dir():
        raise OutputError(f"{out.uri} is not a capfilt output folder (it does not exist or is a file): give "
                          f"the --output folder of a `capfilt run`.")
    shards, _ = list_shards(out)
    record, problems = read_run_record(out)
    if not shards and record is None:
        raise OutputError(f"{out.uri} is not a capfilt output: it holds no Parquet shards and no _capfilt/run.json. "
                          f"Give the --output folder of a `capfilt run`.")
    parts, incomplete = [], []
    for s in shards:
        if s.stats_path is None:
            incomplete.append(s.name)
            continue
        try:
            with out.fs.open_input_stream(s.stats_path) as f:
                stats = json.loads(f.read())
        except (OSError, ValueError):
            incomplete.append(s.name)
            continue
        rows = stats.get("rows") if isinstance(stats, dict) else None
        parts.append(SourcePart(s.name[: -len(".parquet")], s.path, s.size,
                                rows if isinstance(rows, int) and not isinstance(rows, bool) else None))
    return Source(out, parts, incomplete, record, problems)


def iter_batches(src: Source, part: SourcePart, batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The rows of ``part``, ``batch_rows`` at a time (one row group decoded in memory at a time).

    Raises:
        OutputError: the part cannot be read as Parquet (names the file and what to do).
    """
    try:
        with src.out.fs.open_input_file(part.path) as f:
            pf = pq.ParquetFile(f)
            if "key" not in pf.schema_arrow.names:
                raise OutputError(f"{src.out.uri}/{part.name}.parquet has no 'key' column: it is not a capfilt "
                                  f"shard. Move it out of the output folder and export again.")
            yield from pf.iter_batches(batch_size=batch_rows)
    except (OSError, pa.ArrowException) as e:
        raise OutputError(f"cannot read {src.out.uri}/{part.name}.parquet ({e}); the file is damaged: rerun "
                          f"`capfilt run` on the output (it redoes uncommitted parts) and export again.") from None


def schema_of(src: Source, part: SourcePart) -> pa.Schema:
    """The Arrow schema of ``part`` (reads the Parquet footer only)."""
    with src.out.fs.open_input_file(part.path) as f:
        return pq.ParquetFile(f).schema_arrow


def image_ext(data: bytes, default: str | None = None) -> str:
    """File extension for stored image bytes: sniffed from the leading bytes (``jpg``, ``png``,
    ``webp``, ``gif``), else ``default`` (the run's ``download.encode_format``), else ``jpg``."""
    for magic, at, ext in MAGIC:
        if data[at:at + len(magic)] == magic:
            return ext
    return default or "jpg"


def best_caption(row: dict[str, Any]) -> tuple[str, str]:
    """The text a trainer should read for ``row``, and where it came from.

    Returns:
        ``(text, source)``: the first kept caption (``captions[0]``, ranked by the select stage;
        source ``kept:web`` / ``kept:synthetic``), else the web caption (``web``), else the first
        synthetic caption (``synthetic``), else ``("", "none")``.
    """
    kept = row.get("captions") or []
    if kept and kept[0] is not None:
        sources = row.get("caption_sources") or []
        return kept[0], f"kept:{sources[0] if sources else 'unknown'}"
    if row.get("caption"):
        return row["caption"], schema.SOURCE_WEB
    syn = [t for t in (row.get("synthetic_captions") or []) if t]
    if syn:
        return syn[0], schema.SOURCE_SYNTHETIC
    return "", "none"


def row_fate(row: dict[str, Any], all_rows: bool) -> str | None:
    """Why ``row`` is not exported, or ``None`` when it is.

    Args:
        row: one output row (``keep`` absent for a download-only recipe: then a ``success`` row with
            an image counts as kept).
        all_rows: export every row with image bytes, kept or not.

    Returns:
        ``None`` (export it), ``not_kept:<drop_reason>`` (the filter dropped it; only without
        ``all_rows``), ``no_image:<status>`` (no image bytes to export) or, for a download-only
        output without ``all_rows``, ``not_kept:<status>`` (an image whose status is not ``success``).
    """
    status = row.get("status") or "unknown"
    if not all_rows and "keep" in row and not row["keep"]:
        return f"not_kept:{row.get('drop_reason') or status}"
    if not row.get("image"):
        return f"no_image:{status}"
    if not all_rows and "keep" not in row and status != schema.SUCCESS:
        return f"not_kept:{status}"
    return None


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON data: NaN/inf become ``None``, bytes base64 text, others ``str``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


@dataclass
class Tally:
    """Counts of one destination shard: every row in is either written or filtered with a reason.

    Attributes:
        rows_in: rows read from the source part.
        written: rows exported.
        filtered: ``{reason: rows}`` not exported (:func:`row_fate`).
        by_status: ``{status: rows}`` over the rows in.
        kept: rows the filter kept (``keep``; ``None`` for a download-only output).
        web_scored / web_kept: successful rows whose web caption was scored, and those among them whose
            web caption the filter kept (``caption_sources`` holds ``web``): BLIP's noise ratio is
            ``1 - web_kept / web_scored``.
        image_bytes: bytes of the exported images.
    """

    rows_in: int = 0
    written: int = 0
    filtered: Counter = field(default_factory=Counter)
    by_status: Counter = field(default_factory=Counter)
    kept: int | None = None
    web_scored: int = 0
    web_kept: int = 0
    image_bytes: int = 0

    def see(self, row: dict[str, Any], all_rows: bool) -> str | None:
        """Count ``row`` in; return :func:`row_fate` (``None``: export it, then call :meth:`wrote`)."""
        self.rows_in += 1
        status = row.get("status") or "unknown"
        self.by_status[status] += 1
        if "keep" in row:
            self.kept = (self.kept or 0) + bool(row["keep"])
        if status == schema.SUCCESS and row.get("caption") is not None and any(
                k.startswith("web_") and not k.startswith("web_lang") and isinstance(v, float) and math.isfinite(v)
                for k, v in row.items()):
            self.web_scored += 1
            self.web_kept += schema.SOURCE_WEB in (row.get("caption_sources") or [])
        reason = row_fate(row, all_rows)
        if reason is not None:
            self.filtered[reason] += 1
        return reason

    def wrote(self, image_bytes: int) -> None:
        """Count one exported row holding ``image_bytes`` bytes of image."""
        self.written += 1
        self.image_bytes += image_bytes

    def to_json(self) -> dict[str, Any]:
        """The counts as the shard's stats (sorted reason and status maps)."""
        return {"rows_in": self.rows_in, "written": self.written, "filtered": dict(sorted(self.filtered.items())),
                "by_status": dict(sorted(self.by_status.items())), "kept": self.kept,
                "web_scored": self.web_scored, "web_kept": self.web_kept, "image_bytes": self.image_bytes}
