"""The report's "Curation filters" section: what the blocklist, language-ID, decontamination,
safety and dedup stages did (counts per filter, web-caption languages, NSFW score histogram).

Streaming and bounded: :class:`FilterStats` keeps counters and a fixed histogram, fed one record
batch at a time by :class:`capfilt.report.stats.Scan`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from capfilt import schema

#: Statuses set by the curation filters, in pipeline order, with the filter that sets each.
FILTER_STATUSES: dict[str, str] = {schema.BLOCKED_CONTENT: "blocklist", schema.WRONG_LANGUAGE: "langid",
                                   schema.CONTAMINATED: "decontam", schema.NSFW: "safety",
                                   schema.DUPLICATE: "dedup"}
#: Bins of the NSFW score histogram over [0, 1].
NSFW_BINS = 10
#: Languages listed by name before the rest are summed as "other".
TOP_LANGS = 12


class FilterStats:
    """Counters of the filter columns over every row read."""

    def __init__(self) -> None:
        self.statuses: Counter[str] = Counter()
        self.langs: Counter[str] = Counter()
        self.web_unusable = 0
        self.nsfw_hist = np.zeros(NSFW_BINS, np.int64)
        self.columns: set[str] = set()

    def add(self, rb: pa.RecordBatch, cols: set[str]) -> None:
        """Count one record batch (any subset of the filter columns may be present)."""
        # every output has these columns (the contract), all null when the filter did not run
        self.columns |= {c for c in cols & {"web_lang", "web_lang_ok", "nsfw_score"} if rb.column(c).null_count < rb.num_rows}
        for s, c in Counter(rb.column("status").to_pylist()).items():
            if s in FILTER_STATUSES:
                self.statuses[s] += c
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
        if not self.columns and not self.statuses:
            return None
        langs = self.langs.most_common(TOP_LANGS)
        other = sum(self.langs.values()) - sum(c for _, c in langs)
        return {
            "rows": rows,
            "removed": [{"filter": f, "status": s, "rows": self.statuses.get(s, 0)}
                        for s, f in FILTER_STATUSES.items()],
            "web_langs": dict(langs + ([("other", other)] if other else [])) if "web_lang" in self.columns else None,
            "web_captions_unusable": self.web_unusable if "web_lang_ok" in self.columns else None,
            "nsfw_score_hist": ({"bins": NSFW_BINS, "counts": self.nsfw_hist.tolist()}
                                if "nsfw_score" in self.columns else None),
        }
