"""Streaming accumulators of the report: moments, fixed-bin histograms, text statistics, top-k, sampling.

Each one takes numpy arrays or Python texts batch by batch and gives the same result as a single
computation over all rows (checked by tests/helpers/report_expect.py), in memory bounded by its bins / k,
except :class:`TextStats` with duplicate tracking, which keeps 8 bytes per caption (a hash).
"""

from __future__ import annotations

import heapq
import math
import re
from array import array
from collections.abc import Iterable
from typing import Any

import numpy as np

#: Word-count histograms: index i counts texts of i words; the last index counts >= MAX_WORDS words.
MAX_WORDS = 40
TOP_CAPTIONS = 15
REPETITIVE_EXAMPLES = 8

_WORD = re.compile(r"[\w']+")


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


class Moments:
    """Count, sum, min, max of a stream of numbers (float64 sums)."""

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, v: np.ndarray) -> None:
        """Fold a float array (any shape; NaN ignored) into the running statistics."""
        if v.size:
            self.count += int(v.size)
            self.total += float(v.sum(dtype=np.float64))
            self.min = min(self.min, float(v.min()))
            self.max = max(self.max, float(v.max()))

    def as_dict(self) -> dict[str, Any]:
        """The statistics as JSON-ready numbers."""
        if not self.count:
            return {"count": 0, "mean": None, "min": None, "max": None}
        return {"count": self.count, "mean": self.total / self.count, "min": self.min, "max": self.max}


class ScoreHist:
    """Histogram of scores over a fixed range plus moments and the count below the threshold."""

    def __init__(self, lo: float, hi: float, bins: int, threshold: float | None) -> None:
        self.lo, self.hi, self.bins, self.threshold = lo, hi, bins, threshold
        self.counts = np.zeros(bins, np.int64)
        self.moments = Moments()
        self.below = 0

    def add(self, v: np.ndarray) -> None:
        """Fold a float array (any shape; NaN ignored) into the running statistics."""
        v = v[np.isfinite(v)].astype(np.float64)
        self.moments.add(v)
        self.counts += np.histogram(np.clip(v, self.lo, self.hi), bins=self.bins, range=(self.lo, self.hi))[0]
        if self.threshold is not None:
            self.below += int((v < self.threshold).sum())

    def as_dict(self) -> dict[str, Any]:
        """The statistics as JSON-ready numbers."""
        d = self.moments.as_dict()
        d["histogram"] = {"range": [self.lo, self.hi], "bins": self.bins, "counts": self.counts.tolist()}
        if self.threshold is not None:
            d["below_threshold"] = self.below
            d["below_threshold_share"] = self.below / d["count"] if d["count"] else None
        return d


