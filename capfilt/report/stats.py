"""Every number of the dataset-quality report, computed by streaming the output's Parquet shards.

Pass 1 (:class:`Scan`) reads each complete shard's small columns (never ``image``) in record
batches and feeds the accumulators of :mod:`capfilt.report.accumulate`; pass 2
(:func:`fetch_rows`) reads ``image`` only for the few rows shown (the seeded sample and the
borderline web captions), one row group at a time. Memory is bounded by the batch size, the
number of distinct texts and error messages, and the number of shards, never by the number of
images.

Score, caption and select columns are optional (the ``download`` recipe has none, or has them
all-null); sections whose columns are absent come out as ``None`` rather than as zeros.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capfilt import schema
from capfilt.errors import OutputError
from capfilt.io.filesystem import Location, locate
from capfilt.io.writer import META_DIR
from capfilt.report.accumulate import Moments, Reservoir, ScoreHist, TextStats, TopK
from capfilt.report.failures import FailureStats
from capfilt.report.filters import FilterStats, blur_flagged, read_details
from capfilt.report.labels import LabelScores, check_label_column, label_report, label_scorer, split_values
from capfilt.report.layout import ShardFile, config_get, find_shards, read_run_record, run_section

REPORT_VERSION = 1

#: Statuses set by the download stage when no image was stored (every other row was downloaded).
DOWNLOAD_FAILURES: frozenset[str] = frozenset({
    schema.FAILED_TO_DOWNLOAD, schema.FAILED_TO_RESIZE, schema.TOO_SMALL, schema.TOO_LARGE,
    schema.OPTED_OUT, schema.INVALID_URL, schema.BLOCKED_ADDRESS,
})
SCORERS = ("itm", "itc", "clip")
#: Fixed histogram ranges and bin counts per scorer: ITM is a probability in [0, 1]; ITC and CLIP
#: are cosines in [-1, 1] with fine bins (CLIP cosines of matching pairs sit in a narrow ~0.2-0.4 band).
SCORE_BINS: dict[str, tuple[float, float, int]] = {"itm": (0.0, 1.0, 50), "itc": (-1.0, 1.0, 200),
                                                   "clip": (-1.0, 1.0, 200)}
#: Image side histograms: bins of ``SIZE_BIN_PX`` pixels; the last counts sides >= SIZE_BINS * SIZE_BIN_PX.
SIZE_BIN_PX = 64
SIZE_BINS = 64
SIZE_COLUMNS = ("original_width", "original_height", "width", "height")
TOP_ERRORS = 10
READ_BATCH_ROWS = 4096


@dataclass
class ReportData:
    """What :func:`compute_report_data` found.

    Attributes:
        data: the JSON-serialisable report (every number of the HTML report).
        images: stored image bytes (JPEG/PNG/WebP as written) of the rows shown, by ``key``.
    """

    data: dict[str, Any]
    images: dict[str, bytes] = field(default_factory=dict)


def _np(arr: pa.Array) -> np.ndarray:
    """Arrow numeric array to float64 numpy with NaN for nulls."""
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.float64)


def _per_row_count(lists: pa.Array, predicate: pa.Array, n: int) -> np.ndarray:
    """Per row of a list array, how many elements satisfy ``predicate`` (bool over the flattened values)."""
    parents = np.asarray(pc.list_parent_indices(lists).to_numpy(zero_copy_only=False), np.int64)
    return np.bincount(parents[np.asarray(predicate.to_numpy(zero_copy_only=False), bool)], minlength=n)[:n]


def _value_counts(arr: pa.Array, null_label: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for item in pc.value_counts(arr).to_pylist():
        out[null_label if item["values"] is None else item["values"]] += int(item["counts"])
    return out


def _sorted_counts(c: Counter) -> dict:
    return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def _iter_batches(pf: pq.ParquetFile, columns: list[str], row_groups: list[int] | None = None,
                  batch_size: int = READ_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    kwargs = {"row_groups": row_groups} if row_groups is not None else {}
    yield from pf.iter_batches(batch_size=batch_size, columns=columns, **kwargs)


def primary_scorer(columns: set[str], record: dict[str, Any] | None) -> str | None:
    """The scorer that decides keep/rank: the recipe's ``select.rank_by`` if its columns exist,
    else the first of ``itm``, ``clip``, ``itc`` present; ``None`` when no scores were written."""
    rank_by = config_get(record, "select", "rank_by")
    present = [s for s in ("itm", "clip", "itc") if f"web_{s}" in columns or f"synthetic_{s}" in columns]
    if rank_by in present:
        return rank_by
    return present[0] if present else None


class Scan:
    """Pass 1: accumulate every number over the small columns of the shards, batch by batch.

    Args:
        record: the run record (thresholds, ``top_k`` and ``rank_by`` come from its config).
        samples / seed: size and seed of the uniform sample of downloaded rows.
        borderline: how many lowest-scoring kept / highest-scoring dropped web captions to track.
        labels / label_scorer: with ``--label-col``, where to collect each row's label and its
            ``web_<label_scorer>`` score (NaN unless ``status`` is ``success``).
    """

    def __init__(self, record: dict[str, Any] | None, samples: int, seed: int, borderline: int,
                 labels: LabelScores | None = None, label_scorer: str | None = None) -> None:
        self.record = record
        self.labels, self.label_scorer = labels, label_scorer
        self.thresholds = {s: config_get(record, "select", f"{s}_threshold") for s in SCORERS}
        self.top_k = config_get(record, "select", "top_k")
        self.status: Counter[str] = Counter()
        self.drop_reasons: Counter[str] = Counter()
        self.errors: Counter[tuple[str, str]] = Counter()
        self.sources: Counter[str] = Counter()
        self.sizes = {c: np.zeros(SIZE_BINS + 1, np.int64) for c in SIZE_COLUMNS}
        self.size_moments = {c: Moments() for c in SIZE_COLUMNS}
        self.scores: dict[str, dict[str, ScoreHist]] = {}
        self.web_text, self.syn_text = TextStats(False), TextStats(True)
        self.removed = {"web": [0, 0], "synthetic": [0, 0]}  # [scored, kept] by the primary scorer
        self.web_truncated = [0, 0]  # web captions [measured, longer than the filter reads]
        self.rows = self.kept = self.texts_kept = 0
        self.syn_rows = 0  # rows with a non-null synthetic_captions list
        self.selected_rows = 0  # rows with a non-null captions list
        self.columns: set[str] = set()
        self.primary: str | None = None
        self.per_shard: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        self.reservoir = Reservoir(samples, seed)
        self.low_kept, self.high_dropped = TopK(borderline, largest=False), TopK(borderline, largest=True)
        self.filters = FilterStats()
        self.failures = FailureStats()

    # ------------------------------------------------------------------ reading
    def add_shard(self, index: int, shard: ShardFile, loc: Location) -> None:
        """Read one shard; a shard that cannot be read is recorded with its error and skipped."""
        try:
            pf = pq.ParquetFile(shard.path, filesystem=loc.fs)
        except (OSError, pa.ArrowException) as e:
            self.warnings.append(f"shard {shard.name} cannot be read and was skipped: {e}")
            self.per_shard.append({"file": shard.name, "bytes": shard.size, "error": str(e)})
            return
        cols = set(pf.schema_arrow.names)
        self.columns |= cols
        if self.primary is None:
            self.primary = primary_scorer(cols, self.record)
        for s in SCORERS:
            if f"web_{s}" in cols or f"synthetic_{s}" in cols:
                lo, hi, bins = SCORE_BINS[s]
                self.scores.setdefault(s, {w: ScoreHist(lo, hi, bins, self.thresholds[s]) for w in ("web", "synthetic")})
        st = {"file": shard.name, "bytes": shard.size, "rows": 0, "downloaded": 0, "success": 0, "kept": 0,
              "texts_kept": 0}
        offset = 0
        try:
            for rb in _iter_batches(pf, [c for c in pf.schema_arrow.names if c != "image"]):
                self._add_batch(rb, cols, index, offset, st)
                offset += rb.num_rows
        except (OSError, pa.ArrowException) as e:
            self.warnings.append(f"shard {shard.name} failed while reading (counted up to row {offset}): {e}")
            st["error"] = str(e)
        self.rows += st["rows"]
        self.per_shard.append(st)

    def _add_batch(self, rb: pa.RecordBatch, cols: set[str], shard: int, offset: int, st: dict[str, Any]) -> None:
        n = rb.num_rows
        status = rb.column("status")
        sc = _value_counts(status, "(null)")
        self.status.update(sc)
        st["rows"] += n
        st["downloaded"] += n - sum(c for s, c in sc.items() if s in DOWNLOAD_FAILURES)
        st["success"] += sc.get(schema.SUCCESS, 0)
        if "error_message" in cols:
            em = rb.column("error_message")
            has = pc.is_valid(em)
            self.errors.update(zip(pc.filter(status, has).to_pylist(), pc.filter(em, has).to_pylist()))
        for c in SIZE_COLUMNS:
            if c in cols:
                v = _np(rb.column(c))
                v = v[np.isfinite(v)]
                self.size_moments[c].add(v)
                self.sizes[c] += np.bincount(np.minimum(v.astype(np.int64) // SIZE_BIN_PX, SIZE_BINS),
                                             minlength=SIZE_BINS + 1)
        if "web_text_truncated" in cols:
            tr = rb.column("web_text_truncated")
            self.web_truncated[0] += n - tr.null_count
            self.web_truncated[1] += int(pc.sum(tr.cast(pa.int64())).as_py() or 0)
        web_kept, syn_kept = self._add_selection(rb, cols, st)
        for s in self.scores:
            if f"web_{s}" in cols:
                self.scores[s]["web"].add(_np(rb.column(f"web_{s}")))
            if f"synthetic_{s}" in cols:
                self.scores[s]["synthetic"].add(_np(pc.list_flatten(rb.column(f"synthetic_{s}"))))
        if self.primary is not None and web_kept is not None:
            self._add_removed(rb, cols, shard, offset, web_kept, syn_kept)
        self._add_texts(rb, cols)
        self.filters.add(rb, cols, shard, offset)
        self.failures.add(rb, shard, offset)
        if self.labels is not None:
            self._add_labels(rb, cols, status)
        has_image = pc.equal(status, schema.SUCCESS).fill_null(False)
        if "width" in cols:
            has_image = pc.and_(has_image, pc.is_valid(rb.column("width")))
        self.reservoir.add(np.asarray(has_image.to_numpy(zero_copy_only=False), bool), shard, offset)

    def _add_selection(self, rb: pa.RecordBatch, cols: set[str],
                       st: dict[str, Any]) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Rows kept, drop reasons, texts kept; returns per-row kept web / synthetic text counts."""
        n = rb.num_rows
        if "keep" in cols:
            keep = np.asarray(rb.column("keep").fill_null(False).to_numpy(zero_copy_only=False), bool)
            k = int(keep.sum())
            self.kept += k
            st["kept"] += k
            if "drop_reason" in cols:
                self.drop_reasons.update(_value_counts(pc.filter(rb.column("drop_reason"), pa.array(~keep)), "(none)"))
        if "captions" in cols:
            caps = rb.column("captions")
            self.selected_rows += n - caps.null_count
            t = int(pc.sum(pc.list_value_length(caps)).as_py() or 0)
            self.texts_kept += t
            st["texts_kept"] += t
        if "caption_sources" not in cols:
            return None, None
        src = rb.column("caption_sources")
        flat = pc.list_flatten(src)
        self.sources.update(_value_counts(flat, "(null)"))
        return (_per_row_count(src, pc.equal(flat, schema.SOURCE_WEB).fill_null(False), n),
                _per_row_count(src, pc.equal(flat, schema.SOURCE_SYNTHETIC).fill_null(False), n))

    def _add_removed(self, rb: pa.RecordBatch, cols: set[str], shard: int, offset: int,
                     web_kept: np.ndarray, syn_kept: np.ndarray) -> None:
        """Texts scored vs kept by the primary scorer (BLIP's noise ratio) and the borderline rows."""
        p, n = self.primary, rb.num_rows
        if f"web_{p}" in cols:
            ws = _np(rb.column(f"web_{p}"))
            scored = np.isfinite(ws)
            kept = scored & (web_kept > 0)
            dropped = scored & (web_kept == 0)
            self.removed["web"][0] += int(scored.sum())
            self.removed["web"][1] += int(kept.sum())
            rows = np.arange(offset, offset + n)
            self.low_kept.add(ws[kept], shard, rows[kept])
            self.high_dropped.add(ws[dropped], shard, rows[dropped])
        if f"synthetic_{p}" in cols:
            lists = rb.column(f"synthetic_{p}")
            n_scored = _per_row_count(lists, pc.is_finite(pc.list_flatten(lists)).fill_null(False), n)
            self.removed["synthetic"][0] += int(n_scored.sum())
            self.removed["synthetic"][1] += int(np.minimum(syn_kept, n_scored).sum())

    def _add_labels(self, rb: pa.RecordBatch, cols: set[str], status: pa.Array) -> None:
        """Each row's label and web score (NaN when not scored: not ``success`` or a null score)."""
        assert self.labels is not None
        name = f"web_{self.label_scorer}"
        scores = _np(rb.column(name)) if name in cols else np.full(rb.num_rows, np.nan)
        scores[~np.asarray(pc.equal(status, schema.SUCCESS).fill_null(False).to_numpy(zero_copy_only=False), bool)] = np.nan
        self.labels.add(rb.column(self.labels.column) if self.labels.column in cols else None, scores)

    def _add_texts(self, rb: pa.RecordBatch, cols: set[str]) -> None:
        if "caption" in cols:
            for t in rb.column("caption").to_pylist():
                if t is not None:
                    self.web_text.add_row((t,))
        if "synthetic_captions" in cols:
            col = rb.column("synthetic_captions")
            self.syn_rows += rb.num_rows - col.null_count
            for texts in col.to_pylist():
                if texts:
                    self.syn_text.add_row(x for x in texts if x is not None)

    def resolve_texts(self, shards: list[ShardFile], loc: Location) -> None:
        """Second pass over ``synthetic_captions`` only, for the most frequent texts not cached in
        pass 1 (outputs with many distinct captions); stops as soon as all are found."""
        missing = self.syn_text.missing_texts()
        for shard in shards:
            if not missing:
                return
            try:
                pf = pq.ParquetFile(shard.path, filesystem=loc.fs)
                if "synthetic_captions" not in pf.schema_arrow.names:
                    continue
                for rb in _iter_batches(pf, ["synthetic_captions"]):
                    flat = pc.list_flatten(rb.column("synthetic_captions")).drop_null()
                    self.syn_text.learn(flat.to_pylist(), missing)
                    if not missing:
                        return
            except (OSError, pa.ArrowException):
                continue  # already reported by pass 1

    # ------------------------------------------------------------------ results
    @property
    def selected(self) -> bool:
        """Whether the select stage ran: its columns exist and it had scores or kept some texts
        (a writer that fills absent contract columns with nulls must not read as "nothing kept")."""
        return "keep" in self.columns and (bool(self.scores) or self.selected_rows > 0)

    def overview(self) -> dict[str, Any]:
        """Rows, downloaded, statuses, rows/texts kept (``None`` where nothing was selected)."""
        sel = self.selected
        return {
            "rows": self.rows,
            "downloaded": sum(r.get("downloaded", 0) for r in self.per_shard),
            "failed": self.rows - self.status.get(schema.SUCCESS, 0),
            "status_counts": _sorted_counts(self.status),
            "rows_kept": self.kept if sel else None,
            "rows_dropped": self.rows - self.kept if sel else None,
            "drop_reasons": _sorted_counts(self.drop_reasons) if sel else None,
            "texts_kept": self.texts_kept if sel else None,
            "texts_kept_by_source": dict(sorted(self.sources.items())) if sel and "caption_sources" in self.columns else None,
        }

    def download(self) -> dict[str, Any]:
        """Success rate, top error messages, image side histograms, per-shard table."""
        downloaded = sum(r.get("downloaded", 0) for r in self.per_shard)
        return {
            "success_rate": downloaded / self.rows if self.rows else None,
            "distinct_error_messages": len(self.errors),
            "top_errors": [{"status": st, "message": m, "count": c}
                           for (st, m), c in sorted(self.errors.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_ERRORS]],
            "sizes": {c: {**self.size_moments[c].as_dict(), "bin_px": SIZE_BIN_PX, "counts": self.sizes[c].tolist()}
                      for c in SIZE_COLUMNS if c in self.columns},
            "per_shard": self.per_shard,
        }

    def filter(self) -> dict[str, Any] | None:
        """Score histograms, texts removed (noise ratio), top-k share; ``None`` without scores."""
        if not self.scores:
            return None
        out: dict[str, Any] = {
            "primary_scorer": self.primary,
            "thresholds": {s: self.thresholds[s] for s in self.scores},
            "top_k": self.top_k,
            "scores": {s: {w: h.as_dict() for w, h in hs.items()} for s, hs in self.scores.items()},
            "removed": {w: {"scored": sc, "kept": k, "removed": sc - k, "removed_share": (sc - k) / sc if sc else None}
                        for w, (sc, k) in self.removed.items()},
        }
        if self.top_k is not None:
            sc, k = self.removed["web"]
            out["web_in_top_k_share"] = k / sc if sc else None
        if "web_text_truncated" in self.columns:
            scorers = config_get(self.record, "score", "scorers") or []
            blip = bool({"itm", "itc"} & set(scorers))
            out["web_text_truncated"] = {
                "measured": self.web_truncated[0], "truncated": self.web_truncated[1],
                # the filter reads this many tokens ([CLS]/[SEP] included); CLIP alone: its context
                "max_text_tokens": config_get(self.record, "score", "max_text_tokens") if blip else None,
            }
        return out

    def captions(self) -> dict[str, Any] | None:
        """Length, repetition and duplicate statistics of web and synthetic captions."""
        if "synthetic_captions" not in self.columns and "caption" not in self.columns:
            return None
        return {"web": self.web_text.as_dict() if "caption" in self.columns else None,
                "synthetic": self.syn_text.as_dict() if self.syn_rows else None}


