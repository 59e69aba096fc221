"""Filter vs ground-truth labels (``capfilt report --label-col COL``): how well the web-caption
filter separates matching captions from noisy ones.

A label value is *positive* (the web caption matches its image: ``clean``, ``true``, ...) or a
kind of noise (``unrelated``, ``wrong_count``, ...). Every metric here takes **noisy** as the
positive class and **removed** (web score below the threshold) as the prediction, so precision
and recall are those of *removing* noisy captions; the clean keep rate is the share of clean
captions the filter keeps. Only labelled rows whose web caption was scored take part; rows that
were not scored (download failed, no web caption, scoring failed) are counted per label apart.

:class:`LabelScores` collects 6 bytes a row while the report streams the shards (an ``int16``
label code and a ``float32`` score); the plain functions below compute the confusion matrix,
the curves and the suggested thresholds from those arrays.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from capfilt.errors import LabelError
from capfilt.schema import CONTRACT_COLUMNS

#: Label values meaning "the web caption matches its image" when ``--label-positive`` is not given
#: (compared case-insensitively, surrounding spaces ignored).
DEFAULT_POSITIVE = ("clean", "true", "1", "yes", "match", "matched", "good", "positive")
#: Web score columns tried in order (ITM is the recipe's probability; CLIP for CLIP-only runs).
SCORER_ORDER = ("itm", "clip", "itc")
#: Threshold used when the run record has none for the scorer.
DEFAULT_THRESHOLD = 0.5
#: Points of the precision/recall-vs-threshold curve.
CURVE_POINTS = 101
#: The second suggested threshold keeps at least this share of clean captions.
MIN_CLEAN_KEEP = 0.9
#: A label column with more distinct values is refused (it is probably not a label column).
MAX_LABEL_VALUES = 100


def _norm(value: str) -> str:
    return value.strip().lower()


def passthrough_columns(columns: Iterable[str]) -> list[str]:
    """The input columns a capfilt output passed through (every column not in the output contract), sorted."""
    return sorted(c for c in columns if c not in CONTRACT_COLUMNS)


def check_label_column(columns: Iterable[str], column: str) -> None:
    """Raise unless ``column`` is one of the output's ``columns``.

    Raises:
        LabelError: naming the column and listing the pass-through columns there are.
    """
    cols = set(columns)
    if column in cols:
        return
    have = passthrough_columns(cols)
    listed = ", ".join(have) if have else "none (the input had no extra columns, or --keep-columns left them out)"
    raise LabelError(f"label column {column!r} is not in this output; its pass-through input columns are: {listed}")


def label_scorer(columns: Iterable[str]) -> str:
    """The web score evaluated: ``itm`` if ``web_itm`` exists, else ``clip``, else ``itc``.

    Raises:
        LabelError: if the output has no web score column (a ``download`` run: nothing was filtered).
    """
    cols = set(columns)
    for s in SCORER_ORDER:
        if f"web_{s}" in cols:
            return s
    raise LabelError("this output has no web caption scores (web_itm, web_clip or web_itc): nothing was "
                     "filtered, so there is nothing to evaluate against labels (a `download` run?)")


def split_values(given: Sequence[str] | None) -> list[str] | None:
    """``--label-positive`` values, each option possibly comma-separated, blanks dropped; None if not given."""
    if not given:
        return None
    out = [v.strip() for g in given for v in g.split(",")]
    return [v for v in out if v] or None


def positive_values(values: Sequence[str], column: str, given: Sequence[str] | None = None) -> list[str]:
    """Which of the column's distinct ``values`` mean "the web caption matches its image".

    Args:
        values: the label column's distinct non-null values (as strings).
        column: the column name (for the message).
        given: ``--label-positive`` values (already split), or None for :data:`DEFAULT_POSITIVE`.
            Matching is case-insensitive and ignores surrounding spaces.

    Returns:
        The positive values among ``values``, in ``values`` order.

    Raises:
        LabelError: if none of ``values`` is positive (says which values there are and to pass
            ``--label-positive``).
    """
    wanted = {_norm(v) for v in (given if given else DEFAULT_POSITIVE)}
    pos = [v for v in values if _norm(v) in wanted]
    if not pos:
        shown = ", ".join(repr(v) for v in values[:20]) + (" ..." if len(values) > 20 else "")
        which = (f"none of {', '.join(repr(v) for v in given)} (given with --label-positive)" if given
                 else f"none of the default positive values ({', '.join(DEFAULT_POSITIVE)})")
        raise LabelError(f"label column {column!r} has {'values ' + shown if values else 'no non-null values'}; "
                         f"{which} is among them. Pass --label-positive VALUE (repeatable or comma-separated) "
                         f"with the value(s) meaning the web caption matches its image")
    return pos


class LabelScores:
    """Per row, the label (as a small code) and the web score, collected batch by batch.

    Args:
        column: name of the label column (for messages).

    Memory: 6 bytes a row (``int16`` code + ``float32`` score) plus the distinct label values,
    at most :data:`MAX_LABEL_VALUES`.
    """

    def __init__(self, column: str) -> None:
        self.column = column
        self.values: list[str] = []  # code -> label value (as a string)
        self._codes: dict[str, int] = {}
        self._code_parts: list[np.ndarray] = []
        self._score_parts: list[np.ndarray] = []

    def add(self, labels: pa.Array | None, scores: np.ndarray) -> None:
        """Add one batch.

        Args:
            labels: the label column of the batch (strings, integers or booleans; null = no label),
                or None when the shard lacks the column (every row unlabelled).
            scores: ``(N,)`` float web scores, NaN where the web caption was not scored.

        Raises:
            LabelError: if the column's type cannot be read as labels, or it has more than
                :data:`MAX_LABEL_VALUES` distinct values.
        """
        n = scores.shape[0]
        codes = np.full(n, -1, np.int16)
        if labels is not None and labels.null_count < n:
            try:
                text = pc.cast(labels, pa.string())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise LabelError(f"label column {self.column!r} has type {labels.type}, which cannot be read "
                                 f"as labels (use a column of strings, integers or booleans): {e}") from None
            enc = pc.dictionary_encode(text)
            local = np.array([self._code(v) for v in enc.dictionary.to_pylist()] + [-1], np.int16)
            idx = np.asarray(enc.indices.fill_null(len(local) - 1).to_numpy(zero_copy_only=False), np.int64)
            codes = local[idx]
        self._code_parts.append(codes)
        self._score_parts.append(np.asarray(scores, np.float32))

    def _code(self, value: str) -> int:
        code = self._codes.get(value)
        if code is None:
            if len(self.values) >= MAX_LABEL_VALUES:
                raise LabelError(f"label column {self.column!r} has more than {MAX_LABEL_VALUES} distinct values: "
                                 f"it does not look like a label column (give one whose values are, e.g., "
                                 f"clean / unrelated / wrong_count)")
            code = self._codes[value] = len(self.values)
            self.values.append(value)
        return code

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(codes, scores)``: ``int16 (N,)`` label codes into :attr:`values` (-1 = no label) and
        ``float32 (N,)`` web scores (NaN = not scored), in reading order."""
        if not self._code_parts:
            return np.zeros(0, np.int16), np.zeros(0, np.float32)
        return np.concatenate(self._code_parts), np.concatenate(self._score_parts)


