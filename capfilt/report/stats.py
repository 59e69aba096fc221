"""Every number of the dataset-quality report, computed by streaming the output's Parquet shards.

One pass reads the shards' small columns (never ``image``) in record batches and accumulates
counts, histograms and top-k lists; a second pass reads ``image`` only for the few sampled rows,
from the row groups that hold them. Memory is bounded by the batch size, the number of distinct
texts / error messages, and the number of shards, never by the number of images.

The output layout read here is the contract of DESIGN.md ("The output contract"): Parquet shards
anywhere under ``OUT`` except inside ``_``- or ``.``-prefixed folders, a shard counting as complete
once its sibling ``<name>.stats.json`` exists (written last by the writer), and the run record
``OUT/_capfilt/run.json``. Score and caption columns are optional (the ``download`` recipe has
none); sections whose columns are absent are reported as unavailable rather than failing.
"""

from __future__ import annotations

import heapq
import json
import math
import posixpath
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from capfilt import schema
from capfilt.errors import OutputError
from capfilt.io.filesystem import Location, locate

REPORT_VERSION = 1

#: Statuses set by the download stage when no image was stored (everything else was downloaded).
DOWNLOAD_FAILURES: frozenset[str] = frozenset({
    schema.FAILED_TO_DOWNLOAD, schema.FAILED_TO_RESIZE, schema.TOO_SMALL, schema.TOO_LARGE,
    schema.OPTED_OUT, schema.INVALID_URL, schema.BLOCKED_ADDRESS,
})

#: Keys ``run.json`` is expected to hold (DESIGN.md "The output contract").
RUN_KEYS = ("config", "models", "versions", "timings", "totals", "stages")

SCORERS = ("itm", "itc", "clip")
#: Fixed histogram ranges and bin counts per scorer: ITM is a probability in [0, 1], ITC and CLIP
#: are cosines in [-1, 1] (fine bins: CLIP cosines of matching pairs sit in a narrow band ~0.2-0.4).
SCORE_BINS: dict[str, tuple[float, float, int]] = {"itm": (0.0, 1.0, 50), "itc": (-1.0, 1.0, 200),
                                                   "clip": (-1.0, 1.0, 200)}
#: Image side histograms: bins of ``SIZE_BIN_PX`` pixels; the last bin counts sides >= SIZE_BINS * SIZE_BIN_PX.
SIZE_BIN_PX = 64
SIZE_BINS = 64
SIZE_COLUMNS = ("original_width", "original_height", "width", "height")
#: Word-count histograms: index i counts texts of i words; the last index counts >= MAX_WORDS words.
MAX_WORDS = 40
TOP_ERRORS = 10
TOP_CAPTIONS = 15
REPETITIVE_EXAMPLES = 8
READ_BATCH_ROWS = 4096

_WORD = re.compile(r"[\w']+")


# --------------------------------------------------------------------------------------------
# shards and run record
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardFile:
    """One Parquet shard: ``name`` relative to ``OUT``, filesystem ``path``, ``size`` in bytes."""

    name: str
    path: str
    size: int
    complete: bool


def stats_sidecars(path: str) -> tuple[str, str]:
    """Where a shard's stats file may be: ``<stem>.stats.json`` or ``<name>.stats.json``."""
    stem = path[: -len(".parquet")] if path.endswith(".parquet") else path
    return stem + ".stats.json", path + ".stats.json"


def find_shards(out: Location) -> list[ShardFile]:
    """List ``*.parquet`` files under ``out`` (recursively), skipping ``_``/``.``-prefixed parts.

    A shard is ``complete`` when one of :func:`stats_sidecars` exists (the writer writes it last).

    Returns:
        Shards sorted by name.

    Raises:
        OutputError: if ``out`` is not a folder.
    """
    info = out.fs.get_file_info(out.path)
    if info.type != pafs.FileType.Directory:
        raise OutputError(f"{out.uri} is not a capfilt output folder (it does not exist or is a file); "
                          f"give the --output folder of a `capfilt run`")
    infos = out.fs.get_file_info(pafs.FileSelector(out.path, recursive=True))
    files = {i.path: i for i in infos if i.type == pafs.FileType.File}
    shards = []
    for p, i in files.items():
        if not p.endswith(".parquet"):
            continue
        rel = posixpath.relpath(p, out.path)
        if any(part.startswith(("_", ".")) for part in rel.split("/")):
            continue
        complete = any(s in files for s in stats_sidecars(p))
        shards.append(ShardFile(rel, p, int(i.size or 0), complete))
    return sorted(shards, key=lambda s: s.name)


