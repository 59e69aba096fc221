"""``capfilt export``: stream a capfilt output's committed parts into WebDataset or HF Parquet shards.

One source part at a time (one batch of rows in memory), one destination shard per part named after
it, each committed whole (:mod:`capfilt.export.commit`); a rerun skips the shards already done, so
an interrupted export finishes where it stopped. Every row is accounted for: per shard and in total,
rows in = rows written + rows filtered (by reason), and rows in = the rows the source's stats
promise; a mismatch stops the export with an :class:`~capfilt.errors.OutputError`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from capfilt.errors import OutputError, one_line, shorten, storage_error
from capfilt.export import commit, hf, webdataset
from capfilt.export.commit import EXPORT_JSON, SHARD_RE
from capfilt.export.source import Source, SourcePart, iter_batches, open_source, schema_of
from capfilt.io.filesystem import Location, locate
from capfilt.io.writer import META_DIR, write_bytes, write_json

Format = Literal["webdataset", "hf-parquet"]
FORMATS: dict[str, str] = {"webdataset": webdataset.EXT, "hf-parquet": hf.EXT}
#: Version of the export layout (in ``export.json`` and every shard's stats).
EXPORT_VERSION = 1


@dataclass(frozen=True)
class ShardResult:
    """One destination shard: its ``name``, ``stats`` (counts) and whether this run wrote it."""

    name: str
    stats: dict[str, Any]
    written_now: bool


@dataclass
class ExportResult:
    """What an export did.

    Attributes:
        dest: the destination folder's URI; ``format``: ``webdataset`` or ``hf-parquet``.
        shards: one per committed source part, in name order.
        skipped: names of the source's incomplete parts (no stats file: not exported).
        removed: destination shards deleted because their source part no longer exists.
        totals: counts summed over ``shards`` (``rows_in``, ``written``, ``filtered``, ``kept``...).
        train_data: the shards as one brace pattern (open_clip's ``--train-data``), or ``None``.
        notes: things the user should know (a run still running, an unreadable run record).
    """

    dest: str
    format: str
    shards: list[ShardResult]
    skipped: list[str]
    removed: list[str]
    totals: dict[str, Any]
    train_data: str | None
    notes: list[str] = field(default_factory=list)


def shard_pattern(dest_uri: str, names: list[str], ext: str) -> str | None:
    """``DEST/{00000..00012}.tar`` for contiguous 5-digit names, else a ``{a,b,c}`` brace list."""
    if not names:
        return None
    if len(names) == 1:
        return f"{dest_uri}/{names[0]}.{ext}"
    if all(len(n) == 5 for n in names) and [int(n) for n in names] == list(range(int(names[0]), int(names[-1]) + 1)):
        return f"{dest_uri}/{{{names[0]}..{names[-1]}}}.{ext}"
    return f"{dest_uri}/{{{','.join(names)}}}.{ext}"


def _sum(stats: list[dict[str, Any]]) -> dict[str, Any]:
    totals: dict[str, Any] = {k: sum(s.get(k) or 0 for s in stats)
                              for k in ("rows_in", "written", "web_scored", "web_kept", "image_bytes")}
    kept = [s.get("kept") for s in stats]
    totals["kept"] = None if stats and all(k is None for k in kept) else sum(k or 0 for k in kept)
    for key in ("filtered", "by_status"):
        c: Counter[str] = Counter()
        for s in stats:
            c.update(s.get(key) or {})
        totals[key] = dict(sorted(c.items()))
    return totals


def _check_counts(where: str, stats: dict[str, Any], expected_rows: int | None) -> None:
    """Raise :class:`OutputError` unless rows in = written + filtered (= ``expected_rows`` when known)."""
    filtered = sum((stats.get("filtered") or {}).values())
    if stats["rows_in"] != stats["written"] + filtered:
        raise OutputError(f"export of {where} lost rows: {stats['rows_in']:,} rows in but {stats['written']:,} "
                          f"written + {filtered:,} filtered. This is a bug in capfilt export; please report it.")
    if expected_rows is not None and stats["rows_in"] != expected_rows:
        raise OutputError(f"{where} holds {stats['rows_in']:,} rows but its stats file says {expected_rows:,}: the "
                          f"part was changed after it was committed. Rerun `capfilt run` on the output, then export "
                          f"again.")


def _prepare_dest(src: Source, dest: Location, fmt: str, all_rows: bool) -> dict[str, Any]:
    """Refuse a destination that is the source or holds something else; return the export record."""
    if type(dest.fs) is type(src.out.fs) and (dest.path.rstrip("/") + "/").startswith(src.out.path.rstrip("/") + "/"):
        where = "the output folder itself" if dest.path.rstrip("/") == src.out.path.rstrip("/") else "inside the output folder"
        raise OutputError(f"--to {dest.uri} is {where}, where its shards would mix with the run's (readers of "
                          f"{src.out.uri} would pick them up): give a folder outside it.")
    record = {"export_version": EXPORT_VERSION, "source": src.out.uri, "format": fmt, "all_rows": all_rows,
              "run_id": src.record.run_id if src.record else None}
    if dest.exists():
        if not dest.is_dir():
            raise OutputError(f"--to {dest.uri} is a file: give a folder for the export.")
        previous = commit.read_json(dest.join(META_DIR, EXPORT_JSON))
        if previous is None:
            if commit.top_files(dest) or dest.join(commit.STATS_DIR).exists():
                raise OutputError(f"--to {dest.uri} already holds files that are not a capfilt export (no "
                                  f"{META_DIR}/{EXPORT_JSON}): give an empty or new folder.")
        elif previous.get("format") != fmt or previous.get("source") != src.out.uri:
            raise OutputError(f"--to {dest.uri} holds a {previous.get('format')} export of {previous.get('source')}; "
                              f"this export is {fmt} of {src.out.uri}. Give another folder (or delete that one).")
    write_json(dest.join(META_DIR, EXPORT_JSON), {**record, "status": "running", "started": time.time()})
    return record


def export_output(out: str, fmt: Format, to: str, all_rows: bool = False,
                  on_shard: Callable[[ShardResult], None] | None = None,
                  rows_per_file: int | None = None) -> ExportResult:
    """Export the capfilt output ``out`` to ``to`` as WebDataset tars or HF Parquet, resumably.

    Args:
        out: a ``capfilt run`` output folder (local or ``s3://...``); only committed parts are read.
        fmt: ``webdataset`` (``NAME.tar`` + ``sizes.json``) or ``hf-parquet`` (``NAME.parquet`` + ``README.md``).
        to: the destination folder (local or ``s3://...``); created if missing; rerunning the same
            command skips the shards already done.
        all_rows: export every row with an image, not only the rows the filter kept.
        on_shard: called after each shard (written or found done), e.g. to print progress.
        rows_per_file: split each source part into files of at most this many of its rows
            (``NAME_0000.tar``, ``NAME_0001.tar``, ...; each committed and resumed on its own);
            ``None``: one file per part, named after it. Changing it rewrites the destination's files.

    Returns:
        :class:`ExportResult` (per-shard counts, totals, skipped incomplete parts).

    Raises:
        OutputError: ``out`` is not a capfilt output, ``to`` holds something else (or another export),
            a shard cannot be read or written, or the counts do not add up.
    """
    if fmt not in FORMATS:
        raise OutputError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if rows_per_file is not None and rows_per_file < 1:
        raise OutputError(f"--rows-per-file must be at least 1, not {rows_per_file}")
    src = open_source(out)
    try:
        dest = locate(to)
    except ValueError as e:
        raise OutputError(f"--to {to}: {e}") from None
    try:
        return _export(src, dest, fmt, all_rows, on_shard, rows_per_file)
    except OSError as e:
        why = storage_error(e) or shorten(one_line(e), 300)
        raise OutputError(f"cannot write the export to {dest.uri}: {why}. Fix the destination and rerun the same "
                          f"command: the shards already committed there are kept.") from None


def _files(src: Source, part: SourcePart, rows_per_file: int | None) -> list[tuple[str, int | None, int | None]]:
    """The destination files of ``part``: ``(name, first row, end row)``; one ``(part.name, None, None)``
    without ``rows_per_file``."""
    if not rows_per_file:
        return [(part.name, None, None)]
    n = part.rows if part.rows is not None else _footer_rows(src, part)
    count = max(1, -(-n // rows_per_file))
    return [(f"{part.name}_{i:04d}", i * rows_per_file, min(n, (i + 1) * rows_per_file)) for i in range(count)]


def _footer_rows(src: Source, part: SourcePart) -> int:
    """Rows of ``part`` from its Parquet footer (when its stats do not say)."""
    import pyarrow.parquet as pq

    with src.out.fs.open_input_file(part.path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def _export(src: Source, dest: Location, fmt: str, all_rows: bool,
            on_shard: Callable[[ShardResult], None] | None, rows_per_file: int | None = None) -> ExportResult:
    """:func:`export_output` once the source is open (storage errors propagate as ``OSError``)."""
    ext = FORMATS[fmt]
    record = {**_prepare_dest(src, dest, fmt, all_rows), "rows_per_file": rows_per_file}
    commit.clear_temporaries(dest)
    present = set(commit.top_files(dest))
    plan = [(part, f) for part in src.parts for f in _files(src, part, rows_per_file)]
    names = {f[0] for _, f in plan}
    removed = []
    for f in sorted(present):  # files of parts that are gone, or of another rows_per_file
        m = SHARD_RE.match(f)
        if m and m.group(2) == ext and m.group(1) not in names:
            commit.remove_shard(dest, m.group(1), ext)
            removed.append(m.group(1))

    results: list[ShardResult] = []
    for part, (name, start, stop) in plan:
        expect = {"export_version": EXPORT_VERSION, "format": fmt, "all_rows": all_rows,
                  "source": {"name": part.name, "size": part.size, "rows": part.rows}}
        if rows_per_file:
            expect.update(rows_per_file=rows_per_file, source_rows=[start, stop])
        stats = commit.is_done(dest, name, ext, expect, present)
        now = stats is None
        if now:
            stats = commit.commit_shard(dest, name, ext, _writer(src, part, fmt, all_rows, start, stop), expect)
        where = f"{src.out.uri}/{part.name}.parquet" + (f" rows {start}-{stop}" if start is not None else "")
        _check_counts(where, stats, part.rows if start is None else stop - start)
        results.append(ShardResult(name, stats, now))
        if on_shard:
            on_shard(results[-1])

    commit.clear_temporaries(dest)
    totals = _sum([r.stats for r in results])
    expected = sum(p.rows for p in src.parts if p.rows is not None)
    if all(p.rows is not None for p in src.parts) and totals["rows_in"] != expected:
        raise OutputError(f"export read {totals['rows_in']:,} rows but the committed parts hold {expected:,}; "
                          f"this is a bug in capfilt export; please report it.")
    _check_counts(f"{src.out.uri} (all committed parts)", totals, None)
    done = [r.name for r in results]
    if fmt == "webdataset":
        write_json(dest.join("sizes.json"), {f"{n}.{ext}": r.stats["written"] for n, r in zip(done, results)})
    else:
        write_bytes(dest.join("README.md"), hf.dataset_card(src, totals, all_rows).encode("utf-8"))
    notes = list(src.problems)
    if src.record and src.record.status in ("running", "interrupted", "failed", "incomplete"):
        notes.append(f"the run record says the run is {src.record.status!r}: the export holds what was committed "
                     f"so far; finish the run (`capfilt run` with the same command) and export again")
    result = ExportResult(dest.uri, fmt, results, list(src.incomplete), removed, totals,
                          shard_pattern(dest.uri, done, ext), notes)
    write_json(dest.join(META_DIR, EXPORT_JSON),
               {**record, "status": "partial" if src.incomplete else "complete", "finished": time.time(),
                "totals": totals, "shards": len(results), "skipped_incomplete": src.incomplete,
                "removed_stale": removed, "train_data": result.train_data})
    return result


def _writer(src: Source, part: SourcePart, fmt: str, all_rows: bool, start: int | None = None,
            stop: int | None = None):
    """The function that writes ``part``'s shard (its rows ``start:stop``; ``None``: all) into a stream
    and returns its counts."""
    default_ext = src.encode_format

    def rows():
        """The part's record batches, cut to ``start:stop``."""
        batches = iter_batches(src, part)
        return batches if start is None else _slice(batches, start, stop)

    def write(stream) -> dict:
        """Write the shard into the open output ``stream``; returns its counts (rows in, written, filtered)."""
        if fmt == "webdataset":
            return webdataset.write_tar(rows(), stream, all_rows, default_ext)
        return hf.write_parquet(rows(), stream, schema_of(src, part), all_rows, default_ext)

    return write


def _slice(batches, start: int, stop: int):
    """The rows ``start:stop`` of a stream of record batches (batches past ``stop`` are not read)."""
    pos = 0
    for b in batches:
        lo, hi = max(start - pos, 0), min(stop - pos, b.num_rows)
        if hi > lo:
            yield b.slice(lo, hi - lo)
        pos += b.num_rows
        if pos >= stop:
            return