# ------------------------------------------------------------------------------------ metrics
def confusion(codes: np.ndarray, scores: np.ndarray, n_labels: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Web captions kept / removed per label at ``threshold`` (kept when ``score >= threshold``).

    Args:
        codes: ``int (N,)`` label codes in ``[0, n_labels)`` of scored rows.
        scores: ``float (N,)`` their web scores (finite).
        n_labels: number of label values.
        threshold: the filter threshold, in score units.

    Returns:
        ``(kept, removed)``: ``int64 (n_labels,)`` counts per label code.
    """
    removed_mask = scores < threshold
    removed = np.bincount(codes[removed_mask], minlength=n_labels).astype(np.int64)
    total = np.bincount(codes, minlength=n_labels).astype(np.int64)
    return total - removed, removed


def _div(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    """``a / b`` as float64, NaN where ``b == 0``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1.0), np.nan)


def removal_metrics(kept: np.ndarray, removed: np.ndarray, positive: np.ndarray) -> dict[str, Any]:
    """Precision, recall and F1 of removing noisy captions, clean keep rate and accuracy.

    Args:
        kept: ``int (L,)`` or ``int (L, T)`` web captions kept per label (and threshold).
        removed: same shape, removed.
        positive: ``bool (L,)`` whether each label means "matches" (clean).

    Returns:
        ``tp`` (noisy removed), ``fp`` (clean removed), ``fn`` (noisy kept), ``tn`` (clean kept),
        ``precision``, ``recall``, ``f1``, ``clean_keep_rate``, ``accuracy``; ints and floats for 1-D
        input (NaN where undefined: nothing removed, no noisy or no clean rows), arrays over
        thresholds for 2-D input.
    """
    noisy = ~np.asarray(positive, bool)
    tp, fn = removed[noisy].sum(axis=0), kept[noisy].sum(axis=0)
    fp, tn = removed[~noisy].sum(axis=0), kept[~noisy].sum(axis=0)
    out = {"tp": tp, "fp": fp, "fn": fn, "tn": tn,
           "precision": _div(tp, tp + fp), "recall": _div(tp, tp + fn), "f1": _div(2 * tp, 2 * tp + fp + fn),
           "clean_keep_rate": _div(tn, tn + fp), "accuracy": _div(tp + tn, tp + tn + fp + fn)}
    if np.ndim(kept) == 1:
        return {k: (int(v) if k in ("tp", "fp", "fn", "tn") else float(v)) for k, v in out.items()}
    return out


