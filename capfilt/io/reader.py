"""Input discovery, up-front validation and row reading (img2dataset's reader, CapFilt flavour).

Formats: Parquet, CSV/TSV (with or without a header row), JSONL, plain ``.txt`` URL lists (one URL
per line; no delimiter parsing, so URLs with commas survive), and COCO caption annotation files
(``captions_*.json``: one row per annotation, ``url`` = the image's ``coco_url``). Column names follow img2dataset's
``--url_col`` / ``--caption_col``; by default they are found case-insensitively (LAION's
``URL``/``TEXT``, img2dataset's ``url``/``caption``/``txt``).

Every row gets a stable key ``FFFF_RRRRRRRRR`` (input file index in sorted order, row index in
that file, both 0-based), so keys are unique in a run and the same on every rerun.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from capfilt.config import InputConfig
from capfilt.errors import InputError
from capfilt.io.filesystem import Location, locate
from capfilt.io.readcache import ReadCache
from capfilt.schema import CONTRACT_COLUMNS, DROPPED_INPUT_COLUMNS

URL_ALIASES = ("url", "image_url", "img_url", "imageurl", "link")
CAPTION_ALIASES = ("caption", "text", "txt", "alt", "alt_text", "alttext", "title")
SUFFIX_FORMATS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
                  ".ndjson": "jsonl", ".txt": "txt"}
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"
URL_PREFIXES = ("http://", "https://")
#: Rows of the URL column sampled at inspection for the "mostly not URLs" warning.
URL_SAMPLE_ROWS = 1000

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputFile:
    """One input file: where it is, its index in the run (key prefix), its format and row count.

    ``url_col`` / ``caption_col`` are the resolved source column names (``caption_col`` may be
    ``None``: no web captions). ``passthrough`` lists ``(source name, output name, type)``.
    """

    index: int
    uri: str
    format: str
    num_rows: int
    url_col: str
    caption_col: str | None
    passthrough: tuple[tuple[str, str, pa.DataType], ...] = field(default=())
    has_header: bool = True


def _is_side_file(name: str) -> bool:
    return name.startswith((".", "_")) or name.endswith((".crc", ".tmp")) or name == "_SUCCESS"


def discover(inputs: list[str], input_format: str = "auto") -> list[Location]:
    """Expand files and folders into the sorted list of input files.

    Folders are walked recursively; side files (``.crc``, ``_SUCCESS``, dot- and underscore-files,
    and anything under such folders) are ignored; with ``input_format='auto'`` only known suffixes
    (.parquet .csv .tsv .jsonl .json .ndjson .txt) count.

    Raises:
        InputError: a path does not exist, or a folder holds no input file.
    """
    found: list[Location] = []
    for uri in inputs:
        try:
            loc = locate(uri)
        except ValueError as e:
            raise InputError(str(e)) from None
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"input {uri} does not exist")
        if info.type == pafs.FileType.File:
            found.append(loc)
            continue
        entries = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
        files = []
        for e in entries:
            if e.type != pafs.FileType.File:
                continue
            rel = e.path[len(loc.path):].lstrip("/")
            if any(_is_side_file(part) for part in rel.split("/")):
                continue
            if input_format == "auto" and _suffix(e.path) not in SUFFIX_FORMATS:
                continue
            files.append(Location(loc.fs, e.path, loc.join(rel).uri))
        if not files:
            raise InputError(f"input folder {uri} holds no input files (.parquet, .csv, .tsv, .jsonl, .txt)")
        found.extend(sorted(files, key=lambda x: x.path))
    seen: dict[str, str] = {}
    for loc in found:
        ident = os.path.realpath(loc.path) if loc.is_local else loc.path  # symlinks, ./a/../b spellings
        if ident in seen:
            raise InputError(f"input file {loc.uri} is given twice (also as {seen[ident]}; both are {ident}); "
                             f"every row would be processed twice. Name each file or folder once.")
        seen[ident] = loc.uri
    return found


def _suffix(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""


#: Suffixes of image files, which are not metadata (a common first mistake: ``--input photo.jpg``).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".avif"}


def detect_format(loc: Location, input_format: str) -> str:
    """The file's format: ``input_format`` unless ``auto``, else from the suffix.

    Raises:
        InputError: unknown suffix with ``auto``.
    """
    if input_format != "auto":
        return input_format
    fmt = SUFFIX_FORMATS.get(_suffix(loc.path))
    if fmt == "jsonl" and _suffix(loc.path) == ".json" and _is_coco(loc):
        return "coco"
    if fmt is None:
        if _suffix(loc.path) in IMAGE_SUFFIXES:
            raise InputError(f"{loc.uri} is an image, but --input takes metadata: a table of image URLs and captions "
                             f"(Parquet, CSV/TSV, JSONL, or a .txt list of URLs). To curate local images, list "
                             f"them as file:// URLs in a CSV (url,caption) and pass --allow-file-urls.")
        raise InputError(f"{loc.uri}: unknown input format; use --input-format parquet|csv|tsv|jsonl|txt")
    return fmt


def _is_coco(loc: Location) -> bool:
    """True for a COCO caption-annotation file (one JSON object with ``images`` and ``annotations``)."""
    data = _read_bytes(loc)
    if not data.lstrip().startswith(b"{") or b'"annotations"' not in data:
        return False
    try:
        doc = json.loads(data)
    except ValueError:  # several JSON objects: JSON Lines
        return False
    return isinstance(doc, dict) and "images" in doc and "annotations" in doc


def _coco_table(uri: str, data: bytes) -> pa.Table:
    """COCO captions JSON -> one row per annotation: url (coco_url), caption, image_id, annotation_id,
    file_name, flickr_url (COCO's ``captions_*.json`` format, cocodataset.org/#format-data)."""
    try:
        doc = json.loads(data)
        images = {im["id"]: im for im in doc["images"]}
        anns = doc["annotations"]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{uri}: not a COCO caption file ({e}); expected {{'images': [...], 'annotations': "
                         f"[...]}}") from None
    rows = []
    for a in anns:
        im = images.get(a.get("image_id"), {})
        rows.append({"url": im.get("coco_url") or im.get("flickr_url"), "caption": a.get("caption"),
                     "image_id": a.get("image_id"), "annotation_id": a.get("id"),
                     "file_name": im.get("file_name"), "flickr_url": im.get("flickr_url")})
    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("image_id", pa.int64()),
                        ("annotation_id", pa.int64()), ("file_name", pa.string()), ("flickr_url", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def _read_bytes(loc: Location) -> bytes:
    with loc.fs.open_input_stream(loc.path) as f:
        return f.read()


def _read_text_table(uri: str, fmt: str, has_header: bool) -> pa.Table:
    """Parse a whole text-format file (no cache here: :func:`read_rows` takes a run's :class:`ReadCache`)."""
    loc = locate(uri)
    data = _read_bytes(loc)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:  # e.g. a Latin-1 CSV: bad bytes become U+FFFD rather than a crash
        data = data.decode("utf-8", errors="replace").encode("utf-8")
    if fmt == "txt":
        lines = data.decode("utf-8", errors="replace").splitlines()
        urls = [ln.strip() for ln in lines if ln.strip()]
        return pa.table({"url": pa.array(urls, pa.string())})
    if fmt == "coco":
        return _coco_table(uri, data)
    if fmt == "jsonl":
        rows = []
        for i, line in enumerate(data.decode("utf-8", errors="replace").splitlines()):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{uri}: line {i + 1} is not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(obj, dict):
                raise InputError(f"{uri}: line {i + 1} is not a JSON object")
            rows.append(obj)
        if not rows:
            return pa.table({})
        try:
            return pa.Table.from_pylist(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # heterogeneous value types across lines: fall back to strings
            keys = list(dict.fromkeys(k for r in rows for k in r))
            return pa.table({k: pa.array([None if r.get(k) is None else str(r.get(k)) for r in rows], pa.string())
                             for k in keys})
    delim = "\t" if fmt == "tsv" else ","
    parse = pacsv.ParseOptions(delimiter=delim, quote_char=False if fmt == "tsv" else '"',
                               newlines_in_values=fmt == "csv")
    read = pacsv.ReadOptions(autogenerate_column_names=not has_header, block_size=1 << 24)
    conv = pacsv.ConvertOptions(strings_can_be_null=False, quoted_strings_can_be_null=False)
    try:
        table = pacsv.read_csv(io.BytesIO(data), read_options=read, parse_options=parse, convert_options=conv)
    except pa.ArrowInvalid as e:
        raise InputError(f"{uri}: cannot parse as {fmt.upper()}: {e}. If it is a plain URL list, name it .txt "
                         f"or pass --input-format txt") from None
    if not has_header:  # columns are named by position; inspect_inputs finds the URL/caption among them
        table = table.rename_columns([f"col{i}" for i in range(table.num_columns)])
    # all text columns as strings, so every shard has the same types
    return pa.table({n: table.column(n).cast(pa.string()) for n in table.column_names})


def looks_like_url(value: object) -> bool:
    """True when ``value`` is text starting with ``http://`` or ``https://`` (case-insensitive)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return isinstance(value, str) and value.strip().lower().startswith(URL_PREFIXES)


def _first_row_cells(loc: Location, fmt: str) -> list[str]:
    """The cells of the first line of a CSV/TSV file (CSV quoting honoured; at most 64 KiB read)."""
    with loc.fs.open_input_stream(loc.path) as f:
        head = f.read(1 << 16).decode("utf-8", errors="replace")
    lines = head.splitlines()
    if not lines:
        return []
    if fmt == "tsv":
        return lines[0].split("\t")
    try:
        return next(csv.reader([lines[0]]), [])
    except csv.Error:
        return lines[0].split(",")


def _text_has_header(loc: Location, fmt: str, want_header: bool | str) -> bool:
    """CSV/TSV: whether line 1 is a header row.

    ``want_header`` ``True``/``False`` is obeyed; ``"auto"`` says yes unless a cell of line 1 looks
    like an http(s) URL, whichever column it is in (CC3M's ``caption<TAB>url`` as much as
    ``url,caption``). Other formats always name their columns.
    """
    if fmt not in ("csv", "tsv"):
        return True
    if want_header != "auto":
        return bool(want_header)
    return not any(looks_like_url(c) for c in _first_row_cells(loc, fmt))


def _schema_of(loc: Location, fmt: str, has_header: bool) -> tuple[pa.Schema, int, pa.Table | None]:
    """Schema and row count of one file, and for text formats the parsed table (else ``None``)."""
    if fmt == "parquet":
        with loc.fs.open_input_file(loc.path) as f:
            head = f.read(len(LFS_POINTER_PREFIX))
            if head.startswith(LFS_POINTER_PREFIX):
                raise InputError(f"{loc.uri} is a Git-LFS pointer, not a Parquet file: run `git lfs pull` "
                                 f"in its repository (or download the real file) and rerun")
            f.seek(0)
            try:
                meta = pq.ParquetFile(f).metadata
                schema = pq.ParquetFile(f).schema_arrow
            except (pa.ArrowInvalid, OSError) as e:
                raise InputError(f"{loc.uri} is not a readable Parquet file ({e}); check that it was fully "
                                 f"copied, or remove it from the input") from None
        return schema, meta.num_rows, None
    table = _read_text_table(loc.uri, fmt, has_header)
    return table.schema, table.num_rows, table


def _head(loc: Location, table: pa.Table | None, col: str, n: int = URL_SAMPLE_ROWS) -> list:
    """The first ``n`` values of column ``col`` (Parquet: only the first batch is decoded)."""
    if table is not None:
        values = table.column(col).slice(0, n)
    else:
        with loc.fs.open_input_file(loc.path) as f:
            values = next(iter(pq.ParquetFile(f).iter_batches(batch_size=n, columns=[col])), None)
        if values is None:
            return []
        values = values.column(0)
    typ = values.type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_binary(typ) \
            or pa.types.is_large_binary(typ):
        values = _clean_strings(values)
    return values.to_pylist()


def _find_column(names: list[str], wanted: str | int | None, aliases: tuple[str, ...]) -> str | None:
    """The column ``wanted`` names: a name (exact, then case-insensitive), else a 0-based position
    (an int, or a string of digits that is no column's name); ``None``: the first alias present."""
    lower = {n.lower(): n for n in names}
    if isinstance(wanted, int):
        return names[wanted] if wanted < len(names) else None
    if wanted:
        found = wanted if wanted in names else lower.get(wanted.lower())
        if found is None and wanted.strip().isdigit() and int(wanted) < len(names):
            found = names[int(wanted)]
        return found
    for a in aliases:
        if a in lower:
            return lower[a]
    return None


def _headerless_columns(names: list[str], head: dict[str, list], cfg: InputConfig) -> tuple[str, str | None]:
    """URL and caption columns of a file without a header row (columns ``col0, col1, ...``).

    Unset, the URL column is the first whose first value is an http(s) URL (else ``col0``) and the
    caption column the first other one, so ``url,caption`` and ``caption<TAB>url`` both read right.
    """
    url = _find_column(names, cfg.url_col, ()) if cfg.url_col is not None else None
    if cfg.url_col is None:
        url = next((n for n in names if head[n] and looks_like_url(head[n][0])), names[0])
    if cfg.caption_col is not None:
        return url, _find_column(names, cfg.caption_col, ())
    return url, next((n for n in names if n != url), None)


def _warn_if_not_urls(uri: str, col: str, values: list) -> None:
    """Log a warning when most of ``values`` (the URL column's first rows) are not http(s) URLs."""
    present = [v for v in values if v is not None and str(v).strip()]
    if not present:
        return
    bad = sum(not looks_like_url(v) for v in present)
    if bad / len(present) > 0.5:
        log.warning("%s: %.0f%% of the first %d values of the URL column %r are not http(s) URLs (e.g. %r), "
                    "so those rows will fail as invalid_url. If the URLs are in another column, name it with "
                    "--url-col NAME or --url-col POSITION (0-based; with --caption-col likewise).",
                    uri, 100 * bad / len(present), len(present), col, str(present[0])[:80])


def inspect_inputs(inputs: list[str], cfg: InputConfig) -> list[InputFile]:
    """Find, open and check every input file before any work starts.

    Returns:
        One :class:`InputFile` per file, in key order.

    Raises:
        InputError: a file is missing, unreadable (corrupt Parquet, Git-LFS pointer), lacks the URL
            column (the message names the file, its columns and ``--url-col``), lacks an explicitly
            requested caption or ``--keep-columns`` column, or has a column type that conflicts with
            another file's.
    """
    files = discover(inputs, cfg.input_format)
    out: list[InputFile] = []
    for idx, loc in enumerate(files):
        fmt = detect_format(loc, cfg.input_format)
        has_header = _text_has_header(loc, fmt, cfg.csv_header)
        schema, num_rows, table = _schema_of(loc, fmt, has_header)
        names = [n for n in schema.names if n not in DROPPED_INPUT_COLUMNS]
        if not names:
            raise InputError(f"{loc.uri} is empty (no columns, no rows); remove it from the input or fill it")
        if has_header:
            url_col = _find_column(names, cfg.url_col, URL_ALIASES)
            caption_col = _find_column(names, cfg.caption_col, CAPTION_ALIASES)
        else:
            url_col, caption_col = _headerless_columns(names, {n: _head(loc, table, n, 1) for n in names}, cfg)
        if url_col is None:
            flag = f"--url-col {cfg.url_col!r} was not found" if cfg.url_col is not None else "no URL column found"
            headerless = (" If the file has no header row (its first line is data), add --csv-header false, "
                          "else that line is taken as column names and lost."
                          if fmt in ("csv", "tsv") and has_header and cfg.csv_header == "auto" else "")
            raise InputError(f"{loc.uri}: {flag}. Its columns are: {', '.join(names) or '(none)'}. "
                             f"Name the URL column with --url-col NAME or --url-col POSITION (0-based), and the "
                             f"caption with --caption-col likewise.{headerless}")
        for role, col in (("URL", url_col), ("caption", caption_col)):
            typ = schema.field(col).type if col else pa.string()
            if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_binary(typ)
                    or pa.types.is_large_binary(typ) or pa.types.is_null(typ)):
                raise InputError(f"{loc.uri}: the {role} column {col!r} holds {typ}, not text; name the right "
                                 f"column with --{'url' if role == 'URL' else 'caption'}-col NAME")
        if cfg.caption_col is not None and caption_col is None:
            raise InputError(f"{loc.uri}: --caption-col {cfg.caption_col!r} was not found. Its columns are: "
                             f"{', '.join(names)} (a position counts from 0).")
        _warn_if_not_urls(loc.uri, url_col, _head(loc, table, url_col))
        others = [n for n in names if n not in (url_col, caption_col)]
        if cfg.keep_columns is not None:
            missing = [c for c in cfg.keep_columns if c not in others and c not in (url_col, caption_col)]
            if missing:
                raise InputError(f"{loc.uri}: --keep-columns names {missing} which the file does not have. "
                                 f"Its other columns are: {', '.join(others) or '(none)'}.")
            others = [n for n in others if n in cfg.keep_columns]
        passthrough = tuple(
            (n, f"{n}_input" if n in CONTRACT_COLUMNS or n.startswith("_") else n, schema.field(n).type)
            for n in others)
        out.append(InputFile(idx, loc.uri, fmt, num_rows, url_col, caption_col, passthrough, has_header))
    return out


def passthrough_fields(files: list[InputFile]) -> list[pa.Field]:
    """The union of pass-through columns over all files (first-seen order), with one type each.

    Raises:
        InputError: a column has incompatible types in two files.
    """
    seen: dict[str, tuple[pa.DataType, str]] = {}
    for f in files:
        for _src, name, typ in f.passthrough:
            if name not in seen:
                seen[name] = (typ, f.uri)
                continue
            prev, where = seen[name]
            if prev == typ:
                continue
            try:
                unified = pa.unify_schemas([pa.schema([(name, prev)]), pa.schema([(name, typ)])],
                                           promote_options="permissive").field(name).type
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                raise InputError(f"column {name!r} is {prev} in {where} but {typ} in {f.uri}; make the "
                                 f"files agree or drop it with --keep-columns") from None
            seen[name] = (unified, where)
    return [pa.field(n, t) for n, (t, _) in seen.items()]


def _clean_strings(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A string column as valid UTF-8 (invalid bytes become U+FFFD instead of crashing later)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        return pc.cast(arr, pa.string()) if not pa.types.is_binary(arr.type) else _decode_binary(arr)
    try:
        arr.validate(full=True)
        return arr.cast(pa.string())
    except pa.ArrowInvalid:
        return _decode_binary(arr.view(pa.binary()) if arr.type == pa.string() else arr.cast(pa.large_binary()))


def _decode_binary(arr: pa.Array) -> pa.Array:
    return pa.array([None if v is None else v.decode("utf-8", errors="replace") for v in arr.to_pylist()],
                    pa.string())


def read_rows(f: InputFile, start: int, stop: int, skip: frozenset[int] = frozenset(),
              cache: ReadCache | None = None) -> pa.Table:
    """Read rows ``[start, stop)`` of one input file as the pipeline's first table.

    Args:
        f: the file, as :func:`inspect_inputs` found it.
        start / stop: 0-based row range in the file.
        skip: row indices to leave out (already written by an earlier run).
        cache: the run's :class:`~capfilt.io.readcache.ReadCache`: a text file is parsed, and a
            Parquet row group decoded, once per cache rather than once per shard. ``None``: read
            what this range needs and keep nothing.

    Returns:
        Columns ``key``, ``url``, ``caption`` (string; null when the file has no caption column),
        the pass-through columns, and internal ``_row`` (int64 row index in the file).

    Raises:
        InputError: the file changed since it was inspected (fewer rows than planned).
    """
    def cached(key: tuple, load):
        """``load()``, kept in the run's cache under ``key`` when there is one (no cache: always load)."""
        return cache.get(key, load) if cache is not None else load()

    if f.format == "parquet":
        loc = locate(f.uri)
        cols = [f.url_col] + ([f.caption_col] if f.caption_col else []) + [s for s, _, _ in f.passthrough]
        with loc.fs.open_input_file(loc.path) as fh:
            pfile = pq.ParquetFile(fh)
            pieces, offset = [], 0
            for rg in range(pfile.num_row_groups):
                n = pfile.metadata.row_group(rg).num_rows
                if offset + n > start and offset < stop:
                    t = cached((f.uri, "parquet", rg, tuple(cols)),
                               lambda rg=rg: pfile.read_row_group(rg, columns=cols))
                    lo, hi = max(start - offset, 0), min(stop - offset, n)
                    pieces.append(t.slice(lo, hi - lo))
                offset += n
        table = pa.concat_tables(pieces) if pieces else pa.table({c: pa.array([], pa.string()) for c in cols})
    else:
        table = cached((f.uri, f.format, f.has_header),
                       lambda: _read_text_table(f.uri, f.format, f.has_header)).slice(start, stop - start)
    if table.num_rows != stop - start:
        raise InputError(f"{f.uri} has changed since the run started (expected rows {start}..{stop - 1}); "
                         f"rerun with the final file")
    rows = pa.array(range(start, stop), pa.int64())
    out = {
        "key": pa.array([f"{f.index:04d}_{r:09d}" for r in range(start, stop)], pa.string()),
        "url": _clean_strings(table.column(f.url_col)),
        "caption": (_clean_strings(table.column(f.caption_col)) if f.caption_col
                    else pa.nulls(table.num_rows, pa.string())),
    }
    for src, name, _typ in f.passthrough:
        col = table.column(src)
        out[name] = _clean_strings(col) if pa.types.is_string(col.type) else col
    out["_row"] = rows
    result = pa.table(out)
    if skip:
        mask = pa.array([r not in skip for r in range(start, stop)])
        result = result.filter(mask)
    return result


def key_to_position(key: str) -> tuple[int, int]:
    """Inverse of the key format: ``"0003_000000042" -> (3, 42)`` (file index, row index)."""
    a, b = key.split("_", 1)
    return int(a), int(b)