def read_run_record(out: Location) -> tuple[dict[str, Any] | None, list[str]]:
    """Read ``OUT/_capfilt/run.json`` defensively.

    Returns:
        ``(record or None, problems)``: problems are readable sentences (file missing, not JSON,
        expected keys missing); the report shows them instead of failing.
    """
    loc = out.join("_capfilt", "run.json")
    if not loc.exists():
        return None, [f"run record {loc.uri} is missing: the run may have been interrupted before it "
                      f"was written (config, models, timings and throughput are unknown)"]
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            record = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, [f"run record {loc.uri} cannot be read ({e}); config, models and timings are unknown"]
    if not isinstance(record, dict):
        return None, [f"run record {loc.uri} is not a JSON object; config, models and timings are unknown"]
    missing = [k for k in RUN_KEYS if not record.get(k)]
    problems = []
    if missing:
        problems.append(f"run record lacks {', '.join(missing)} (the run may have been interrupted "
                        f"before it finished)")
    return record, problems


def model_names(record: dict[str, Any] | None) -> dict[str, str]:
    """Model ids by role (``captioner``, ``filter``, ``clip``) from a run record, where present."""
    if not record:
        return {}
    models = record.get("models")
    out: dict[str, str] = {}
    if isinstance(models, dict):
        for role, spec in models.items():
            if isinstance(spec, dict) and spec.get("id"):
                rev = spec.get("revision")
                out[role] = f"{spec['id']}@{rev}" if rev else str(spec["id"])
            elif isinstance(spec, str) and role not in ("name", "description", "builder"):
                out[role] = spec
    return out


def uses_tiny_models(record: dict[str, Any] | None) -> bool:
    """True when the run used the untrained ``tiny`` preset (random weights: captions are noise).

    Looks at ``models.name`` / ``models.builder`` and ``config.models`` of the run record.
    """
    if not record:
        return False
    models = record.get("models")
    config = record.get("config")
    hits = []
    if isinstance(models, dict):
        hits += [models.get("name"), models.get("builder"), models.get("preset")]
    elif isinstance(models, str):
        hits.append(models)
    if isinstance(config, dict):
        hits.append(config.get("models"))
    return any(isinstance(h, str) and (h == "tiny" or h.endswith("/tiny.yaml")) for h in hits)


def _config_get(record: dict[str, Any] | None, *path: str) -> Any:
    node: Any = (record or {}).get("config")
    for p in path:
        if not isinstance(node, dict):
            return None
        node = node.get(p)
    return node


# --------------------------------------------------------------------------------------------
# text helpers
# --------------------------------------------------------------------------------------------
def word_count(text: str) -> int:
    """Words in a caption: whitespace-separated tokens (``str.split``)."""
    return len(text.split())