class TextStats:
    """Word-length histogram, back-to-back repetition and (optionally) exact-duplicate tracking.

    Duplicates are counted on 64-bit hashes of the texts (Python's ``hash`` of ``str``, stable
    within one process) kept in flat ``array('q')`` buffers: 8 bytes per caption plus 8 per
    distinct (text, image) pair, instead of a dict entry per distinct text. The texts of the most
    frequent hashes are remembered while few distinct texts have been seen (``TEXT_CACHE``);
    beyond that the caller resolves them with :meth:`missing_texts` / :meth:`learn` in a second
    pass over the caption column.
    """

    TEXT_CACHE = 50_000

    def __init__(self, track_duplicates: bool) -> None:
        self.lengths = np.zeros(MAX_WORDS + 1, np.int64)
        self.count = 0
        self.words = 0
        self.repetitive = 0
        self.examples: list[str] = []
        self.track = track_duplicates
        self._occ = array("q")  # hash of every text, in reading order
        self._img = array("q")  # hash of every distinct text of each image
        self._texts: dict[int, str] = {}
        self._dups: dict[str, Any] | None = None

    def add_row(self, texts: Iterable[str]) -> None:
        """Add the texts of one image (row)."""
        seen: set[int] = set()
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
                h = hash(t)
                self._occ.append(h)
                if h not in seen:
                    seen.add(h)
                    self._img.append(h)
                if len(self._texts) < self.TEXT_CACHE:
                    self._texts.setdefault(h, t)

    def _duplicates(self) -> dict[str, Any]:
        """Distinct texts, occurrences in texts shared by >= 2 images, and the top hashes
        ordered by (count desc, first appearance)."""
        if self._dups is None:
            occ = np.frombuffer(self._occ, dtype=np.int64) if len(self._occ) else np.zeros(0, np.int64)
            img = np.frombuffer(self._img, dtype=np.int64) if len(self._img) else np.zeros(0, np.int64)
            uniq, first, counts = np.unique(occ, return_index=True, return_counts=True)
            img_uniq, img_counts = np.unique(img, return_counts=True)
            images = img_counts[np.searchsorted(img_uniq, uniq)] if uniq.size else np.zeros(0, np.int64)
            order = np.lexsort((first, -counts))[:TOP_CAPTIONS]
            self._dups = {"distinct": int(uniq.size), "in_dup": int(counts[images >= 2].sum()),
                          "top": [(int(uniq[i]), int(counts[i]), int(images[i])) for i in order]}
        return self._dups

    def missing_texts(self) -> set[int]:
        """Hashes of the most frequent texts whose text is not known yet (empty when all are)."""
        if not self.track:
            return set()
        return {h for h, _, _ in self._duplicates()["top"] if h not in self._texts}

    def learn(self, texts: Iterable[str], missing: set[int]) -> None:
        """Second pass: remember each text whose hash is in ``missing`` (removed from it once known)."""
        for t in texts:
            h = hash(t)
            if h in missing:
                self._texts[h] = t
                missing.discard(h)

    def as_dict(self) -> dict[str, Any]:
        """Counts, mean words, length histogram, repetition; with tracking also ``distinct``,
        ``in_duplicate_groups``, ``duplicate_share`` and ``most_frequent`` texts."""
        d: dict[str, Any] = {
            "count": self.count,
            "mean_words": self.words / self.count if self.count else None,
            "length_counts": self.lengths.tolist(),
            "repetitive": self.repetitive,
            "repetition_rate": self.repetitive / self.count if self.count else None,
            "repetitive_examples": list(self.examples),
        }
        if self.track:
            dups = self._duplicates()
            d["distinct"] = dups["distinct"]
            d["in_duplicate_groups"] = dups["in_dup"]
            d["duplicate_share"] = dups["in_dup"] / self.count if self.count else None
            d["most_frequent"] = [{"text": self._texts.get(h), "count": c, "images": n} for h, c, n in dups["top"]]
        return d


class TopK:
    """The k rows with the smallest ``sign * score`` seen so far: ``(score, shard, row)``."""

    def __init__(self, k: int, largest: bool) -> None:
        self.k, self.sign = k, (-1.0 if largest else 1.0)
        self.heap: list[tuple[float, int, int]] = []  # max-heap on sign*score via negation

    def add(self, scores: np.ndarray, shard: int, rows: np.ndarray) -> None:
        """Offer ``scores`` (float32 ``(N,)``) of rows ``rows`` of shard ``shard``; keeps the best k."""
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
        """The kept ``(shard, row)`` positions, best first."""
        items = sorted((-s, -sh, -r) for s, sh, r in self.heap)
        return [(sh, r) for _, sh, r in items]


class Reservoir:
    """Uniform sample of n rows: every row gets a seeded random priority; the n smallest win."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.rng = np.random.default_rng(seed)
        self.items: list[tuple[float, int, int]] = []

    def add(self, mask: np.ndarray, shard: int, offset: int) -> None:
        """Offer the rows where ``mask`` (bool ``(N,)``) is true, at ``offset`` within shard ``shard``."""
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
        """The sampled ``(shard, row)`` positions, in shard/row order."""
        return sorted((sh, r) for _, sh, r in heapq.nsmallest(self.n, self.items))
