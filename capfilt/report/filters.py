"""The report's "Curation filters" section: what the blocklist, language-ID, decontamination,
safety, dedup and semantic-dedup stages did (counts per filter, web-caption languages, NSFW score
histogram, and a grid of sample rows each filter removed).

Streaming and bounded: :class:`FilterStats` keeps counters, a fixed histogram and one seeded
reservoir of removed-row positions per filter, fed one record batch at a time by
:class:`capfilt.report.stats.Scan`; the picked rows are read back with their images in the
report's second pass (:meth:`FilterStats.removed_samples`).

**NSFW thumbnails are blurred here, on the server**: the stored bytes of any shown row that the
NSFW detector flagged or scored >= :data:`BLUR_AT` are replaced by a heavily blurred, downscaled
JPEG (Pillow) before the HTML is built, so the unblurred image never reaches the page (rows with
status ``nsfw`` have no stored bytes at all: the safety stage drops them).
"""

from __future__ import annotations

import io
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from capfilt import schema
from capfilt.report.accumulate import Reservoir

#: Statuses set by the curation filters, in pipeline order, with the filter that sets each.
FILTER_STATUSES: dict[str, str] = {schema.BLOCKED_CONTENT: "blocklist", schema.WRONG_LANGUAGE: "langid",
                                   schema.CONTAMINATED: "decontam", schema.NSFW: "safety",
                                   schema.DUPLICATE: "dedup"}
#: Drop reasons set by a filter after the run (not a status: the row was scored), with the filter.
FILTER_DROP_REASONS: dict[str, str] = {schema.DROP_SEMANTIC_DUPLICATE: "semdedup"}
#: Removed rows shown per filter.
REMOVED_SAMPLES = 6
#: Shown images with an NSFW score at or above this (or status ``nsfw``) are blurred.
BLUR_AT = 0.3
#: Gaussian blur radius, in pixels of the (at most :data:`BLUR_PX`) downscaled image.
BLUR_RADIUS = 12
BLUR_PX = 160
#: Bins of the NSFW score histogram over [0, 1].
NSFW_BINS = 10
#: Languages listed by name before the rest are summed as "other".
TOP_LANGS = 12