def repeated_ngram(text: str) -> str | None:
    """The first word n-gram repeated back to back in ``text`` (``"dai dai"`` -> ``"dai"``), or None.

    Words are lower-cased runs of letters, digits, ``_`` and ``'``; any n >= 1 counts, so both
    BLIP's degenerate loops ("dai dai dai", "on a table on a table") are found. Natural English
    rarely repeats a word back to back ("that that" is the usual exception).
    """
    words = _WORD.findall(text.lower())
    n_words = len(words)
    for n in range(1, n_words // 2 + 1):
        for i in range(n_words - 2 * n + 1):
            if words[i:i + n] == words[i + n:i + 2 * n]:
                return " ".join(words[i:i + n])
    return None


# --------------------------------------------------------------------------------------------
# accumulators
# --------------------------------------------------------------------------------------------
class _Moments:
    """Count, sum, min, max of a stream of numbers (float64 sums)."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, v: np.ndarray) -> None:
        if v.size:
            self.count += int(v.size)
            self.total += float(v.sum(dtype=np.float64))
            self.min = min(self.min, float(v.min()))
            self.max = max(self.max, float(v.max()))

    def as_dict(self) -> dict[str, Any]:
        if not self.count:
            return {"count": 0, "mean": None, "min": None, "max": None}
        return {"count": self.count, "mean": self.total / self.count, "min": self.min, "max": self.max}


class _ScoreHist:
    """Histogram of scores over a fixed range plus moments and the count below the threshold."""

    def __init__(self, lo: float, hi: float, bins: int, threshold: float | None) -> None:
        self.lo, self.hi, self.bins, self.threshold = lo, hi, bins, threshold
        self.counts = np.zeros(bins, np.int64)
        self.moments = _Moments()
        self.below = 0

    def add(self, v: np.ndarray) -> None:
        v = v[np.isfinite(v)].astype(np.float64)
        self.moments.add(v)
        self.counts += np.histogram(np.clip(v, self.lo, self.hi), bins=self.bins, range=(self.lo, self.hi))[0]
        if self.threshold is not None:
            self.below += int((v < self.threshold).sum())

    def as_dict(self) -> dict[str, Any]:
        d = self.moments.as_dict()
        d["histogram"] = {"range": [self.lo, self.hi], "bins": self.bins, "counts": self.counts.tolist()}
        if self.threshold is not None:
            d["below_threshold"] = self.below
            d["below_threshold_share"] = self.below / d["count"] if d["count"] else None
        return d


class _TextStats:
    """Word-length histogram, back-to-back repetition and (optionally) exact-duplicate tracking."""

    def __init__(self, track_duplicates: bool) -> None:
        self.lengths = np.zeros(MAX_WORDS + 1, np.int64)
        self.count = 0
        self.words = 0
        self.repetitive = 0
        self.examples: list[str] = []
        self.track = track_duplicates
        self.occurrences: Counter[str] = Counter()
        self.images: Counter[str] = Counter()

    def add_row(self, texts: Iterable[str]) -> None:
        seen = set()
        for t in texts:
            n = word_count(t)
            self.lengths[min(n, MAX_WORDS)] += 1
            self.count += 1
            self.words += n
            if repeated_ngram(t) is not None:
                self.repetitive += 1
                if len(self.examples) < REPETITIVE_EXAMPLES and t not in self.examples:
                    self.examples.append(t)
            if self.track:
                self.occurrences[t] += 1
                if t not in seen:
                    seen.add(t)
                    self.images[t] += 1

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "count": self.count,
            "mean_words": self.words / self.count if self.count else None,
            "length_counts": self.lengths.tolist(),
            "repetitive": self.repetitive,
            "repetition_rate": self.repetitive / self.count if self.count else None,
            "repetitive_examples": list(self.examples),
        }
        if self.track:
            dup = sum(c for t, c in self.occurrences.items() if self.images[t] >= 2)
            d["distinct"] = len(self.occurrences)
            d["in_duplicate_groups"] = dup
            d["duplicate_share"] = dup / self.count if self.count else None
            top = sorted(self.occurrences.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_CAPTIONS]
            d["most_frequent"] = [{"text": t, "count": c, "images": self.images[t]} for t, c in top]
        return d


class _TopK:
    """The k rows with the smallest ``sign * score`` seen so far: ``(score, shard, row)``."""

    def __init__(self, k: int, largest: bool) -> None:
        self.k, self.sign = k, (-1.0 if largest else 1.0)
        self.heap: list[tuple[float, int, int]] = []  # max-heap on sign*score via negation

    def add(self, scores: np.ndarray, shard: int, rows: np.ndarray) -> None:
        if not self.k or not scores.size:
            return
        keyed = self.sign * scores
        if scores.size > self.k:
            part = np.argpartition(keyed, self.k - 1)[: self.k]
            keyed, rows = keyed[part], rows[part]
        for s, r in zip(keyed.tolist(), rows.tolist()):
            item = (-s, -shard, -r)  # ties: earlier rows win
            if len(self.heap) < self.k:
                heapq.heappush(self.heap, item)
            elif item > self.heap[0]:
                heapq.heapreplace(self.heap, item)

    def result(self) -> list[tuple[int, int]]:
        items = sorted((-s, -sh, -r) for s, sh, r in self.heap)
        return [(sh, r) for _, sh, r in items]


class _Reservoir:
    """Uniform sample of n rows: every row gets a seeded random priority; the n smallest win."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.rng = np.random.default_rng(seed)
        self.items: list[tuple[float, int, int]] = []

    def add(self, mask: np.ndarray, shard: int, offset: int) -> None:
        prio = self.rng.random(mask.size)  # drawn for every row: the sample is independent of batching
        if not self.n:
            return
        idx = np.flatnonzero(mask)
        if idx.size > self.n:
            idx = idx[np.argpartition(prio[idx], self.n - 1)[: self.n]]
        self.items.extend((float(prio[i]), shard, offset + int(i)) for i in idx)
        if len(self.items) > 4 * self.n:
            self.items = heapq.nsmallest(self.n, self.items)

    def result(self) -> list[tuple[int, int]]:
        return sorted((sh, r) for _, sh, r in heapq.nsmallest(self.n, self.items))


# --------------------------------------------------------------------------------------------
# the report data
# --------------------------------------------------------------------------------------------
@dataclass
class ReportData:
    """What :func:`compute_report_data` found.

    Attributes:
        data: the JSON-serialisable report (every number of the HTML report).
        images: encoded image bytes (JPEG/PNG/WebP as stored) of the sampled rows, by ``key``.
    """

    data: dict[str, Any]
    images: dict[str, bytes] = field(default_factory=dict)


def _np(arr: pa.Array, dtype: Any = np.float64) -> np.ndarray:
    """Arrow numeric array to numpy with NaN for nulls."""
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=dtype)


