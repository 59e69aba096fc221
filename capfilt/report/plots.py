"""The report's figures, drawn with matplotlib (Agg backend) from the numbers in the report data.

Every figure is drawn from :func:`capfilt.report.stats.compute_report_data`'s counts (never from
the shards again), so a picture always agrees with the JSON. Figures come back as PNG bytes; the
HTML inlines them as ``data:`` URIs.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

WEB = "#2563eb"
SYNTHETIC = "#ea580c"
OK = "#16a34a"
BAD = "#dc2626"
MUTED = "#94a3b8"
INK = "#1e293b"

_RC = {
    "figure.dpi": 110, "savefig.dpi": 110, "font.size": 9.5, "axes.titlesize": 10.5,
    "axes.titleweight": "bold", "axes.titlelocation": "left", "axes.edgecolor": "#cbd5e1",
    "axes.labelcolor": INK, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": True, "grid.color": "#e2e8f0", "grid.linewidth": 0.8, "axes.axisbelow": True,
    "xtick.color": "#475569", "ytick.color": "#475569", "legend.frameon": False,
    "font.family": "DejaVu Sans",
}


@contextmanager
def _figure(width: float, height: float, ncols: int = 1) -> Iterator[tuple[Any, Any]]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    with matplotlib.rc_context(_RC):
        fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=False)
        try:
            yield fig, axes[0]
        finally:
            plt.close(fig)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", facecolor="white")
    return buf.getvalue()


def status_bars(status_counts: dict[str, int]) -> bytes:
    """Horizontal bars: rows per status (``success`` green, failures red), largest first.

    Args:
        status_counts: ``{status: rows}`` (``overview.status_counts``).

    Returns:
        PNG bytes.
    """
    items = sorted(status_counts.items(), key=lambda kv: kv[1])
    total = sum(status_counts.values()) or 1
    with _figure(6.4, 0.45 * len(items) + 1.0) as (fig, (ax,)):
        names = [k for k, _ in items]
        vals = [v for _, v in items]
        bars = ax.barh(names, vals, color=[OK if k == "success" else BAD for k in names], height=0.6)
        for b, v in zip(bars, vals):
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f"  {v:,} ({v / total:.1%})",
                    va="center", fontsize=8.5, color=INK)
        ax.set_xlim(0, max(vals) * 1.3 if vals else 1)
        ax.set_title("Rows by status")
        ax.set_xlabel("rows")
        ax.grid(axis="y", visible=False)
        return _png(fig)


def size_histograms(sizes: dict[str, dict[str, Any]]) -> bytes:
    """Two panels: image width/height before resize (``original_*``) and as stored after resize.

    Args:
        sizes: ``download.sizes``: per column ``counts`` over bins of ``bin_px`` pixels, the last
            bin open-ended.

    Returns:
        PNG bytes.
    """
    panels = [("Before resize (original)", "original_width", "original_height"),
              ("After resize (stored)", "width", "height")]
    panels = [p for p in panels if p[1] in sizes or p[2] in sizes]
    with _figure(3.6 * len(panels) + 0.4, 2.9, ncols=len(panels)) as (fig, axes):
        for ax, (title, wcol, hcol) in zip(axes, panels):
            for col, color, label in ((wcol, WEB, "width"), (hcol, SYNTHETIC, "height")):
                s = sizes.get(col)
                if not s or not s["count"]:
                    continue
                counts = np.asarray(s["counts"], float)
                nz = np.flatnonzero(counts)
                lo, hi = nz[0], nz[-1] + 1
                edges = np.arange(lo, hi + 1) * s["bin_px"]
                ax.stairs(counts[lo:hi], edges, fill=True, alpha=0.35, color=color)
                ax.stairs(counts[lo:hi], edges, color=color, linewidth=1.4,
                          label=f"{label} (mean {s['mean']:.0f} px)")
            ax.set_title(title)
            ax.set_xlabel("pixels")
            ax.set_ylabel("images")
            ax.legend(fontsize=8)
        return _png(fig)


def _rebin(counts: np.ndarray, lo: float, hi: float, max_bars: int, zoom: bool) -> tuple[np.ndarray, np.ndarray]:
    """Merge neighbouring bins to at most ``max_bars``; with ``zoom``, first trim empty tails
    (keeping a 10 % margin) so a narrow cosine band is not lost in [-1, 1]."""
    n = counts.size
    nz = np.flatnonzero(counts)
    width = (hi - lo) / n
    if nz.size == 0:
        return counts, np.linspace(lo, hi, n + 1)
    a, b = nz[0], nz[-1] + 1
    if zoom:
        pad = max(1, (b - a) // 10)
        a, b = max(0, a - pad), min(n, b + pad)
    else:
        a, b = 0, n
    sub = counts[a:b]
    factor = int(np.ceil(sub.size / max_bars))
    if factor > 1:
        extra = (-sub.size) % factor
        sub = np.concatenate([sub, np.zeros(extra, sub.dtype)])
        b += extra
        sub = sub.reshape(-1, factor).sum(axis=1)
    edges = lo + width * np.arange(a, b + 1, factor)
    return sub, edges


def score_histogram(scorer: str, scores: dict[str, dict[str, Any]], threshold: float | None) -> bytes:
    """Web vs synthetic score distributions (share of texts) with the filter threshold marked.

    Args:
        scorer: ``itm`` | ``itc`` | ``clip``.
        scores: ``filter.scores[scorer]``: ``{"web": {...}, "synthetic": {...}}`` with histograms.
        threshold: drawn as a vertical line with the removed side shaded; None for none.

    Returns:
        PNG bytes.
    """
    label = {"itm": "ITM match probability", "itc": "ITC cosine similarity", "clip": "CLIP cosine similarity"}[scorer]
    series = [(w, c, scores[w]) for w, c in (("web", WEB), ("synthetic", SYNTHETIC))
              if scores.get(w) and scores[w]["count"]]
    with _figure(6.4, 3.0) as (fig, (ax,)):
        lo_hi = None
        if series:
            lo, hi = series[0][2]["histogram"]["range"]
            total = sum(np.asarray(h["histogram"]["counts"], float) for _, _, h in series)
            _, edges = _rebin(total, lo, hi, 40, zoom=scorer != "itm")  # shared bins for both series
            idx = np.clip(np.round((edges - lo) / (hi - lo) * total.size).astype(int), 0, total.size)
            lo_hi = (edges[0], edges[-1])
            for which, color, h in series:
                cum = np.concatenate([[0.0], np.cumsum(h["histogram"]["counts"], dtype=float)])
                share = (cum[idx[1:]] - cum[idx[:-1]]) / h["count"]
                ax.stairs(share, edges, fill=True, alpha=0.25, color=color)
                ax.stairs(share, edges, color=color, linewidth=1.6,
                          label=f"{which} (n={h['count']:,}, mean {h['mean']:.2f})")
        if threshold is not None and lo_hi is not None:
            ax.axvline(threshold, color=INK, linestyle="--", linewidth=1.2)
            ax.axvspan(lo_hi[0], threshold, color=BAD, alpha=0.06, linewidth=0)
            ymax = ax.get_ylim()[1]
            ax.text(threshold, ymax * 0.95, f"  threshold {threshold:g}\n  (left: removed)", va="top",
                    fontsize=8, color=INK)
        ax.set_title(f"{label}: web vs synthetic captions")
        ax.set_xlabel(label)
        ax.set_ylabel("share of texts")
        ax.legend(fontsize=8, loc="upper left")
        return _png(fig)


def length_histogram(web: dict[str, Any] | None, synthetic: dict[str, Any] | None) -> bytes:
    """Caption length in words, web vs synthetic, as share of captions (last bar: that many or more).

    Returns:
        PNG bytes.
    """
    with _figure(6.4, 2.9) as (fig, (ax,)):
        series = [(n, c, s) for n, c, s in (("web", WEB, web), ("synthetic", SYNTHETIC, synthetic)) if s and s["count"]]
        hi = 1
        for _, _, s in series:
            nz = np.flatnonzero(s["length_counts"])
            hi = max(hi, int(nz[-1]) + 1 if nz.size else 1)
        x = np.arange(hi)
        w = 0.8 / max(1, len(series))
        for i, (name, color, s) in enumerate(series):
            share = np.asarray(s["length_counts"][:hi], float) / s["count"]
            ax.bar(x + (i - (len(series) - 1) / 2) * w, share, width=w, color=color, alpha=0.85,
                   label=f"{name} (mean {s['mean_words']:.1f} words)")
        ax.set_title("Caption length")
        ax.set_xlabel("words")
        ax.set_ylabel("share of captions")
        ax.legend(fontsize=8)
        ax.grid(axis="x", visible=False)
        return _png(fig)


def _mark_thresholds(ax: Any, labels: dict[str, Any]) -> None:
    """Vertical lines at the current and the suggested thresholds (legend entries included)."""
    sug = labels["suggested"]
    marks = [(labels["threshold"], INK, "--", f"current {labels['threshold']:.3g}")]
    if sug.get("best_f1"):
        marks.append((sug["best_f1"]["threshold"], OK, "-", f"best F1 {sug['best_f1']['threshold']:.3g}"))
    if sug.get("clean_keep"):
        marks.append((sug["clean_keep"]["threshold"], SYNTHETIC, ":",
                      f"keeps {sug['min_clean_keep']:.0%} clean {sug['clean_keep']['threshold']:.3g}"))
    for x, color, style, label in marks:
        ax.axvline(x, color=color, linestyle=style, linewidth=1.3, label=label)


def labels_pr(labels: dict[str, Any]) -> bytes:
    """Filter vs labels: precision / recall / F1 of removing noisy captions and the clean keep rate
    vs threshold (left), recall per noise type vs threshold (right); the current threshold and both
    suggested ones are marked.

    Args:
        labels: the report's ``labels`` (:func:`capfilt.report.labels.label_report`); ``curve`` values
            may be None where undefined (nothing removed).

    Returns:
        PNG bytes.
    """
    curve = labels["curve"]
    x = np.asarray(curve["thresholds"], float)
    f = lambda v: np.asarray([np.nan if a is None else a for a in v], float)  # noqa: E731
    xlabel = f"web caption {labels['scorer'].upper()} threshold (below: removed)"
    with _figure(10.4, 3.4, ncols=2) as (fig, (ax, ax2)):
        for key, color, label in (("precision", WEB, "precision"), ("recall", BAD, "recall"), ("f1", INK, "F1"),
                                  ("clean_keep_rate", OK, "clean kept")):
            ax.plot(x, f(curve[key]), color=color, linewidth=1.6, label=label,
                    linestyle=":" if key == "clean_keep_rate" else "-")
        _mark_thresholds(ax, labels)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("Removing noisy web captions")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("rate")
        ax.legend(fontsize=7.5, loc="lower left", ncol=2)
        import matplotlib

        cmap = matplotlib.colormaps["tab10"]
        for i, (name, rec) in enumerate(curve["recall_by_label"].items()):
            ax2.plot(x, f(rec), color=cmap(i % 10), linewidth=1.5, label=name)
        ax2.axvline(labels["threshold"], color=INK, linestyle="--", linewidth=1.2)
        ax2.set_ylim(-0.02, 1.02)
        ax2.set_title("Share removed, per noise type")
        ax2.set_xlabel(xlabel)
        ax2.set_ylabel("recall")
        if curve["recall_by_label"]:
            ax2.legend(fontsize=7.5, loc="upper left")
        return _png(fig)


def render_plots(data: dict[str, Any]) -> dict[str, bytes]:
    """All figures the report data supports, by id (``status``, ``sizes``, ``score_<scorer>``, ``lengths``,
    ``labels_pr``).

    Sections whose data is absent (no score columns, no captions, no size columns) get no figure;
    the HTML says why instead.
    """
    jobs: list[tuple[str, Callable[[], bytes]]] = []
    ov = data["overview"]
    if ov["status_counts"]:
        jobs.append(("status", lambda: status_bars(ov["status_counts"])))
    sizes = data["download"]["sizes"]
    if any(s["count"] for s in sizes.values()):
        jobs.append(("sizes", lambda: size_histograms(sizes)))
    filt = data.get("filter")
    if filt:
        for scorer, sc in filt["scores"].items():
            if any(sc[w]["count"] for w in sc):
                jobs.append((f"score_{scorer}",
                             lambda scorer=scorer, sc=sc: score_histogram(scorer, sc, filt["thresholds"].get(scorer))))
    caps = data.get("captions")
    if caps and any(caps[w] and caps[w]["count"] for w in ("web", "synthetic")):
        jobs.append(("lengths", lambda: length_histogram(caps["web"], caps["synthetic"])))
    labels = data.get("labels")
    if labels and labels["scored"]:
        jobs.append(("labels_pr", lambda: labels_pr(labels)))
    return {name: fn() for name, fn in jobs}