def threshold_grid(scorer: str, scores: np.ndarray, points: int = CURVE_POINTS) -> np.ndarray:
    """Thresholds of the curve: ``points`` evenly spaced over [0, 1] for ITM (a probability), over the
    observed range rounded out to 0.01 for cosines (ITC, CLIP: a narrow band of [-1, 1]).

    Returns:
        ``float64 (points,)``, ascending.
    """
    if scorer == "itm" or scores.size == 0:
        lo, hi = (0.0, 1.0) if scorer == "itm" else (-1.0, 1.0)
    else:
        lo, hi = np.floor(float(scores.min()) * 100) / 100, np.ceil(float(scores.max()) * 100) / 100
        if hi <= lo:
            hi = lo + 0.01
    return np.linspace(lo, hi, points)


def removed_by_threshold(codes: np.ndarray, scores: np.ndarray, n_labels: int, thresholds: np.ndarray) -> np.ndarray:
    """Web captions removed (``score < t``) per label and threshold.

    Args:
        codes: ``int (N,)`` label codes of scored rows; scores: ``float (N,)`` their scores.
        thresholds: ``float (T,)``.

    Returns:
        ``int64 (n_labels, T)``.
    """
    out = np.zeros((n_labels, thresholds.size), np.int64)
    for c in range(n_labels):
        s = np.sort(scores[codes == c].astype(np.float64))
        out[c] = np.searchsorted(s, thresholds, side="left")
    return out


def suggest_thresholds(scores: np.ndarray, noisy: np.ndarray,
                       min_clean_keep: float = MIN_CLEAN_KEEP) -> tuple[float | None, float | None]:
    """Two suggested thresholds, searched exactly over every distinct way to split the scores.

    Candidates are the lowest score (nothing removed) and each midpoint between two consecutive
    distinct scores; a caption is removed when its score is below the threshold.

    Args:
        scores: ``float (N,)`` web scores of labelled, scored rows (finite).
        noisy: ``bool (N,)`` whether each row's label is a kind of noise.
        min_clean_keep: share of clean captions the second threshold must keep.

    Returns:
        ``(best_f1, clean_keep)``: the threshold maximizing F1 of removing noisy captions (the lowest
        one on ties; None without noisy rows), and the highest threshold that keeps at least
        ``min_clean_keep`` of clean captions (None without clean rows).
    """
    if scores.size == 0:
        return None, None
    s = scores.astype(np.float64)
    uniq, inv = np.unique(s, return_inverse=True)
    noisy_per = np.bincount(inv, weights=noisy.astype(np.float64), minlength=uniq.size)
    clean_per = np.bincount(inv, weights=(~noisy).astype(np.float64), minlength=uniq.size)
    # candidate k removes the groups 0..k-1: k = 0 (threshold uniq[0]) .. len-1 (midpoints)
    cand = np.concatenate([uniq[:1], (uniq[:-1] + uniq[1:]) / 2])
    tp = np.concatenate([[0.0], np.cumsum(noisy_per)[:-1]])
    fp = np.concatenate([[0.0], np.cumsum(clean_per)[:-1]])
    n_noisy, n_clean = float(noisy_per.sum()), float(clean_per.sum())
    best = None
    if n_noisy > 0:
        f1 = 2 * tp / (2 * tp + fp + (n_noisy - tp))
        best = float(cand[int(np.argmax(f1))])
    keep = None
    if n_clean > 0:
        ok = np.flatnonzero((n_clean - fp) / n_clean >= min_clean_keep - 1e-12)
        keep = float(cand[ok[-1]])  # k = 0 keeps every clean caption, so ok is never empty
    return best, keep


# ------------------------------------------------------------------------------------ report
def _class_rows(values: list[str], positive: np.ndarray, totals: np.ndarray, unscored: np.ndarray,
                kept: np.ndarray, removed: np.ndarray, order: list[int]) -> list[dict[str, Any]]:
    rows = []
    for c in order:
        scored = int(kept[c] + removed[c])
        rows.append({"label": values[c], "positive": bool(positive[c]), "rows": int(totals[c]), "scored": scored,
                     "unscored": int(unscored[c]), "kept": int(kept[c]), "removed": int(removed[c]),
                     "kept_rate": float(_div(kept[c], scored)), "removed_rate": float(_div(removed[c], scored))})
    return rows