class FilterStats:
    """Counters of the filter columns over every row read."""

    def __init__(self, seed: int = 0) -> None:
        self.statuses: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.removed = {f: Reservoir(REMOVED_SAMPLES, seed + i)
                        for i, f in enumerate([*FILTER_STATUSES.values(), *FILTER_DROP_REASONS.values()])}
        self.langs: Counter[str] = Counter()
        self.web_unusable = 0
        self.nsfw_hist = np.zeros(NSFW_BINS, np.int64)
        self.columns: set[str] = set()

    def add(self, rb: pa.RecordBatch, cols: set[str], shard: int = 0, offset: int = 0) -> None:
        """Count one record batch (any subset of the filter columns may be present) at row ``offset``
        of shard index ``shard``, offering its removed rows to each filter's sample."""
        # every output has these columns (the contract), all null when the filter did not run
        self.columns |= {c for c in cols & {"web_lang", "web_lang_ok", "nsfw_score"} if rb.column(c).null_count < rb.num_rows}
        status = rb.column("status").to_pylist()
        for s, c in Counter(status).items():
            if s in FILTER_STATUSES:
                self.statuses[s] += c
        reasons = rb.column("drop_reason").to_pylist() if "drop_reason" in cols else [None] * rb.num_rows
        for r, c in Counter(reasons).items():
            if r in FILTER_DROP_REASONS:
                self.reasons[r] += c
        for value, f in [*FILTER_STATUSES.items(), *FILTER_DROP_REASONS.items()]:
            col = status if value in FILTER_STATUSES else reasons
            self.removed[f].add(np.array([v == value for v in col], bool), shard, offset)
        if "web_lang" in self.columns:
            self.langs.update(v for v in rb.column("web_lang").to_pylist() if v is not None)
        if "web_lang_ok" in self.columns:
            self.web_unusable += int(pc.sum(pc.invert(rb.column("web_lang_ok").fill_null(True))).as_py() or 0)
        if "nsfw_score" in self.columns:
            v = rb.column("nsfw_score").to_numpy(zero_copy_only=False).astype(float)
            v = v[np.isfinite(v)]
            self.nsfw_hist += np.bincount(np.minimum((v * NSFW_BINS).astype(np.int64), NSFW_BINS - 1),
                                          minlength=NSFW_BINS)

    def section(self, rows: int) -> dict[str, Any] | None:
        """The ``filters`` part of report.json; ``None`` when no filter wrote a value and no row was flagged."""
        if not self.columns and not self.statuses and not self.reasons:
            return None
        langs = self.langs.most_common(TOP_LANGS)
        other = sum(self.langs.values()) - sum(c for _, c in langs)
        return {
            "rows": rows,
            "removed": [{"filter": f, "status": s, "rows": self.statuses.get(s, 0)}
                        for s, f in FILTER_STATUSES.items()]
                       + [{"filter": f, "status": r, "rows": self.reasons.get(r, 0)}
                          for r, f in FILTER_DROP_REASONS.items()],
            "web_langs": dict(langs + ([("other", other)] if other else [])) if "web_lang" in self.columns else None,
            "web_captions_unusable": self.web_unusable if "web_lang_ok" in self.columns else None,
            "nsfw_score_hist": ({"bins": NSFW_BINS, "counts": self.nsfw_hist.tolist()}
                                if "nsfw_score" in self.columns else None),
        }

    def picks(self) -> set[tuple[int, int]]:
        """``(shard index, row)`` positions of the removed rows to show (every filter's sample)."""
        return {p for r in self.removed.values() for p in r.result()}

    def removed_samples(self, rows: dict[tuple[int, int], dict[str, Any]],
                        details: dict[tuple[int, int], dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        """The shown removed rows per filter.

        Args:
            rows: row summaries by position (:func:`capfilt.report.stats.fetch_rows`).
            details: per position ``error_message``, ``nsfw_score``, ``semantic_duplicate_of``
                (:func:`read_details`).

        Returns:
            ``{filter: [row summary + error_message, nsfw_score, semantic_duplicate_of, blurred]}``,
            filters with no removed row left out.
        """
        out: dict[str, list[dict[str, Any]]] = {}
        for f, res in self.removed.items():
            shown = [{**rows[p], **details.get(p, {}), "blurred": to_blur(rows[p], details.get(p, {}))}
                     for p in res.result() if p in rows]
            if shown:
                out[f] = shown
        return out


def to_blur(row: dict[str, Any], details: dict[str, Any]) -> bool:
    """Whether a shown row's image is blurred: status ``nsfw`` or ``nsfw_score >= BLUR_AT``."""
    score = details.get("nsfw_score")
    return row.get("status") == schema.NSFW or (score is not None and score >= BLUR_AT)


def blur_flagged(rows: dict[tuple[int, int], dict[str, Any]], images: dict[str, bytes],
                 details: dict[tuple[int, int], dict[str, Any]]) -> int:
    """Replace, in ``images``, the bytes of every shown row :func:`to_blur` picks by :func:`blur`'s.

    Returns:
        How many images were blurred.
    """
    n = 0
    for p, row in rows.items():
        if to_blur(row, details.get(p, {})) and row.get("key") in images:
            images[row["key"]] = blur(images[row["key"]])
            n += 1
    return n


def read_details(loc: Any, shards: list[Any], picks: set[tuple[int, int]]) -> dict[tuple[int, int], dict[str, Any]]:
    """``error_message``, ``nsfw_score`` and ``semantic_duplicate_of`` of the picked rows (small columns only).

    Args:
        loc: the output folder (:class:`capfilt.io.filesystem.Location`).
        shards: the shards read, by index (``.path``).
        picks: ``(shard index, row)`` positions.
    """
    import pyarrow.parquet as pq

    out: dict[tuple[int, int], dict[str, Any]] = {}
    wanted = ("error_message", "nsfw_score", "semantic_duplicate_of")
    for sh in sorted({s for s, _ in picks}):
        try:
            pf = pq.ParquetFile(shards[sh].path, filesystem=loc.fs)
            cols = [c for c in wanted if c in pf.schema_arrow.names]
            t = pf.read(columns=cols) if cols else None
        except (OSError, pa.ArrowException):
            continue  # the second pass warns about unreadable shards already
        for s, r in picks:
            if s == sh and t is not None and r < t.num_rows:
                out[(s, r)] = {c: t.column(c)[r].as_py() for c in cols}
    return out


def blur(image: bytes) -> bytes:
    """A blurred JPEG of an encoded image: downscaled to :data:`BLUR_PX` px, Gaussian radius
    :data:`BLUR_RADIUS` (nothing recognisable survives). Undecodable bytes give a grey tile."""
    from PIL import Image, ImageFilter

    try:
        with Image.open(io.BytesIO(image)) as im:
            im = im.convert("RGB")
            im.thumbnail((BLUR_PX, BLUR_PX))
            im = im.filter(ImageFilter.GaussianBlur(BLUR_RADIUS))
    except OSError:
        im = Image.new("RGB", (BLUR_PX, BLUR_PX), (128, 128, 128))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=60)
    return buf.getvalue()