def _per_row_count(lists: pa.Array, predicate: pa.Array | None, n: int) -> np.ndarray:
    """Per row, the number of list elements where ``predicate`` (on the flattened values) holds."""
    flat_parents = np.asarray(pc.list_parent_indices(lists).to_numpy(zero_copy_only=False), np.int64)
    if predicate is not None:
        flat_parents = flat_parents[np.asarray(predicate.to_numpy(zero_copy_only=False), bool)]
    return np.bincount(flat_parents, minlength=n)[:n]


def _value_counts(arr: pa.Array, null_label: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for item in pc.value_counts(arr).to_pylist():
        v = item["values"]
        out[null_label if v is None else v] += int(item["counts"])
    return out


def _iter_batches(pf: pq.ParquetFile, columns: list[str], row_groups: list[int] | None = None,
                  batch_size: int = READ_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    kwargs = {"row_groups": row_groups} if row_groups is not None else {}
    yield from pf.iter_batches(batch_size=batch_size, columns=columns, **kwargs)


def primary_scorer(columns: set[str], record: dict[str, Any] | None) -> str | None:
    """The scorer that decides keep/rank: the recipe's ``select.rank_by`` if its columns exist,
    else the first of ``itm``, ``clip``, ``itc`` present; ``None`` when no scores were written."""
    rank_by = _config_get(record, "select", "rank_by")
    present = [s for s in ("itm", "clip", "itc") if f"web_{s}" in columns or f"synthetic_{s}" in columns]
    if rank_by in present:
        return rank_by
    return present[0] if present else None


def compute_report_data(out: str | Location, samples: int = 24, seed: int = 0, borderline: int = 8) -> ReportData:
    """Compute every number of the report by streaming the complete shards of a capfilt output.

    Args:
        out: output folder (local path or ``s3://``-style URI) of ``capfilt run``, possibly partial.
        samples: images drawn uniformly (seeded) among downloaded rows for the sample grid.
        seed: seed of the sample draw (same output + seed -> same samples).
        borderline: how many lowest-scoring kept and highest-scoring dropped web captions to list.

    Returns:
        :class:`ReportData`; ``data`` keys: ``report_version``, ``output``, ``shards``, ``run``,
        ``warnings``, ``overview``, ``download``, ``filter`` (None without score columns),
        ``captions`` (None without caption columns), ``samples``, ``borderline``.

    Raises:
        OutputError: if ``out`` is not a folder. Unreadable shards and a missing or partial
        ``run.json`` are reported in ``warnings`` instead.
    """
    loc = locate(out) if isinstance(out, str) else out
    shards = find_shards(loc)
    record, warnings = read_run_record(loc)
    complete = [s for s in shards if s.complete]
    incomplete = [s.name for s in shards if not s.complete]
    if incomplete:
        warnings.append(f"{len(incomplete)} shard(s) without a .stats.json were skipped (incomplete: "
                        f"still being written or the run was interrupted)")
    if not shards:
        warnings.append("no Parquet shards found: nothing has been written yet")

    if record:
        status, input_rows = record.get("status"), record.get("input_rows")
        if status in ("running", "incomplete"):
            warnings.append(f"run.json says the run is {status!r}: it was interrupted or is still going")
        if isinstance(input_rows, int) and not isinstance(input_rows, bool):
            expected_rows = input_rows
        else:
            expected_rows = None
    else:
        expected_rows = None
    thresholds = {s: _config_get(record, "select", f"{s}_threshold") for s in SCORERS}
    top_k = _config_get(record, "select", "top_k")

    # ------------------------------------------------------------------ pass 1: small columns
    status_counts: Counter[str] = Counter()
    drop_reasons: Counter[str] = Counter()
    errors: Counter[tuple[str, str]] = Counter()
    sources: Counter[str] = Counter()
    sizes = {c: np.zeros(SIZE_BINS + 1, np.int64) for c in SIZE_COLUMNS}
    size_moments = {c: _Moments() for c in SIZE_COLUMNS}
    score_hists: dict[str, dict[str, _ScoreHist]] = {}
    web_text, syn_text = _TextStats(False), _TextStats(True)
    noise = {"web": [0, 0], "synthetic": [0, 0]}  # [scored, kept]
    rows_total = rows_kept = texts_kept = 0
    reservoir = _Reservoir(samples, seed)
    low_kept, high_dropped = _TopK(borderline, largest=False), _TopK(borderline, largest=True)
    per_shard: list[dict[str, Any]] = []
    read: list[ShardFile] = []
    columns_seen: set[str] = set()
    primary: str | None = None
    syn_rows = 0  # rows with a non-null ``synthetic_captions`` list
    selected_rows = 0  # rows with a non-null ``captions`` list (the select stage ran on them)

    for si, shard in enumerate(complete):
        try:
            pf = pq.ParquetFile(shard.path, filesystem=loc.fs)
        except (OSError, pa.ArrowException) as e:
            warnings.append(f"shard {shard.name} cannot be read and was skipped: {e}")
            per_shard.append({"file": shard.name, "bytes": shard.size, "error": str(e)})
            continue
        cols = set(pf.schema_arrow.names)
        columns_seen |= cols
        if primary is None:
            primary = primary_scorer(cols, record)
        wanted = [c for c in pf.schema_arrow.names if c != "image"]
        scorers = [s for s in SCORERS if f"web_{s}" in cols or f"synthetic_{s}" in cols]
        for s in scorers:
            lo, hi, bins = SCORE_BINS[s]
            score_hists.setdefault(s, {w: _ScoreHist(lo, hi, bins, thresholds[s]) for w in ("web", "synthetic")})
        row_stats = {"file": shard.name, "bytes": shard.size, "rows": 0, "downloaded": 0, "success": 0,
                     "kept": 0, "texts_kept": 0}
        offset = 0
        try:
            for rb in _iter_batches(pf, wanted):
                n = rb.num_rows
                status = rb.column("status")
                sc = _value_counts(status, "(null)")
                status_counts.update(sc)
                downloaded = n - sum(c for s, c in sc.items() if s in DOWNLOAD_FAILURES)
                row_stats["rows"] += n
                row_stats["downloaded"] += downloaded
                row_stats["success"] += sc.get(schema.SUCCESS, 0)
                if "error_message" in cols:
                    em = rb.column("error_message")
                    has = pc.is_valid(em)
                    for st, msg in zip(pc.filter(status, has).to_pylist(), pc.filter(em, has).to_pylist()):
                        errors[(st, msg)] += 1
                for c in SIZE_COLUMNS:
                    if c in cols:
                        v = _np(rb.column(c))
                        v = v[np.isfinite(v)]
                        size_moments[c].add(v)
                        sizes[c] += np.bincount(np.minimum(v.astype(np.int64) // SIZE_BIN_PX, SIZE_BINS),
                                                minlength=SIZE_BINS + 1)
                keep = None
                if "keep" in cols:
                    keep = np.asarray(rb.column("keep").fill_null(False).to_numpy(zero_copy_only=False), bool)
                    k = int(keep.sum())
                    rows_kept += k
                    row_stats["kept"] += k
                    if "drop_reason" in cols:
                        dropped = pa.array(~keep)
                        drop_reasons.update(_value_counts(pc.filter(rb.column("drop_reason"), dropped), "(none)"))
                web_kept = syn_kept = None
                if "caption_sources" in cols:
                    src = rb.column("caption_sources")
                    flat = pc.list_flatten(src)
                    sources.update(_value_counts(flat, "(null)"))
                    web_kept = _per_row_count(src, pc.equal(flat, schema.SOURCE_WEB).fill_null(False), n)
                    syn_kept = _per_row_count(src, pc.equal(flat, schema.SOURCE_SYNTHETIC).fill_null(False), n)
                if "captions" in cols:
                    selected_rows += rb.num_rows - rb.column("captions").null_count
                    t = int(pc.sum(pc.list_value_length(rb.column("captions"))).as_py() or 0)
                    texts_kept += t
                    row_stats["texts_kept"] += t
                for s in scorers:
                    if f"web_{s}" in cols:
                        score_hists[s]["web"].add(_np(rb.column(f"web_{s}")))
                    if f"synthetic_{s}" in cols:
                        score_hists[s]["synthetic"].add(_np(pc.list_flatten(rb.column(f"synthetic_{s}"))))
                if primary is not None and web_kept is not None:
                    rows_idx = np.arange(offset, offset + n)
                    if f"web_{primary}" in cols:
                        ws = _np(rb.column(f"web_{primary}"))
                        scored = np.isfinite(ws)
                        kept_web = scored & (web_kept > 0)
                        noise["web"][0] += int(scored.sum())
                        noise["web"][1] += int(kept_web.sum())
                        low_kept.add(ws[kept_web], si, rows_idx[kept_web])
                        drop = scored & (web_kept == 0)
                        high_dropped.add(ws[drop], si, rows_idx[drop])
                    if f"synthetic_{primary}" in cols:
                        lists = rb.column(f"synthetic_{primary}")
                        flat = pc.list_flatten(lists)
                        finite = pc.is_finite(flat).fill_null(False)
                        n_scored = _per_row_count(lists, finite, n)
                        noise["synthetic"][0] += int(n_scored.sum())
                        noise["synthetic"][1] += int(np.minimum(syn_kept, n_scored).sum())
                if "caption" in cols:
                    for t in rb.column("caption").to_pylist():
                        if t is not None:
                            web_text.add_row((t,))
                if "synthetic_captions" in cols:
                    syn_col = rb.column("synthetic_captions")
                    syn_rows += n - syn_col.null_count
                    for texts in syn_col.to_pylist():
                        if texts:
                            syn_text.add_row(x for x in texts if x is not None)
                has_image = pc.equal(status, schema.SUCCESS).fill_null(False)
                if "width" in cols:
                    has_image = pc.and_(has_image, pc.is_valid(rb.column("width")))
                reservoir.add(np.asarray(has_image.to_numpy(zero_copy_only=False), bool), si, offset)
                offset += n
        except (OSError, pa.ArrowException) as e:
            warnings.append(f"shard {shard.name} failed while reading (counted up to row {offset}): {e}")
            row_stats["error"] = str(e)
        rows_total += row_stats["rows"]
        per_shard.append(row_stats)
        read.append(shard)

    # ------------------------------------------------------------------ assemble
    if expected_rows is not None and rows_total < expected_rows:
        warnings.append(f"read {rows_total:,} of the run's {expected_rows:,} input rows")
    downloaded = sum(r.get("downloaded", 0) for r in per_shard)
    success = status_counts.get(schema.SUCCESS, 0)
    # the select stage ran iff its columns exist and it either had scores or kept some texts
    # (a writer that fills absent contract columns with nulls must not look like "nothing kept")
    selected = "keep" in columns_seen and (bool(score_hists) or selected_rows > 0)
    has_keep = has_captions = selected
    data: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "output": loc.uri,
        "shards": {
            "found": len(shards), "complete": len(complete), "read": len(read),
            "incomplete": len(incomplete), "incomplete_files": incomplete,
            "rows_per_shard_read": [r.get("rows", 0) for r in per_shard if "rows" in r],
        },
        "run": _run_section(record),
        "warnings": warnings,
        "columns": sorted(columns_seen),
        "overview": {
            "rows": rows_total,
            "downloaded": downloaded,
            "failed": rows_total - success,
            "status_counts": dict(sorted(status_counts.items(), key=lambda kv: (-kv[1], kv[0]))),
            "rows_kept": rows_kept if has_keep else None,
            "rows_dropped": (rows_total - rows_kept) if has_keep else None,
            "drop_reasons": dict(sorted(drop_reasons.items(), key=lambda kv: (-kv[1], kv[0]))) if has_keep else None,
            "texts_kept": texts_kept if has_captions else None,
            "texts_kept_by_source": dict(sorted(sources.items())) if selected and "caption_sources" in columns_seen else None,
        },
        "download": {
            "success_rate": downloaded / rows_total if rows_total else None,
            "distinct_error_messages": len(errors),
            "top_errors": [{"status": st, "message": m, "count": c}
                           for (st, m), c in sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_ERRORS]],
            "sizes": {c: {**size_moments[c].as_dict(), "bin_px": SIZE_BIN_PX, "counts": sizes[c].tolist()}
                      for c in SIZE_COLUMNS if c in columns_seen},
            "per_shard": per_shard,
        },
        "filter": None,
        "captions": None,
    }
    if score_hists:
        filt: dict[str, Any] = {
            "primary_scorer": primary,
            "thresholds": {s: thresholds[s] for s in score_hists},
            "top_k": top_k,
            "scores": {s: {w: h.as_dict() for w, h in hs.items()} for s, hs in score_hists.items()},
            "removed": {},
        }
        for w, (scored, kept) in noise.items():
            filt["removed"][w] = {"scored": scored, "kept": kept, "removed": scored - kept,
                                  "removed_share": (scored - kept) / scored if scored else None}
        if top_k is not None:
            scored, kept = noise["web"]
            filt["web_in_top_k_share"] = kept / scored if scored else None
        data["filter"] = filt
    if "synthetic_captions" in columns_seen or "caption" in columns_seen:
        data["captions"] = {"web": web_text.as_dict() if "caption" in columns_seen else None,
                            "synthetic": syn_text.as_dict() if syn_rows else None}

    # ------------------------------------------------------------------ pass 2: sampled rows
    picks = {"samples": reservoir.result(), "lowest_kept_web": low_kept.result(),
             "highest_dropped_web": high_dropped.result()}
    rows = _fetch_rows(loc, complete, {p for ps in picks.values() for p in ps}, primary, selected)
    images: dict[str, bytes] = {}
    for r in rows.values():
        img = r.pop("_image", None)
        if img is not None:
            images[r["key"]] = img
    data["samples"] = [rows[p] for p in picks["samples"] if p in rows]
    data["borderline"] = {"scorer": primary,
                          "lowest_kept_web": [rows[p] for p in picks["lowest_kept_web"] if p in rows],
                          "highest_dropped_web": [rows[p] for p in picks["highest_dropped_web"] if p in rows]}
    return ReportData(data, images)


def _run_section(record: dict[str, Any] | None) -> dict[str, Any]:
    rec = record or {}
    return {
        "present": record is not None,
        "missing_keys": [k for k in RUN_KEYS if not rec.get(k)],
        "tiny_models": uses_tiny_models(record),
        "model_ids": model_names(record),
        **{k: rec.get(k) for k in RUN_KEYS},
        "run_id": rec.get("run_id"),
        "status": rec.get("status"),
        "input_rows": rec.get("input_rows"),
        "command": rec.get("command"),
        "attempts": len(rec["attempts"]) if isinstance(rec.get("attempts"), list) else None,
    }


def _fetch_rows(loc: Location, shards: list[ShardFile], picks: set[tuple[int, int]],
                primary: str | None, selected: bool) -> dict[tuple[int, int], dict[str, Any]]:
    """Read the picked ``(shard index, row index)`` rows, ``image`` included, one row group at a time."""
    by_shard: dict[int, list[int]] = {}
    for sh, r in picks:
        by_shard.setdefault(sh, []).append(r)
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for sh, rows in sorted(by_shard.items()):
        shard = shards[sh]
        pf = pq.ParquetFile(shard.path, filesystem=loc.fs)
        names = pf.schema_arrow.names
        starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
        wanted_rows = np.array(sorted(rows))
        groups = sorted({int(np.searchsorted(starts, r, side="right") - 1) for r in wanted_rows})
        for g in groups:
            base = int(starts[g])
            for rb in _iter_batches(pf, names, [g], batch_size=256):
                n = rb.num_rows
                local = wanted_rows[(wanted_rows >= base) & (wanted_rows < base + n)] - base
                if local.size:
                    tbl = pa.Table.from_batches([rb]).take(pa.array(local))
                    for li, row in zip(local.tolist(), tbl.to_pylist()):
                        out[(sh, base + li)] = _row_summary(row, shard.name, base + li, primary, selected)
                base += n
    return out


def _row_summary(row: dict[str, Any], shard: str, index: int, primary: str | None, selected: bool) -> dict[str, Any]:
    """A sampled row as shown in the report: texts with scores and kept/dropped marks.

    A synthetic caption generated twice for one image and kept once is marked kept on its
    higher-scoring occurrence (the select stage ranks by score).
    """
    kept = Counter(zip(row.get("captions") or [], row.get("caption_sources") or []))
    has_sel = selected
    web_score = row.get(f"web_{primary}") if primary else None
    web = None
    if row.get("caption") is not None:
        web = {"text": row["caption"], "score": web_score,
               "kept": (kept[(row["caption"], schema.SOURCE_WEB)] > 0) if has_sel else None}
    texts = row.get("synthetic_captions") or []
    scores = (row.get(f"synthetic_{primary}") or []) if primary else []
    scores = [scores[i] if i < len(scores) else None for i in range(len(texts))]
    marks: list[bool | None] = [None] * len(texts)
    if has_sel:
        order = sorted(range(len(texts)), key=lambda i: -(scores[i] if scores[i] is not None else -math.inf))
        for i in order:
            pair = (texts[i], schema.SOURCE_SYNTHETIC)
            marks[i] = kept[pair] > 0
            if marks[i]:
                kept[pair] -= 1
    synth = [{"text": t, "score": scores[i], "kept": marks[i]} for i, t in enumerate(texts)]
    return {
        "key": row.get("key"), "shard": shard, "row": index, "url": row.get("url"),
        "status": row.get("status"), "width": row.get("width"), "height": row.get("height"),
        "original_width": row.get("original_width"), "original_height": row.get("original_height"),
        "keep": row.get("keep") if selected else None, "drop_reason": row.get("drop_reason") if selected else None,
        "scorer": primary,
        "web": web, "synthetic": synth, "_image": row.get("image"),
    }