def _label_setup(loc: Location, shards: list[ShardFile], label_col: str) -> str | None:
    """Check ``label_col`` and pick the web score against the schema of the first readable shard.

    Returns:
        The scorer to evaluate, or None when no complete shard can be read (nothing to check yet).

    Raises:
        LabelError: if the column is missing or the output has no web scores.
    """
    for shard in shards:
        try:
            names = pq.read_schema(shard.path, filesystem=loc.fs).names
        except (OSError, pa.ArrowException):
            continue
        check_label_column(names, label_col)
        return label_scorer(names)
    return None


def _foreign_names(loc: Location) -> list[str]:
    """Names at the top of ``loc`` that a capfilt output would not hold (sorted)."""
    import pyarrow.fs as pafs

    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False))
    return sorted(n for n in (i.path.rsplit("/", 1)[-1] for i in infos) if n not in (META_DIR, "_stats"))


def compute_report_data(out: str | Location, samples: int = 24, seed: int = 0, borderline: int = 8,
                        label_col: str | None = None, label_positive: Sequence[str] | None = None) -> ReportData:
    """Compute every number of the report by streaming the complete shards of a capfilt output.

    Args:
        out: output folder (local path or ``s3://``-style URI) of ``capfilt run``, possibly partial.
        samples: images drawn uniformly (seeded) among downloaded rows for the sample grid.
        seed: seed of the sample draw (same output + seed -> same samples).
        borderline: how many lowest-scoring kept and highest-scoring dropped web captions to list.
        label_col: a pass-through column of ground-truth labels: evaluate the filter against it
            (:mod:`capfilt.report.labels`); None for no evaluation.
        label_positive: label values meaning "the web caption matches its image" (each possibly
            comma-separated); None for :data:`capfilt.report.labels.DEFAULT_POSITIVE`.

    Returns:
        :class:`ReportData`; ``data`` keys: ``report_version``, ``output``, ``shards``, ``run``,
        ``warnings``, ``columns``, ``overview``, ``download``, ``filter`` (None without score
        columns), ``captions`` (None without caption columns), ``labels`` (None without
        ``label_col`` or without readable shards; see :func:`capfilt.report.labels.label_report`),
        ``filters`` (None when no curation filter ran; :mod:`capfilt.report.filters`), ``failures``
        (failed rows by class and by domain, with examples; :mod:`capfilt.report.failures`),
        ``samples``, ``borderline``.

    Raises:
        OutputError: if ``out`` is not a folder, or holds other files but neither a run record nor
        a Parquet shard (not a capfilt output: nothing is written into it). Unreadable shards and a missing or
        partial ``run.json`` are reported in ``warnings`` instead.
        LabelError: if ``label_col`` is not a column of the output, the output has no web scores,
            or no label value is positive.
    """
    loc = locate(out) if isinstance(out, str) else out
    shards = find_shards(loc)
    record, warnings = read_run_record(loc)
    if record is None and not shards and _foreign_names(loc):  # never write into someone else's folder
        raise OutputError(f"{loc.uri} is not a capfilt output: it has no {META_DIR}/run.json and no Parquet "
                          f"shards, but other files ({', '.join(_foreign_names(loc)[:3])}). Give the --output "
                          f"folder of a `capfilt run`.")
    complete = [s for s in shards if s.complete]
    incomplete = [s.name for s in shards if not s.complete]
    if incomplete:
        warnings.append(f"{len(incomplete)} shard(s) without a .stats.json were skipped (incomplete: "
                        f"still being written or the run was interrupted)")
    if not shards:
        warnings.append("no Parquet shards found: nothing has been written yet")
    if record and record.get("status") in ("running", "incomplete"):
        warnings.append(f"run.json says the run is {record['status']!r}: it was interrupted or is still going")

    labels = scorer = None
    if label_col is not None:
        scorer = _label_setup(loc, complete, label_col)
        if scorer is None:
            warnings.append(f"no complete shard could be read: the filter was not evaluated against {label_col!r}")
        else:
            labels = LabelScores(label_col)
    scan = Scan(record, samples, seed, borderline, labels, scorer)
    for i, shard in enumerate(complete):
        scan.add_shard(i, shard, loc)
    scan.resolve_texts(complete, loc)
    warnings += scan.warnings
    input_rows = (record or {}).get("input_rows")
    if isinstance(input_rows, int) and not isinstance(input_rows, bool) and scan.rows < input_rows:
        warnings.append(f"read {scan.rows:,} of the run's {input_rows:,} input rows")

    data: dict[str, Any] = {
        "report_version": REPORT_VERSION,
        "output": loc.uri,
        "shards": {"found": len(shards), "complete": len(complete),
                   "read": sum(1 for r in scan.per_shard if "rows" in r),
                   "incomplete": len(incomplete), "incomplete_files": incomplete,
                   "rows_per_shard_read": [r["rows"] for r in scan.per_shard if "rows" in r]},
        "run": run_section(record),
        "warnings": warnings,
        "columns": sorted(scan.columns),
        "overview": scan.overview(),
        "download": scan.download(),
        "filter": scan.filter(),
        "captions": scan.captions(),
        "filters": scan.filters.section(scan.rows),
        "failures": scan.failures.section(scan.rows, (record or {}).get("retries")),
        "labels": None,
    }
    if labels is not None and scorer is not None:
        thr = config_get(record, "select", f"{scorer}_threshold")
        thr = float(thr) if isinstance(thr, (int, float)) and not isinstance(thr, bool) else None
        data["labels"] = label_report(labels, scorer, thr, split_values(label_positive))

    # pass 2: the rows shown, image bytes included
    picks = {"samples": scan.reservoir.result(), "lowest_kept_web": scan.low_kept.result(),
             "highest_dropped_web": scan.high_dropped.result(), "failure_examples": scan.failures.image_picks()}
    removed = scan.filters.picks() if data["filters"] else set()
    rows = fetch_rows(loc, complete, {p for ps in picks.values() for p in ps} | removed, scan.primary, scan.selected,
                      warnings)
    images = {r["key"]: r.pop("_image") for r in rows.values() if r.get("_image") is not None}
    for r in rows.values():
        r.pop("_image", None)
    details = read_details(loc, complete, set(rows))
    blur_flagged(rows, images, details)  # NSFW images blurred here, before anything renders them
    if data["filters"]:
        data["filters"]["removed_samples"] = scan.filters.removed_samples(rows, details)
    data["samples"] = [rows[p] for p in picks["samples"] if p in rows]
    data["borderline"] = {"scorer": scan.primary,
                          "lowest_kept_web": [rows[p] for p in picks["lowest_kept_web"] if p in rows],
                          "highest_dropped_web": [rows[p] for p in picks["highest_dropped_web"] if p in rows]}
    return ReportData(data, images)


