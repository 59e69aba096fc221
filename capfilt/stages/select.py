"""Select: the CapFilt decision, from stored scores only (no model, cheap, re-runnable).

BLIP §3.3: the filter removes every text, web or synthetic, whose ITM head predicts "unmatched"
(match probability < 0.5). BLIP-2 §3.4: rank the web caption and the synthetic captions by CLIP
image-text similarity and keep the top two. Both are :class:`capfilt.config.SelectConfig` settings;
``capfilt run --pipeline refilter`` re-runs only this stage on an existing output.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from capfilt.config import SelectConfig
from capfilt.schema import (CAPTION_FIELDS, DROP_BELOW_THRESHOLD, DROP_NO_CANDIDATES, DROP_NOT_DOWNLOADED,
                            SELECT_FIELDS, SOURCE_SYNTHETIC, SOURCE_WEB, SUCCESS)
from capfilt.stages.base import Stage, column_or_nulls, set_field


_TRAILING_PUNCT = ".,;:!?…\"'`)]} "


def normalize_text(text: str) -> str:
    """The form two candidate captions are compared in: lower case, runs of whitespace as one space,
    no surrounding whitespace or trailing punctuation (``"A  dog."`` and ``"a dog"`` are the same).
    """
    return re.sub(r"\s+", " ", text.lower()).strip().rstrip(_TRAILING_PUNCT)


def _distinct(cands: list[tuple[str, str, dict[str, float | None]]]) -> list[tuple[str, str, dict[str, float | None]]]:
    """``cands`` (already ranked best first) without later copies of a text (see :func:`normalize_text`)."""
    seen: set[str] = set()
    out = []
    for c in cands:
        norm = normalize_text(c[0])
        if norm not in seen:
            seen.add(norm)
            out.append(c)
    return out


class SelectStage(Stage):
    """Apply thresholds and ranking to the scored candidates of each row.

    Input columns: ``status``, ``caption``, ``synthetic_captions``, ``web_lang_ok`` (false: the
    web caption is not a candidate; see :mod:`capfilt.stages.langid`) and, for each scorer ``s``,
    ``web_<s>`` / ``synthetic_<s>``. Output columns (schema.SELECT_FIELDS): ``captions`` (kept
    texts, best first by ``rank_by``), ``caption_scores`` (their ``rank_by`` scores, float32),
    ``caption_sources`` (``web`` | ``synthetic``), ``keep`` (at least one text kept) and
    ``drop_reason`` (``not_downloaded`` | ``below_threshold`` | ``no_candidates``, null if kept).
    Rows that did not succeed get null lists and ``keep = False``.

    A candidate whose needed score is null (never computed) does not pass a threshold on it.
    With ``cfg.dedup_texts``, a text equal to a better-ranked one after :func:`normalize_text`
    is dropped before ``top_k`` is applied (ties keep the earlier candidate: web first).
    With no threshold set and no ``rank_by`` column (the ``download`` recipe), the web caption is
    kept as is with a null score.
    """

    name: ClassVar[str] = "select"
    section: ClassVar[str] = "select"
    fields: ClassVar[tuple[pa.Field, ...]] = tuple(SELECT_FIELDS)

    @staticmethod
    def stats(table: pa.Table) -> dict[str, Any]:
        """``keep`` (rows kept) and ``texts_kept`` (kept texts per source, ``web`` / ``synthetic``)."""
        kept = int(pc.sum(table.column("keep")).as_py() or 0) if "keep" in table.column_names else 0
        sources: Counter = Counter()
        for lst in column_or_nulls(table, "caption_sources"):
            sources.update(lst or [])
        return {"keep": kept, "texts_kept": {SOURCE_WEB: sources.get(SOURCE_WEB, 0),
                                             SOURCE_SYNTHETIC: sources.get(SOURCE_SYNTHETIC, 0)}}

    def __init__(self, cfg: SelectConfig):
        self.cfg = cfg

    def __call__(self, batch: pa.Table) -> pa.Table:
        cfg = self.cfg
        thresholds = cfg.thresholds()
        score_names = sorted(set(thresholds) | {cfg.rank_by})
        status = column_or_nulls(batch, "status")
        usable = column_or_nulls(batch, "web_lang_ok")  # false: langid excluded the web caption
        web = [None if ok is False else w for w, ok in zip(column_or_nulls(batch, "caption"), usable)]
        synth = column_or_nulls(batch, CAPTION_FIELDS[0].name)
        web_scores = {s: column_or_nulls(batch, f"web_{s}") for s in score_names}
        syn_scores = {s: column_or_nulls(batch, f"synthetic_{s}") for s in score_names}
        captions, scores, sources, keep, reasons = [], [], [], [], []
        for i in range(batch.num_rows):
            if status[i] != SUCCESS:
                captions.append(None), scores.append(None), sources.append(None)
                keep.append(False), reasons.append(DROP_NOT_DOWNLOADED)
                continue
            cands: list[tuple[str, str, dict[str, float | None]]] = []
            if cfg.include_web and web[i] is not None and web[i].strip():
                cands.append((web[i], SOURCE_WEB, {s: web_scores[s][i] for s in score_names}))
            if cfg.include_synthetic and synth[i]:
                for j, text in enumerate(synth[i]):
                    cands.append((text, SOURCE_SYNTHETIC,
                                  {s: (syn_scores[s][i][j] if syn_scores[s][i] is not None else None)
                                   for s in score_names}))
            passed = [c for c in cands
                      if all(c[2][s] is not None and c[2][s] >= t for s, t in thresholds.items())]
            # stable sort: ties keep candidate order (web first, then generation order)
            passed.sort(key=lambda c: -(c[2][cfg.rank_by] if c[2][cfg.rank_by] is not None else float("-inf")))
            if cfg.dedup_texts:
                passed = _distinct(passed)  # before top_k: duplicates must not take two places
            if cfg.top_k is not None:
                passed = passed[: cfg.top_k]
            captions.append([c[0] for c in passed])
            scores.append([c[2][cfg.rank_by] for c in passed])
            sources.append([c[1] for c in passed])
            keep.append(bool(passed))
            reasons.append(None if passed else (DROP_BELOW_THRESHOLD if cands else DROP_NO_CANDIDATES))
        out = batch
        for field, values in zip(self.fields, (captions, scores, sources, keep, reasons)):
            out = set_field(out, field, values)
        return out
