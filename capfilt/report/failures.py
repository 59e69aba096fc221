"""The report's "Failures by class" section: failed rows counted by cause and by domain, with examples.

:class:`FailureStats` is fed each record batch of pass 1 (:class:`capfilt.report.stats.Scan`) and
gives the JSON section; :func:`section_html` renders it (counts by class, top failing domains, and
a table of example rows per class with URL and message, and the stored image where a row has one).
A row's class is its ``error_class`` column, or for outputs written before that column existed
:func:`capfilt.io.failures.classify` of its status and message. Memory: one counter entry per
distinct (failing domain, class) pair, plus :data:`EXAMPLES_PER_CLASS` rows per class.
"""

from __future__ import annotations

import html
from collections import Counter
from typing import Any

import pyarrow as pa

from capfilt.io.failures import CLASSES, TRANSIENT_CLASSES, classes_of, domain_of

#: Example rows kept per class (the first ones read), and domains listed.
EXAMPLES_PER_CLASS = 4
TOP_DOMAINS = 10


class FailureStats:
    """Counts of failed rows by class and by domain, and the first example rows of each class."""

    def __init__(self) -> None:
        self.classes: Counter[str] = Counter()
        self.pairs: Counter[tuple[str, str]] = Counter()  # (domain, class) -> rows
        self.examples: dict[str, list[dict[str, Any]]] = {}

    def add(self, rb: pa.RecordBatch | pa.Table, shard: int, offset: int) -> None:
        """Fold one batch of a shard in (``offset``: the batch's first row within the shard).

        Reads ``status``, ``error_message``, ``error_class``, ``url``, ``key`` and ``width`` when present.
        """
        names = rb.schema.names
        if "status" not in names:
            return
        classes = classes_of(rb)
        failed = [i for i, c in enumerate(classes) if c is not None]
        if not failed:
            return
        col = lambda name: rb.column(name).to_pylist() if name in names else [None] * rb.num_rows  # noqa: E731
        urls, keys, status, msg, width = col("url"), col("key"), col("status"), col("error_message"), col("width")
        for i in failed:
            c = classes[i]
            self.classes[c] += 1
            self.pairs[(domain_of(urls[i]), c)] += 1
            ex = self.examples.setdefault(c, [])
            if len(ex) < EXAMPLES_PER_CLASS:
                ex.append({"key": keys[i], "url": urls[i], "status": status[i], "error_class": c,
                           "message": msg[i], "shard": shard, "row": offset + i, "has_image": width[i] is not None})

    def image_picks(self) -> list[tuple[int, int]]:
        """``(shard, row)`` of the example rows that have a stored image (read in the report's pass 2)."""
        return [(e["shard"], e["row"]) for ex in self.examples.values() for e in ex if e["has_image"]]

    def section(self, rows: int, retries: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The JSON section.

        Args:
            rows: rows read.
            retries: the run record's ``retries`` (``--retry-failed`` passes, :func:`capfilt.retry.retry_entry`).

        Returns:
            ``failed`` (rows with a class), ``transient`` (of them, rows in a transient class),
            ``by_class`` (``[{class, count, share (of failed rows), transient, meaning}]``, most
            first), ``distinct_failing_domains``, ``top_domains`` (``[{domain, count, classes:
            {class: rows}}]``, the :data:`TOP_DOMAINS` with most failed rows) and ``examples``
            (``{class: [{key, url, status, error_class, message, shard, row, has_image}]}``), and
            ``retries`` (the run record's, echoed: rows retried, ``before`` by class, ``after`` by outcome).
        """
        failed = sum(self.classes.values())
        by_domain: dict[str, Counter[str]] = {}
        for (d, c), n in self.pairs.items():
            by_domain.setdefault(d, Counter())[c] += n
        top = sorted(by_domain.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))[:TOP_DOMAINS]
        return {
            "rows": rows,
            "failed": failed,
            "transient": sum(n for c, n in self.classes.items() if c in TRANSIENT_CLASSES),
            "by_class": [{"class": c, "count": n, "share": n / failed, "transient": c in TRANSIENT_CLASSES,
                          "meaning": CLASSES.get(c, "")}
                         for c, n in sorted(self.classes.items(), key=lambda kv: (-kv[1], kv[0]))],
            "distinct_failing_domains": len(by_domain),
            "top_domains": [{"domain": d, "count": sum(cs.values()), "classes": dict(sorted(cs.items()))}
                            for d, cs in top],
            "examples": {c: self.examples[c] for c, _ in sorted(self.classes.items(), key=lambda kv: (-kv[1], kv[0]))},
            "retries": list(retries or []),
        }


def shown(f: dict[str, Any] | None) -> bool:
    """Whether the report has a failures section: rows failed, or a retry ran."""
    return bool(f and (f.get("failed") or f.get("retries")))


def retry_lines(retries: list[dict[str, Any]]) -> list[str]:
    """One line per ``--retry-failed`` pass: rows retried with their classes before, and the outcome after."""
    fmt = lambda d: ", ".join(f"{k} {v:,}" for k, v in d.items()) or "none"  # noqa: E731
    return [f"retry {i}: {r.get('rows', 0):,} rows ({fmt(r.get('before') or {})}) -> {fmt(r.get('after') or {})}; "
            f"{r.get('parts_rewritten', 0):,} parts rewritten" for i, r in enumerate(retries, 1)]


def section_html(f: dict[str, Any], thumbs: dict[str, str | None]) -> str:
    """The HTML body of the "Failures by class" section.

    Args:
        f: the report's ``failures`` section (:meth:`FailureStats.section`).
        thumbs: ``data:`` URIs of stored images by row key (rows without one show none).
    """
    e = lambda x: html.escape("" if x is None else str(x))  # noqa: E731
    retried = ("<h3>Retries (--retry-failed)</h3><ul>" + "".join(f"<li>{e(x)}</li>" for x in retry_lines(f["retries"]))
               + "</ul>") if f.get("retries") else ""
    if not f["failed"]:
        return '<p class="unavailable">No failed rows.</p>' + retried
    parts = [f'<p class="note">{f["failed"]:,} of {f["rows"]:,} rows failed, in {len(f["by_class"])} class(es); '
             f'{f["transient"]:,} are transient (worth <code>capfilt run ... --retry-failed</code>).</p>', retried]
    rows = "".join(f'<tr><td><a href="#failures-{e(c["class"])}">{e(c["class"])}</a></td>'
                   f'<td class="n" data-v="{c["count"]}">{c["count"]:,}</td><td class="n">{c["share"]:.1%}</td>'
                   f'<td>{"yes" if c["transient"] else "no"}</td><td>{e(c["meaning"])}</td></tr>'
                   for c in f["by_class"])
    parts.append('<div class="row"><div><h3>By class</h3><table id="failures-by-class"><thead><tr><th>class</th>'
                 '<th class="n">rows</th><th class="n">share</th><th>transient</th><th>meaning</th></tr></thead>'
                 f"<tbody>{rows}</tbody></table></div>")
    drows = "".join(f'<tr><td>{e(d["domain"])}</td><td class="n">{d["count"]:,}</td>'
                    f'<td>{e(", ".join(f"{c} {n:,}" for c, n in d["classes"].items()))}</td></tr>'
                    for d in f["top_domains"])
    parts.append(f'<div><h3>Top failing domains (of {f["distinct_failing_domains"]:,})</h3>'
                 '<table id="failures-by-domain"><thead><tr><th>domain</th><th class="n">failed rows</th>'
                 f"<th>classes</th></tr></thead><tbody>{drows}</tbody></table></div></div>")
    parts.append("<h3>Examples of each class</h3>")
    for c, examples in f["examples"].items():
        items = []
        for x in examples:
            uri = thumbs.get(x["key"]) if x.get("has_image") else None
            img = f'<img class="thumb" alt="{e(x["key"])}" src="{uri}">' if uri else ""
            items.append(f'<tr><td>{img}{e(x["key"])}</td><td>{e(x["status"])}</td>'
                         f'<td class="url">{e(x["url"])}</td><td>{e(x["message"])}</td></tr>')
        parts.append(f'<h4 id="failures-{e(c)}">{e(c)}</h4><div class="scroll"><table class="failure-examples" '
                     f'data-class="{e(c)}"><thead><tr><th>key</th><th>status</th><th>URL</th><th>message</th></tr>'
                     f'</thead><tbody>{"".join(items)}</tbody></table></div>')
    return "".join(parts)