def _at(codes: np.ndarray, scores: np.ndarray, values: list[str], positive: np.ndarray, order: list[int],
        threshold: float) -> dict[str, Any]:
    """Metrics and per-label kept/removed of the scored rows at one threshold."""
    kept, removed = confusion(codes, scores, len(values), threshold)
    return {"threshold": threshold, **removal_metrics(kept, removed, positive),
            "kept": int(kept.sum()), "removed": int(removed.sum()),
            "classes": [{"label": values[c], "kept": int(kept[c]), "removed": int(removed[c])} for c in order]}


def label_report(acc: LabelScores, scorer: str, threshold: float | None, given_positive: Sequence[str] | None = None,
                 min_clean_keep: float = MIN_CLEAN_KEEP, points: int = CURVE_POINTS) -> dict[str, Any]:
    """Everything the report shows about the filter vs the labels (the ``labels`` key of report.json).

    Args:
        acc: the collected labels and web scores.
        scorer: the web score evaluated (``itm`` | ``clip`` | ``itc``).
        threshold: the recipe's threshold for ``scorer`` (``select.<scorer>_threshold`` of run.json),
            or None for :data:`DEFAULT_THRESHOLD`.
        given_positive: ``--label-positive`` values (split), or None for :data:`DEFAULT_POSITIVE`.
        min_clean_keep: clean keep rate of the second suggested threshold.
        points: thresholds on the curve.

    Returns:
        ``column``, ``scorer``, ``threshold``, ``threshold_source`` (``recipe`` | ``default``),
        ``positive_values``, ``positive_source`` (``option`` | ``default``), row counts (``rows``,
        ``unlabelled``, ``labelled``, ``scored``, ``unscored``), ``classes`` (per label: rows,
        scored, unscored, kept, removed and rates at the threshold; positive labels first, then
        by rows), ``metrics`` at the threshold, ``curve`` (``thresholds`` and per threshold
        ``precision``, ``recall``, ``f1``, ``clean_keep_rate``, ``removed_share``,
        ``recall_by_label``) and ``suggested`` (``best_f1`` and ``clean_keep`` with metrics and
        per-label kept/removed at each, or None; ``min_clean_keep``).

    Raises:
        LabelError: if no label value is positive (:func:`positive_values`).
    """
    codes, scores = acc.arrays()
    values = acc.values
    n_labels = len(values)
    labelled = codes >= 0
    totals = np.bincount(codes[labelled], minlength=n_labels)
    pos_values = positive_values(sorted(values, key=lambda v: (-int(totals[values.index(v)]), v)), acc.column,
                                 given_positive)
    positive = np.array([v in pos_values for v in values], bool)
    order = sorted(range(n_labels), key=lambda c: (not positive[c], -int(totals[c]), values[c]))
    scored = labelled & np.isfinite(scores)
    unscored = np.bincount(codes[labelled & ~scored], minlength=n_labels)
    sc_codes, sc_scores = codes[scored].astype(np.int64), scores[scored]
    thr = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    kept, removed = confusion(sc_codes, sc_scores, n_labels, thr)

    grid = threshold_grid(scorer, sc_scores, points)
    rem = removed_by_threshold(sc_codes, sc_scores, n_labels, grid)
    per_label = np.bincount(sc_codes, minlength=n_labels)[:, None]
    curve_m = removal_metrics(per_label - rem, rem, positive)
    curve = {"thresholds": grid.tolist(),
             **{k: curve_m[k].tolist() for k in ("precision", "recall", "f1", "clean_keep_rate")},
             "removed_share": _div(rem.sum(axis=0), sc_codes.size).tolist(),
             "recall_by_label": {values[c]: _div(rem[c], per_label[c]).tolist() for c in order if not positive[c]}}

    best, keep = suggest_thresholds(sc_scores, ~positive[sc_codes], min_clean_keep)
    at = lambda t: None if t is None else _at(sc_codes, sc_scores, values, positive, order, t)  # noqa: E731
    return {
        "column": acc.column, "scorer": scorer, "threshold": thr,
        "threshold_source": "default" if threshold is None else "recipe",
        "positive_values": pos_values, "positive_source": "option" if given_positive else "default",
        "rows": int(codes.size), "unlabelled": int((~labelled).sum()), "labelled": int(labelled.sum()),
        "scored": int(scored.sum()), "unscored": int((labelled & ~scored).sum()),
        "classes": _class_rows(values, positive, totals, unscored, kept, removed, order),
        "metrics": removal_metrics(kept, removed, positive),
        "curve": curve,
        "suggested": {"min_clean_keep": min_clean_keep, "best_f1": at(best), "clean_keep": at(keep)},
    }