def fetch_rows(loc: Location, shards: list[ShardFile], picks: set[tuple[int, int]], primary: str | None,
               selected: bool, warnings: list[str]) -> dict[tuple[int, int], dict[str, Any]]:
    """Read the picked ``(shard index, row index)`` rows, ``image`` included, one row group at a time.

    Returns:
        :func:`row_summary` of each row by its pick; rows of a shard that fails here are left out
        (with a warning).
    """
    by_shard: dict[int, list[int]] = {}
    for sh, r in picks:
        by_shard.setdefault(sh, []).append(r)
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for sh, rows in sorted(by_shard.items()):
        shard = shards[sh]
        try:
            pf = pq.ParquetFile(shard.path, filesystem=loc.fs)
            starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
            wanted = np.array(sorted(rows))
            groups = sorted({int(np.searchsorted(starts, r, side="right") - 1) for r in wanted})
            for g in groups:
                base = int(starts[g])
                for rb in _iter_batches(pf, pf.schema_arrow.names, [g], batch_size=256):
                    local = wanted[(wanted >= base) & (wanted < base + rb.num_rows)] - base
                    if local.size:
                        taken = pa.Table.from_batches([rb]).take(pa.array(local))
                        for li, row in zip(local.tolist(), taken.to_pylist()):
                            out[(sh, base + li)] = row_summary(row, shard.name, base + li, primary, selected)
                    base += rb.num_rows
        except (OSError, pa.ArrowException) as e:
            warnings.append(f"sample rows of shard {shard.name} could not be read: {e}")
    return out


