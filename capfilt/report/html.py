"""The self-contained HTML report: inline CSS, figures and thumbnails as ``data:`` URIs, no script.

A Content-Security-Policy meta tag (``default-src 'none'``) makes the browser refuse any network
request, so the file can be mailed around and opened offline. Every text from the data (captions,
URLs, error messages) is HTML-escaped: web captions are untrusted input.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from capfilt.report.keys import human_label, human_value
from capfilt.report.failures import section_html
from capfilt.report.failures import shown as shown_failures
from capfilt.report.layout import wall_seconds
from capfilt.report.stats import truncation_line

#: ``(id, heading)`` of the report's sections, in order (the browser test checks each).
SECTIONS: list[tuple[str, str]] = [
    ("overview", "Overview"),
    ("download", "Download health"),
    ("filter", "Filter"),
    ("captions", "Captions"),
    ("samples", "Samples"),
]
#: The section added after "Download health" when a curation filter ran (``data["filters"]``).
FILTERS_SECTION: tuple[str, str] = ("filters", "Curation filters")
#: The section added after "Download health" when rows failed or a retry ran (``data["failures"]``).
FAILURES_SECTION: tuple[str, str] = ("failures", "Failures by class")
#: The section added after "Filter" when the report evaluates the filter against labels (``--label-col``).
LABELS_SECTION: tuple[str, str] = ("labels", "Filter vs labels")
THUMB_PX = 240


def sections(data: dict[str, Any]) -> list[tuple[str, str]]:
    """``(id, heading)`` of this report's sections: :data:`SECTIONS`, plus :data:`FAILURES_SECTION` after
    "Download health" when rows failed, :data:`FILTERS_SECTION` after "Download health" when ``data["filters"]`` is set and :data:`LABELS_SECTION` after
    "Filter" when ``data["labels"]`` is set."""
    out = list(SECTIONS)
    if shown_failures(data.get("failures")):
        out.insert([sid for sid, _ in out].index("download") + 1, FAILURES_SECTION)
    if data.get("filters"):
        out.insert([sid for sid, _ in out].index("download") + 1, FILTERS_SECTION)
    if data.get("labels"):
        out.insert([sid for sid, _ in out].index("filter") + 1, LABELS_SECTION)
    return out

_CSS = """
:root{--ink:#1e293b;--muted:#64748b;--line:#e2e8f0;--bg:#f8fafc;--card:#fff;--web:#2563eb;--syn:#ea580c;
--ok:#15803d;--okbg:#dcfce7;--bad:#b91c1c;--badbg:#fee2e2;--warn:#92400e;--warnbg:#fef3c7}
*{box-sizing:border-box}
body{margin:0;font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--ink);background:var(--bg)}
header{background:#0f172a;color:#e2e8f0;padding:18px 32px 0}
header h1{margin:0;font-size:22px;font-weight:650;color:#fff}
header .sub{color:#94a3b8;font-size:13px;margin:2px 0 12px;word-break:break-all}
nav{display:flex;gap:4px;flex-wrap:wrap}
nav a{color:#cbd5e1;text-decoration:none;padding:8px 12px;border-radius:6px 6px 0 0;font-size:13px}
nav a:hover{background:#1e293b;color:#fff}
main{max-width:1200px;margin:0 auto;padding:8px 32px 48px}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:18px 22px;margin:20px 0}
h2{margin:0 0 12px;font-size:19px}
h3{margin:18px 0 8px;font-size:15px}
p.note{color:var(--muted);margin:6px 0 10px;max-width:80ch}
.banner{border-radius:8px;padding:12px 16px;margin:16px 0 0;border:1px solid}
.banner.tiny{background:var(--warnbg);border-color:#f59e0b;color:var(--warn)}
.banner.info{background:#eff6ff;border-color:#93c5fd;color:#1e3a8a}
.banner ul{margin:4px 0 0;padding-left:20px}
.kpis{display:grid;grid-template-columns:repeat(auto-fill,minmax(160px,1fr));gap:10px;margin:4px 0 14px}
.kpi{border:1px solid var(--line);border-radius:8px;padding:10px 12px;background:#fcfdff}
.kpi .v{font-size:22px;font-weight:650;line-height:1.2}
.kpi .l{color:var(--muted);font-size:12px}
.kpi .s{color:var(--muted);font-size:12px}
.row{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:18px;align-items:start}
.row>*{min-width:0}
img.plot{max-width:100%;height:auto;display:block;border:1px solid var(--line);border-radius:6px}
table{border-collapse:collapse;width:100%;font-size:13px;margin:4px 0 8px}
table.kv td:first-child{width:38%;color:var(--muted)}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{color:var(--muted);font-weight:600;background:#f8fafc}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.scroll{max-height:360px;overflow:auto;border:1px solid var(--line);border-radius:6px}
.scroll table{margin:0}
details summary{cursor:pointer;color:var(--muted);margin:6px 0}
pre{background:#f1f5f9;border-radius:6px;padding:10px;overflow:auto;font-size:12px;max-height:420px}
.web{color:var(--web)}.syn{color:var(--syn)}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:14px}
.card{border:1px solid var(--line);border-radius:8px;overflow:hidden;background:#fff;display:flex;flex-direction:column}
.card .img{background:#0f172a;display:flex;align-items:center;justify-content:center;height:190px}
.card .img img{width:100%;height:190px;object-fit:contain;display:block}
.card .img .noimg{color:#94a3b8;font-size:12px}
.card .body{padding:8px 10px 10px;font-size:12.5px}
.card .meta{color:var(--muted);font-size:11.5px;margin-bottom:4px;display:flex;flex-wrap:wrap;gap:4px 8px;align-items:center}
.t{margin:7px 0;padding-left:8px;border-left:3px solid #cbd5e1}
.t.kept{border-left-color:#22c55e}.t.dropped{border-left-color:#f87171}
.t .h{display:flex;justify-content:space-between;align-items:center;gap:6px}
.t .src{font-size:10.5px;font-weight:700;text-transform:uppercase;letter-spacing:.03em}
.t .txt{display:block;margin-top:1px}
.t.dropped .txt{color:#64748b}
.pill{display:inline-block;border-radius:999px;padding:0 7px;font-size:11px;font-weight:600;white-space:nowrap;font-variant-numeric:tabular-nums}
.pill.kept{background:var(--okbg);color:var(--ok)}
.pill.dropped{background:var(--badbg);color:var(--bad)}
.pill.na{background:#f1f5f9;color:var(--muted)}
.badge{display:inline-block;border-radius:4px;padding:0 6px;font-size:11px;font-weight:600}
.badge.keep{background:var(--okbg);color:var(--ok)}.badge.drop{background:var(--badbg);color:var(--bad)}
.unavailable{color:var(--muted);font-style:italic}
p.suggest{background:var(--okbg);border:1px solid #86efac;border-radius:8px;padding:10px 14px;margin:8px 0 12px;max-width:110ch}
footer{color:var(--muted);font-size:12px;text-align:center;padding:0 0 32px}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th[data-dir=asc]::after{content:" ▲"}table.sortable th[data-dir=desc]::after{content:" ▼"}
input.filter{margin:4px 0 8px;padding:5px 8px;border:1px solid var(--line);border-radius:6px;width:280px}
"""


# --------------------------------------------------------------------------------------------
# formatting helpers
# --------------------------------------------------------------------------------------------
def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _int(x: Any) -> str:
    return "–" if x is None else f"{int(x):,}"


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x * 100:.{digits}f} %"


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:,.{digits}f}".rstrip("0").rstrip(".") if abs(x) >= 1 else f"{x:.{digits}g}"
    return _e(x)


def _share(part: int | None, whole: int | None) -> float | None:
    return part / whole if part is not None and whole else None


def _kpi(value: str, label: str, sub: str = "") -> str:
    return (f'<div class="kpi"><div class="v">{value}</div><div class="l">{_e(label)}</div>'
            + (f'<div class="s">{sub}</div>' if sub else "") + "</div>")


def _table(headers: list[str], rows: Iterable[list[Any]], numeric: Iterable[int] = (), scroll: bool = False,
           cls: str = "") -> str:
    """An HTML table; every cell is escaped (numbers formatted); columns in ``numeric`` right-aligned."""
    num = set(numeric)
    head = "".join(f'<th class="n">{_e(h)}</th>' if i in num else f"<th>{_e(h)}</th>" for i, h in enumerate(headers))
    body = []
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            text = _num(c) if i in num else _e(c)
            cells.append(f'<td class="n">{text}</td>' if i in num else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    attr = f' class="{cls}"' if cls else ""
    t = f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="scroll">{t}</div>' if scroll else t


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, dict):
        out: list[tuple[str, Any]] = []
        for k, v in d.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(d, list) and any(isinstance(x, (dict, list)) for x in d):
        return [(prefix, json.dumps(d))]
    return [(prefix, d)]


def _img(png: bytes, alt: str, cls: str, name: str = "") -> str:
    b64 = base64.b64encode(png).decode("ascii")
    data = f' data-plot="{_e(name)}"' if name else ""
    return f'<img class="{cls}"{data} alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def thumbnail(image: bytes, px: int = THUMB_PX) -> str | None:
    """A JPEG ``data:`` URI of ``image`` (any Pillow format) fitted into ``px`` x ``px``, or None
    when Pillow cannot decode it."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(image)) as im:
            im = ImageOps.exif_transpose(im)
            im = im.convert("RGB")
            im.thumbnail((px, px))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=82)
    except Exception:  # noqa: BLE001 - any undecodable image is shown as a placeholder
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------
def _banners(data: dict[str, Any]) -> str:
    out = []
    run = data["run"]
    if run.get("tiny_models"):
        out.append('<div class="banner tiny"><strong>Untrained models.</strong> This run used the '
                   '<code>tiny</code> model preset: tiny BLIP/CLIP models with <em>random weights</em>, built '
                   'for tests and the offline demo. Its synthetic captions and all scores are noise; do not '
                   'judge the data, the filter or the thresholds from them. Run with a real preset '
                   '(<code>--models blip-large</code>) for meaningful numbers.</div>')
    sh = data["shards"]
    notes = list(data["warnings"])
    if sh["incomplete"] or not run.get("present") or run.get("missing_keys"):
        skipped = f", {sh['incomplete']} incomplete shard(s) skipped" if sh["incomplete"] else ""
        head = f"Partial output: {sh['read']} of {sh['found']} shard(s) read{skipped}."
    elif notes:
        head = "Notes"
    else:
        head = ""
    if head:
        items = "".join(f"<li>{_e(n)}</li>" for n in notes)
        out.append(f'<div class="banner info"><strong>{_e(head)}</strong><ul>{items}</ul></div>')
    return "".join(out)


def _section_overview(data: dict[str, Any], plots: dict[str, bytes]) -> str:
    ov, run, sh = data["overview"], data["run"], data["shards"]
    rows = ov["rows"]
    kpis = [
        _kpi(_int(rows), "rows read", f"from {sh['read']} of {sh['found']} shard(s)"),
        _kpi(_int(ov["downloaded"]), "downloaded", _pct(_share(ov["downloaded"], rows))),
        _kpi(_int(ov["failed"]), "not successful", _pct(_share(ov["failed"], rows))),
    ]
    if ov["rows_kept"] is not None:
        kpis.append(_kpi(_int(ov["rows_kept"]), "rows kept", f"{_pct(_share(ov['rows_kept'], rows))} keep ≥ 1 text"))
        src = ov["texts_kept_by_source"] or {}
        kpis.append(_kpi(_int(ov["texts_kept"]), "texts kept",
                         f'<span class="web">{_int(src.get("web", 0))} web</span> · '
                         f'<span class="syn">{_int(src.get("synthetic", 0))} synthetic</span>'))
    wall = wall_seconds(run)
    if wall is not None:
        kpis.append(_kpi(f"{wall:,.1f} s", "wall time", f"{rows / wall:,.1f} rows/s" if wall else ""))
    parts = [f'<div class="kpis">{"".join(kpis)}</div>']

    from capfilt.schema import STATUSES

    status_rows = [[s, c, _pct(_share(c, rows)), STATUSES.get(s, "")] for s, c in ov["status_counts"].items()]
    left = _img(plots["status"], "rows by status", "plot", "status") if "status" in plots else \
        '<p class="unavailable">No rows read yet.</p>'
    right = _table(["status", "rows", "share", "meaning"], status_rows, numeric=[1, 2])
    if ov.get("drop_reasons"):
        right += "<h3>Dropped rows by reason</h3>" + _table(
            ["drop reason", "rows"], [[k, v] for k, v in ov["drop_reasons"].items()], numeric=[1])
    parts.append(f'<div class="row"><div>{left}</div><div>{right}</div></div>')
    parts.append("<h3>Run</h3>" + _run_block(run))
    return "".join(parts)


def _run_block(run: dict[str, Any]) -> str:
    """Recipe, models, versions, timings, totals and per-stage throughput from run.json."""
    parts = []
    if not run.get("present"):
        parts.append('<p class="unavailable">No run record (<code>_capfilt/run.json</code>): config, models, '
                     "timings and throughput are unknown.</p>")
    else:
        info, timing = [], []
        cfg = run.get("config") or {}
        if cfg:
            info.append(["recipe", cfg.get("name", "?")])
        if run.get("preset"):
            info.append(["model preset", run["preset"]])
        for role, mid in (run.get("model_ids") or {}).items():
            info.append([f"{role} model", mid])
        for label, k in (("run id", "run_id"), ("run status", "status"), ("input rows", "input_rows"),
                         ("attempts", "attempts"), ("command", "command")):
            if run.get(k) is not None:
                info.append([label, _num(run[k]) if isinstance(run[k], int) else run[k]])
        if run.get("missing_keys"):
            info.append(["missing from run.json", ", ".join(run["missing_keys"])])
        for k, v in _flatten(run.get("versions") or {}):
            info.append([human_label(f"versions.{k}"), v])
        stages = run.get("stages")
        for section in ("timings", "totals"):
            for k, v in _flatten(run.get(section) or {}):
                if stages and k.startswith(("throughput.", "stage_seconds.")):
                    continue  # shown in the throughput table below
                key = f"{section}.{k}"
                shown = human_value(key, v)
                timing.append([human_label(key), _num(shown) if isinstance(shown, (int, float)) else shown, key])
        left = _table(["recipe, models, versions", ""], info, cls="kv")
        right = _table(["timings and totals", "", "run.json key"], timing, cls="kv") if timing else \
            '<p class="unavailable">No timings or totals in run.json (interrupted run?).</p>'
        parts.append(f'<div class="row"><div>{left}</div><div>{right}</div></div>')
        if isinstance(stages, dict) and stages:
            parts.append("<h3>Throughput per stage</h3>")
            if all(isinstance(v, dict) for v in stages.values()):
                cols: list[str] = []
                for v in stages.values():
                    cols += [k for k, _ in _flatten(v) if k not in cols]
                srows = [[name] + [dict(_flatten(v)).get(c) for c in cols] for name, v in stages.items()]
                parts.append(_table(["stage"] + [human_label(c) + (" (s)" if c == "seconds" else "") for c in cols],
                                    srows, numeric=range(1, len(cols) + 1)))
            else:
                parts.append(_table(["stage", "value"], [[k, v] for k, v in _flatten(stages)], numeric=[1]))
        if cfg:
            parts.append("<details><summary>Full resolved config</summary><pre>"
                         + _e(json.dumps(cfg, indent=2)) + "</pre></details>")
    return "".join(parts)


def _section_download(data: dict[str, Any], plots: dict[str, bytes]) -> str:
    dl, ov = data["download"], data["overview"]
    rate = _kpi(_pct(dl["success_rate"]), "download success rate", f"{_int(ov['downloaded'])} of {_int(ov['rows'])} rows")
    n_err = _kpi(_int(dl["distinct_error_messages"]), "distinct error messages")
    parts = [f'<div class="kpis">{rate}{n_err}</div>']
    errs = dl["top_errors"]
    left = ("<h3>Top error messages</h3>" + _table(["status", "message", "rows"], [[e["status"], e["message"], e["count"]] for e in errs], numeric=[2])
            if errs else '<h3>Top error messages</h3><p class="unavailable">No errors.</p>')
    if "sizes" in plots:
        size_rows = [[c, s["count"], s["min"], s["mean"], s["max"]] for c, s in dl["sizes"].items()]
        right = (_img(plots["sizes"], "image sizes before and after resize", "plot", "sizes")
                 + _table(["column", "images", "min px", "mean px", "max px"], size_rows, numeric=[1, 2, 3, 4]))
    else:
        right = '<p class="unavailable">No image sizes recorded (no image was downloaded).</p>'
    parts.append(f'<div class="row"><div>{right}</div><div>{left}</div></div>')
    shard_rows = []
    for s in dl["per_shard"]:
        r = s.get("rows")
        shard_rows.append([s["file"], r, s.get("downloaded"), _pct(_share(s.get("downloaded"), r)), s.get("kept"),
                           s.get("texts_kept"), f"{s['bytes'] / 1e6:,.1f}", s.get("error", "")])
    parts.append(f"<h3>Shards read ({len(dl['per_shard'])})</h3>")
    parts.append(_table(["shard", "rows", "downloaded", "success", "rows kept", "texts kept", "MB", "problem"],
                        shard_rows, numeric=[1, 2, 3, 4, 5, 6], scroll=len(shard_rows) > 12))
    inc = data["shards"]["incomplete_files"]
    if inc:
        parts.append(f'<p class="note">Skipped {len(inc)} incomplete shard(s) (no <code>.stats.json</code>): '
                     + _e(", ".join(inc[:20])) + (" …" if len(inc) > 20 else "") + "</p>")
    return "".join(parts)


def _section_filters(data: dict[str, Any], images: dict[str, str | None] | None = None) -> str:
    f = data["filters"]
    rows = f["rows"]
    kpis = "".join(_kpi(_int(r["rows"]), f"{r['filter']}: {r['status']}", _pct(_share(r["rows"], rows)))
                   for r in f["removed"])
    parts = [f'<p class="note">Rows each curation filter removed (of {_int(rows)} rows read). Filters run in '
             f'pipeline order: blocklist, langid, decontam, safety, dedup before the models; semdedup after the '
             f'run, on the kept rows.</p>',
             f'<div class="kpis">{kpis}</div>']
    cols = []
    if f.get("web_langs") is not None:
        unusable = f.get("web_captions_unusable")
        cols.append("<h3>Web-caption languages</h3>"
                    + _table(["language", "rows"], [[k, v] for k, v in f["web_langs"].items()], numeric=[1])
                    + (f'<p class="note">{_int(unusable)} web captions were in a language the filter does not read '
                       f'and were neither scored nor selected (langid.other).</p>' if unusable else ""))
    if f.get("nsfw_score_hist") is not None:
        h = f["nsfw_score_hist"]
        b = h["bins"]
        cols.append("<h3>NSFW detector scores</h3>"
                    + _table(["score", "images"], [[f"{i / b:.1f}-{(i + 1) / b:.1f}", c] for i, c in enumerate(h["counts"])],
                             numeric=[1]))
    if cols:
        parts.append('<div class="row">' + "".join(f"<div>{c}</div>" for c in cols) + "</div>")
    removed = f.get("removed_samples") or {}
    if removed:
        parts.append('<h3>Removed samples</h3><p class="note">Rows each filter removed, drawn at random (seeded). '
                     'Images the NSFW detector flagged or scored high are shown blurred (blurred before they were '
                     'embedded); rows it removed have no stored image.</p>')
        for name, shown in removed.items():
            cards = []
            for r in shown:
                why = r.get("error_message") or (f"repeats {r['semantic_duplicate_of']}"
                                                 if r.get("semantic_duplicate_of") else r.get("drop_reason") or "")
                card = _card(r, images or {})
                note = ('<div class="note">' + ("blurred · " if r.get("blurred") else "") + _e(why) + "</div>")
                cards.append(card.replace('<div class="body">', '<div class="body">' + note, 1))
            parts.append(f"<h3>{_e(name)}</h3>" + '<div class="grid">' + "".join(cards) + "</div>")
    return "".join(parts)


def _section_filter(data: dict[str, Any], plots: dict[str, bytes]) -> str:
    filt = data.get("filter")
    if not filt:
        return ('<p class="unavailable">This output has no score columns (for example the <code>download</code> '
                "recipe): nothing was filtered.</p>")
    rm = filt["removed"]
    kpis = [
        _kpi(_pct(rm["web"]["removed_share"]), "web texts removed",
             f"{_int(rm['web']['removed'])} of {_int(rm['web']['scored'])} scored"),
        _kpi(_pct(rm["synthetic"]["removed_share"]), "synthetic texts removed (noise ratio)",
             f"{_int(rm['synthetic']['removed'])} of {_int(rm['synthetic']['scored'])} scored"),
    ]
    if filt.get("top_k") is not None:
        kpis.append(_kpi(_pct(filt.get("web_in_top_k_share")), f"web caption in top-{filt['top_k']}",
                         f"ranked by {_e(filt['primary_scorer'])}"))
    thr = {k: v for k, v in filt["thresholds"].items() if v is not None}
    parts = [f'<div class="kpis">{"".join(kpis)}</div>',
             '<p class="note">A text is removed when the filter does not keep it (below the threshold, or outside the '
             f"top-k). Decisions use <strong>{_e(filt['primary_scorer'])}</strong>"
             + (f"; thresholds: {_e(', '.join(f'{k} ≥ {v:g}' for k, v in thr.items()))}" if thr else "; no threshold set")
             + ". For reference, BLIP (Li et al. 2022, §4.3, Table 3) reports a noise ratio of 25 % for synthetic "
             "captions from nucleus sampling (19 % with beam search), on web images with a finetuned filter."
             + (f" With top-{filt['top_k']} ranking (BLIP-2 §3.4) at most {filt['top_k']} texts per image survive, so "
                "most candidates are removed by design; the share of web captions in the top-k is the telling number."
                if filt.get("top_k") is not None else "") + "</p>"]
    trunc = truncation_line(filt)
    if trunc:
        parts.append(f'<p class="note" id="web-text-truncated">{_e(trunc)}</p>')
    figs = [(s, plots[f"score_{s}"]) for s in filt["scores"] if f"score_{s}" in plots]
    cells = [f"<div>{_img(png, f'{s} score histogram', 'plot', f'score_{s}')}</div>" for s, png in figs]
    parts.append(f'<div class="row">{"".join(cells)}</div>')
    srows = []
    for s, sc in filt["scores"].items():
        for w in ("web", "synthetic"):
            h = sc[w]
            srows.append([s, w, h["count"], h["mean"], h["min"], h["max"],
                          _pct(h.get("below_threshold_share")) if "below_threshold" in h else "–"])
    parts.append(_table(["scorer", "texts", "scored", "mean", "min", "max", "below threshold"], srows, numeric=[2, 3, 4, 5, 6]))
    return "".join(parts)


def _threshold_text(t: dict[str, Any], positive: str) -> str:
    """What a threshold does to the labelled, scored rows: noisy removed, clean kept, F1."""
    return (f"removes {_pct(t['recall'])} of noisy web captions ({_int(t['tp'])} of {_int(t['tp'] + t['fn'])}), "
            f"keeps {_pct(t['clean_keep_rate'])} of {_e(positive)} ones ({_int(t['tn'])} of {_int(t['tn'] + t['fp'])}), "
            f"precision of removal {_pct(t['precision'])}, F1 {_num(t['f1'], 3)}")


def _section_labels(data: dict[str, Any], plots: dict[str, bytes]) -> str:
    """Filter vs labels: KPIs, the suggested thresholds, the confusion matrix and the PR figure."""
    lab = data["labels"]
    m, sug, scorer = lab["metrics"], lab["suggested"], lab["scorer"]
    positive = " / ".join(lab["positive_values"])
    src = "the recipe's" if lab["threshold_source"] == "recipe" else "default (no threshold in run.json):"
    kpis = [
        _kpi(_pct(m["precision"]), "precision of removal", f"{_int(m['tp'])} of {_int(m['tp'] + m['fp'])} removed are noisy"),
        _kpi(_pct(m["recall"]), "recall of removal", f"{_int(m['tp'])} of {_int(m['tp'] + m['fn'])} noisy removed"),
        _kpi(_pct(m["clean_keep_rate"]), f"{positive} kept", f"{_int(m['tn'])} of {_int(m['tn'] + m['fp'])}"),
        _kpi(_pct(m["accuracy"]), "accuracy", f"F1 of removal {_num(m['f1'], 3)}"),
        _kpi(_int(lab["scored"]), "labelled rows scored",
             f"{_int(lab['unscored'])} labelled not scored · {_int(lab['unlabelled'])} unlabelled"),
    ]
    parts = [f'<div class="kpis">{"".join(kpis)}</div>',
             f'<p class="note">Ground truth: column <code>{_e(lab["column"])}</code>; <strong>{_e(positive)}</strong> '
             f"means the web caption matches its image ({'given with --label-positive' if lab['positive_source'] == 'option' else 'default'}), "
             "every other value is a kind of noise. Positive class: <em>noisy</em>; prediction: the web caption is "
             f"removed because its <strong>{_e(scorer)}</strong> score is below {src} threshold "
             f"<strong>{lab['threshold']:g}</strong>. Labelled rows whose web caption was not scored (download "
             "failed, no web caption, scoring failed) are counted apart, not in the rates.</p>"]
    say = []
    if sug.get("best_f1"):
        b = sug["best_f1"]
        say.append(f"<strong>Suggested threshold: {scorer} ≥ {b['threshold']:.3f}</strong> maximizes F1 of removing noisy "
                   f"captions: it {_threshold_text(b, positive)}.")
    if sug.get("clean_keep"):
        k = sug["clean_keep"]
        say.append(f"The highest threshold that still keeps ≥ {_pct(sug['min_clean_keep'], 0)} of {_e(positive)} captions "
                   f"is <strong>{k['threshold']:.3f}</strong>: it {_threshold_text(k, positive)}.")
    if say:
        parts.append(f'<p class="suggest">{" ".join(say)}</p>')
    rows = [[c["label"] + ("" if not c["positive"] else " (matches)"), c["rows"], c["scored"], c["kept"], _pct(c["kept_rate"]),
             c["removed"], _pct(c["removed_rate"]), c["unscored"]] for c in lab["classes"]]
    table = _table(["label", "rows", "scored", "web kept", "kept %", "web removed", "removed %", "not scored"],
                   rows, numeric=range(1, 8), cls="confusion")
    parts.append(f"<h3>Confusion matrix at {_e(scorer)} ≥ {lab['threshold']:g}</h3>{table}")
    if "labels_pr" in plots:
        parts.append(_img(plots["labels_pr"], "precision and recall of removal vs threshold", "plot", "labels_pr"))
    else:
        parts.append('<p class="unavailable">No labelled row was scored: no curve.</p>')
    cmp_rows = []
    for name, t in (("current", {**m, "threshold": lab["threshold"], "kept": m["tn"] + m["fn"], "removed": m["tp"] + m["fp"]}),
                    ("best F1", sug.get("best_f1")), (f"keeps ≥ {_pct(sug['min_clean_keep'], 0)} clean", sug.get("clean_keep"))):
        if t:
            cmp_rows.append([name, t["threshold"], t["kept"], t["removed"], _pct(t["precision"]), _pct(t["recall"]),
                             _num(t["f1"], 3), _pct(t["clean_keep_rate"]), _pct(t["accuracy"])])
    parts.append("<h3>Thresholds compared</h3>" + _table(
        ["threshold", scorer, "web kept", "web removed", "precision", "recall", "F1", "clean kept", "accuracy"],
        cmp_rows, numeric=range(1, 9)))
    return "".join(parts)


def _section_captions(data: dict[str, Any], plots: dict[str, bytes]) -> str:
    caps = data.get("captions")
    if not caps or not any(caps[w] and caps[w]["count"] for w in ("web", "synthetic")):
        return '<p class="unavailable">No captions in this output.</p>'
    web, syn = caps.get("web"), caps.get("synthetic")
    kpis = []
    if syn:
        kpis += [_kpi(_pct(syn["repetition_rate"]), "synthetic captions with a repeated n-gram",
                      f"{_int(syn['repetitive'])} of {_int(syn['count'])}"),
                 _kpi(_pct(syn["duplicate_share"]), "synthetic captions duplicated across images",
                      f"{_int(syn['distinct'])} distinct texts")]
    if web:
        kpis.append(_kpi(_pct(web["repetition_rate"]), "web captions with a repeated n-gram",
                         f"{_int(web['repetitive'])} of {_int(web['count'])}"))
    parts = [f'<div class="kpis">{"".join(kpis)}</div>']
    left = _img(plots["lengths"], "caption length histogram", "plot", "lengths") if "lengths" in plots else ""
    right = ('<p class="note">A caption counts as repetitive when a word n-gram repeats back to back '
             '("dai dai dai", "on a wave on a wave"), a known failure of BLIP\'s captioner.</p>')
    ex = (syn or {}).get("repetitive_examples") or []
    if ex:
        right += "<h3>Repetitive synthetic captions (examples)</h3><ul>" + "".join(f"<li>{_e(t)}</li>" for t in ex) + "</ul>"
    if not syn:
        right += '<p class="unavailable">No synthetic captions in this output (no captioner ran).</p>'
    parts.append(f'<div class="row"><div>{left}</div><div>{right}</div></div>')
    if syn:
        parts.append("<h3>Most frequent synthetic captions</h3>")
        repeated = [m for m in syn["most_frequent"] if m["count"] > 1]
        parts.append(_table(["caption", "times", "images"], [[m["text"], m["count"], m["images"]] for m in repeated],
                            numeric=[1, 2]) if repeated
                     else '<p class="unavailable">No synthetic caption occurs more than once.</p>')
    return "".join(parts)


def _text_line(source: str, t: dict[str, Any] | None, scorer: str | None) -> str:
    if t is None:
        return ""
    kept = t.get("kept")
    score = "" if t.get("score") is None else f"{scorer} {t['score']:.3f}"
    mark = "na" if kept is None else ("kept" if kept else "dropped")
    label = {"kept": "kept", "dropped": "dropped", "na": ""}[mark]
    text = " · ".join(x for x in (score, label) if x)
    pill = f'<span class="pill {mark}">{_e(text)}</span>' if text else ""
    src = '<span class="src web">web</span>' if source == "web" else '<span class="src syn">synthetic</span>'
    return (f'<div class="t {mark}"><div class="h">{src}{pill}</div>'
            f'<span class="txt">{_e(t["text"])}</span></div>')


def _card(row: dict[str, Any], images: dict[str, str | None]) -> str:
    uri = images.get(row["key"])
    img = f'<img class="thumb" alt="{_e(row["key"])}" src="{uri}">' if uri else '<span class="noimg">image not available</span>'
    keep = row.get("keep")
    badge = "" if keep is None else (
        '<span class="badge keep">kept</span>' if keep else f'<span class="badge drop">dropped: {_e(row.get("drop_reason") or "")}</span>')
    size = f'{row["width"]}×{row["height"]} px' if row.get("width") else ""
    meta = f'{badge} <span>key {_e(row["key"])}{" · " + _e(size) if size else ""}</span>'
    lines = _text_line("web", row.get("web"), row.get("scorer"))
    lines += "".join(_text_line("synthetic", s, row.get("scorer")) for s in row.get("synthetic") or [])
    if not lines:
        lines = '<div class="unavailable">no caption</div>'
    return (f'<div class="card"><div class="img">{img}</div><div class="body"><div class="meta">{meta}</div>'
            f'{lines}</div></div>')


#: The report's only script: click a header of a ``table.sortable`` to sort by it (again: reverse);
#: type in the ``input.filter`` before it to show only rows containing the text. Allowed by the
#: page's CSP through its SHA-256 (no other script can run).
_SORT_JS = """document.querySelectorAll('table.sortable').forEach(function(t){
var body=t.tBodies[0],f=document.getElementById(t.dataset.filter);
t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
var dir=th.dataset.dir==='asc'?'desc':'asc';t.querySelectorAll('th').forEach(function(h){delete h.dataset.dir;});
th.dataset.dir=dir;var rows=Array.prototype.slice.call(body.rows);
rows.sort(function(a,b){var x=a.cells[i].dataset.v,y=b.cells[i].dataset.v,c;
if(x!==undefined&&y!==undefined){c=parseFloat(x)-parseFloat(y);}else{c=a.cells[i].textContent.localeCompare(b.cells[i].textContent);}
return dir==='asc'?c:-c;});rows.forEach(function(r){body.appendChild(r);});});});
if(f){f.addEventListener('input',function(){var q=f.value.toLowerCase();
Array.prototype.forEach.call(body.rows,function(r){r.style.display=r.textContent.toLowerCase().indexOf(q)>=0?'':'none';});});}
});"""


def _sample_table(samples: list[dict[str, Any]]) -> str:
    """The sampled rows as a sortable, filterable table (no network; one inline script)."""
    def num(v: float | None) -> str:
        """A numeric cell: 3 decimals shown, the full value in ``data-v`` for sorting (empty for None)."""
        return '<td class="n"></td>' if v is None else f'<td class="n" data-v="{v:.6f}">{v:.3f}</td>'

    body = []
    for r in samples:
        web = r.get("web") or {}
        kept = [t for t in [web, *(r.get("synthetic") or [])] if t and t.get("kept")]
        best = max(kept, key=lambda t: t.get("score") if t.get("score") is not None else -1, default=None)
        keep = "" if r.get("keep") is None else ("kept" if r["keep"] else f"dropped: {r.get('drop_reason') or ''}")
        body.append(f"<tr><td>{_e(r['key'])}</td><td>{_e(r.get('status') or '')}</td><td>{_e(keep)}</td>"
                    f"{num(web.get('score'))}<td>{_e(web.get('text') or '')}</td>"
                    f"{num(best.get('score') if best else None)}<td>{_e(best['text'] if best else '')}</td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("key", "status", "selection", "web score", "web caption",
                                               "best kept score", "best kept caption"))
    return ('<h3>Sampled rows as a table</h3><p class="note">Click a column to sort (again to reverse); type to '
            'filter.</p><input class="filter" id="sample-filter" type="search" placeholder="filter rows…" '
            'aria-label="filter rows">'
            f'<div class="scroll"><table class="sortable" id="sample-table" data-filter="sample-filter">'
            f'<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


def _section_samples(data: dict[str, Any], images: dict[str, str | None]) -> str:
    samples = data["samples"]
    what = ("with the web caption and the synthetic captions, each with its score and whether the filter kept it"
            if data.get("filter") else "with the web caption (this output has no synthetic captions or scores)")
    parts = [f'<p class="note">{len(samples)} downloaded image(s) drawn at random (seeded) from the shards read, '
             f"{what}.</p>"]
    parts.append('<div class="grid">' + "".join(_card(r, images) for r in samples) + "</div>" if samples
                 else '<p class="unavailable">No downloaded images to show.</p>')
    if samples:
        parts.append(_sample_table(samples))
    bl = data.get("borderline") or {}
    if bl.get("lowest_kept_web") or bl.get("highest_dropped_web"):
        parts.append(f"<h3>Where the threshold bites</h3><p class=\"note\">Web captions ranked by "
                     f"<strong>{_e(bl.get('scorer'))}</strong>: the lowest-scoring ones the filter kept, and the "
                     "highest-scoring ones it dropped.</p>")
        for title, key in (("Lowest-scoring kept web captions", "lowest_kept_web"),
                           ("Highest-scoring dropped web captions", "highest_dropped_web")):
            rows = bl.get(key) or []
            parts.append(f"<h3>{title}</h3>")
            parts.append('<div class="grid">' + "".join(_card(r, images) for r in rows) + "</div>" if rows
                         else '<p class="unavailable">None.</p>')
    return "".join(parts)


def _script_hash() -> str:
    """The CSP source allowing exactly :data:`_SORT_JS` (``sha256-<base64>``)."""
    import base64
    import hashlib

    return "sha256-" + base64.b64encode(hashlib.sha256(_SORT_JS.encode()).digest()).decode()


def render_html(data: dict[str, Any], plots: dict[str, bytes], images: dict[str, bytes]) -> str:
    """The whole report as one HTML document.

    Args:
        data: :class:`capfilt.report.stats.ReportData` ``.data``.
        plots: PNG bytes by figure id (:func:`capfilt.report.plots.render_plots`).
        images: stored image bytes by row ``key`` (thumbnailed here to ``THUMB_PX``).

    Returns:
        UTF-8 HTML text with no external references.
    """
    thumbs = {k: thumbnail(v) for k, v in images.items()}
    bodies = {
        "overview": _section_overview(data, plots),
        "download": _section_download(data, plots),
        "filter": _section_filter(data, plots),
        "labels": _section_labels(data, plots) if data.get("labels") else "",
        "filters": _section_filters(data, thumbs) if data.get("filters") else "",
        "failures": section_html(data["failures"], thumbs) if shown_failures(data.get("failures")) else "",
        "captions": _section_captions(data, plots),
        "samples": _section_samples(data, thumbs),
    }
    shown = sections(data)
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title in shown)
    body = "".join(f'<section id="{sid}"><h2>{_e(title)}</h2>{bodies[sid]}</section>' for sid, title in shown)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    from capfilt import __version__

    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src '{_script_hash()}'">
<title>capfilt report: {_e(data['output'])}</title>
<style>{_CSS}</style></head>
<body><header><h1>CapFilt dataset report</h1><div class="sub">{_e(data['output'])} · generated {now}</div>
<nav>{nav}</nav></header>
<main>{_banners(data)}{body}</main>
<footer>capfilt {_e(__version__)} · report format {data['report_version']} · every number here is also in the JSON report</footer>
<script>{_SORT_JS}</script>
</body></html>
"""