def row_summary(row: dict[str, Any], shard: str, index: int, primary: str | None, selected: bool) -> dict[str, Any]:
    """A shown row: its web and synthetic texts, each with its ``primary`` score and kept mark.

    A synthetic caption generated twice for one image and kept once is marked kept on its
    higher-scoring occurrence (the select stage ranks by score). Marks and ``keep`` are ``None``
    when no selection ran. ``_image`` carries the stored bytes (popped by the caller).
    """
    kept = Counter(zip(row.get("captions") or [], row.get("caption_sources") or []))
    web = None
    if row.get("caption") is not None:
        web = {"text": row["caption"], "score": row.get(f"web_{primary}") if primary else None,
               "kept": kept[(row["caption"], schema.SOURCE_WEB)] > 0 if selected else None}
    texts = row.get("synthetic_captions") or []
    raw = (row.get(f"synthetic_{primary}") or []) if primary else []
    scores = [raw[i] if i < len(raw) else None for i in range(len(texts))]
    marks: list[bool | None] = [None] * len(texts)
    if selected:
        for i in sorted(range(len(texts)), key=lambda i: -(scores[i] if scores[i] is not None else -math.inf)):
            pair = (texts[i], schema.SOURCE_SYNTHETIC)
            marks[i] = kept[pair] > 0
            kept[pair] -= marks[i]
    return {
        "key": row.get("key"), "shard": shard, "row": index, "url": row.get("url"),
        "status": row.get("status"), "width": row.get("width"), "height": row.get("height"),
        "original_width": row.get("original_width"), "original_height": row.get("original_height"),
        "keep": row.get("keep") if selected else None, "drop_reason": row.get("drop_reason") if selected else None,
        "scorer": primary, "web": web,
        "synthetic": [{"text": t, "score": scores[i], "kept": marks[i]} for i, t in enumerate(texts)],
        "_image": row.get("image"),
    }


def truncation_line(filt: dict[str, Any] | None) -> str | None:
    """The report's one sentence on web captions longer than the filter reads, or ``None`` (none, or not recorded).

    Args:
        filt: the report's ``filter`` section (:meth:`ReportScan.filter`).
    """
    tr = (filt or {}).get("web_text_truncated")
    if not tr or not tr["truncated"]:
        return None
    n, limit = tr["truncated"], tr.get("max_text_tokens")
    what = f"the filter reads ({limit} tokens)" if limit else "the scorer reads (CLIP's context)"
    first = f"first {limit} tokens" if limit else "first tokens"
    return (f"{n:,} of {tr['measured']:,} web captions ({n / tr['measured']:.1%}) were longer than {what} and were "
            f"judged on their {first}; a kept one is stored whole (column web_text_truncated).")
