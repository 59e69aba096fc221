"""Recompute every number of a report JSON directly from the shards, the plain way, and compare.

The report streams shards in batches; this reads all complete shards at once with pyarrow
(``image`` left out) and computes each number with pyarrow compute, numpy or plain Python, then
asserts that the report holds exactly these numbers: every numeric (and boolean) leaf of the
report JSON must have a counterpart here, so a number added to the report without a check fails.
``run`` is compared as a whole with ``run.json``.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from capfilt import schema
from capfilt.report.build import json_safe

DL_FAIL = {schema.FAILED_TO_DOWNLOAD, schema.FAILED_TO_RESIZE, schema.TOO_SMALL, schema.TOO_LARGE,
           schema.OPTED_OUT, schema.INVALID_URL, schema.BLOCKED_ADDRESS}
BINS = {"itm": (0.0, 1.0, 50), "itc": (-1.0, 1.0, 200), "clip": (-1.0, 1.0, 200)}
_REPEAT = re.compile(r"(?<!\S)(\S+(?: \S+)*) \1(?!\S)")


def repetitive(text: str) -> bool:
    """Back-to-back repeated word n-gram, via a regex back-reference on the normalised words."""
    return _REPEAT.search(" ".join(re.findall(r"[\w']+", text.lower()))) is not None


def leaves(obj: Any, path: str = "") -> dict[str, Any]:
    """Numeric and boolean leaves of a JSON value by path (``a.b[3].c``)."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(leaves(v, f"{path}.{k}" if path else k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(leaves(v, f"{path}[{i}]"))
    elif isinstance(obj, (int, float)) and obj is not None:
        out[path] = obj
    return out


def _moments(v: np.ndarray) -> dict[str, Any]:
    if v.size == 0:
        return {"count": 0}
    return {"count": int(v.size), "mean": float(np.mean(v.astype(np.float64))), "min": float(v.min()),
            "max": float(v.max())}


def _vc(arr: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    return {d["values"]: d["counts"] for d in pc.value_counts(arr).to_pylist()}


def _texts(texts: list[str], dup: bool, rows: list[int] | None = None) -> dict[str, Any]:
    n = len(texts)
    lengths = [len(t.split()) for t in texts]
    rep = sum(repetitive(t) for t in texts)
    d: dict[str, Any] = {"count": n, "repetitive": rep}
    if n:
        d["mean_words"] = sum(lengths) / n
        d["repetition_rate"] = rep / n
        d["length_counts"] = np.bincount(np.minimum(lengths, 40), minlength=41).tolist()
    else:
        d["length_counts"] = [0] * 41
    if dup:
        by_text: dict[str, set[int]] = {}
        for t, r in zip(texts, rows):
            by_text.setdefault(t, set()).add(r)
        occ = Counter(texts)
        in_dup = sum(c for t, c in occ.items() if len(by_text[t]) >= 2)
        d.update(distinct=len(occ), in_duplicate_groups=in_dup)
        if n:
            d["duplicate_share"] = in_dup / n
        first = {}
        for i, t in enumerate(texts):
            first.setdefault(t, i)
        top = sorted(occ.items(), key=lambda kv: (-kv[1], first[kv[0]]))[:15]  # ties: first seen first
        d["most_frequent"] = [{"count": c, "images": len(by_text[t])} for t, c in top]
        d["_most_frequent_texts"] = [t for t, _ in top]
    return d


def _sample_entry(r: dict[str, Any], shard: str, index: int, scorer: str | None, selected: bool) -> dict[str, Any]:
    kept = Counter(zip(r.get("captions") or [], r.get("caption_sources") or []))
    d: dict[str, Any] = {"row": index}
    for c in ("width", "height", "original_width", "original_height"):
        if r.get(c) is not None:
            d[c] = r[c]
    if selected:
        d["keep"] = r["keep"]
    if r.get("caption") is not None:
        d["web"] = {}
        if scorer and r.get(f"web_{scorer}") is not None:
            d["web"]["score"] = r[f"web_{scorer}"]
        if selected:
            d["web"]["kept"] = kept[(r["caption"], "web")] > 0
    syn = []
    texts = r.get("synthetic_captions") or []
    scores = (r.get(f"synthetic_{scorer}") or []) if scorer else []
    # kept marks: each kept (text, synthetic) pair claims its highest-scoring occurrence
    marks = [False] * len(texts)
    for i in sorted(range(len(texts)), key=lambda i: -(scores[i] if i < len(scores) and scores[i] is not None else -1e9)):
        if kept[(texts[i], "synthetic")] > 0:
            marks[i] = True
            kept[(texts[i], "synthetic")] -= 1
    for i, _t in enumerate(texts):
        e: dict[str, Any] = {}
        if i < len(scores) and scores[i] is not None:
            e["score"] = scores[i]
        if selected:
            e["kept"] = marks[i]
        syn.append(e)
    d["synthetic"] = syn
    return d


def expected_report(out: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Every number of the report of ``out``, computed directly; sample rows as chosen by ``data``."""
    files = sorted(p for p in out.rglob("*.parquet")
                   if not any(part.startswith(("_", ".")) for part in p.relative_to(out).parts))
    def committed(p: Path) -> bool:
        stem = p.relative_to(out).with_suffix("")
        return any(c.exists() for c in (out / "_stats" / f"{stem}.stats.json", out / f"{stem}.stats.json",
                                        Path(f"{p}.stats.json")))

    complete = [p for p in files if committed(p)]
    run_path = out / "_capfilt" / "run.json"
    run = json.loads(run_path.read_text()) if run_path.exists() else {}
    cfg = run.get("config") or {}
    select = cfg.get("select") or {}
    tables = [pq.read_table(p, columns=[c for c in pq.read_schema(p).names if c != "image"]) for p in complete]
    t = pa.concat_tables(tables) if tables else None
    cols = set(t.column_names) if t is not None else set()
    n = t.num_rows if t is not None else 0
    rows = t.to_pylist() if t is not None else []
    shard_of = [(p.name, i) for p, tb in zip(complete, tables) for i in range(tb.num_rows)]

    status = _vc(t["status"]) if n else {}
    downloaded = sum(c for s, c in status.items() if s not in DL_FAIL)
    scorers = [s for s in ("itm", "itc", "clip") if f"web_{s}" in cols or f"synthetic_{s}" in cols]
    selected = "keep" in cols and (bool(scorers) or (n - t["captions"].null_count if "captions" in cols else 0) > 0)
    rank_by = select.get("rank_by")
    present = [s for s in ("itm", "clip", "itc") if s in scorers]
    primary = rank_by if rank_by in present else (present[0] if present else None)

    exp: dict[str, Any] = {"report_version": 1}
    exp["shards"] = {"found": len(files), "complete": len(complete), "read": len(complete),
                     "incomplete": len(files) - len(complete), "rows_per_shard_read": [tb.num_rows for tb in tables]}
    ov: dict[str, Any] = {"rows": n, "downloaded": downloaded, "failed": n - status.get("success", 0),
                          "status_counts": status}
    if selected:
        keep = t["keep"]
        ov["rows_kept"] = int(pc.sum(keep).as_py() or 0)
        ov["rows_dropped"] = n - ov["rows_kept"]
        dropped = pc.filter(t["drop_reason"], pc.invert(keep)).to_pylist()
        ov["drop_reasons"] = dict(Counter("(none)" if d is None else d for d in dropped))
        ov["texts_kept"] = int(pc.sum(pc.list_value_length(t["captions"])).as_py() or 0)
        ov["texts_kept_by_source"] = _vc(pc.list_flatten(t["caption_sources"]))
    exp["overview"] = ov

    dl: dict[str, Any] = {"success_rate": downloaded / n} if n else {}
    errs = Counter((r["status"], r["error_message"]) for r in rows if r.get("error_message") is not None)
    dl["distinct_error_messages"] = len(errs)
    dl["top_errors"] = [{"count": c} for _, c in sorted(errs.items(), key=lambda kv: (-kv[1], kv[0]))[:10]]
    dl["_top_error_pairs"] = [k for k, _ in sorted(errs.items(), key=lambda kv: (-kv[1], kv[0]))[:10]]
    dl["sizes"] = {}
    for c in ("original_width", "original_height", "width", "height"):
        if c in cols:
            v = t[c].drop_null().to_numpy().astype(np.int64)
            dl["sizes"][c] = {**_moments(v), "bin_px": 64,
                              "counts": np.bincount(np.minimum(v // 64, 64), minlength=65).tolist()}
    dl["per_shard"] = []
    for p, tb in zip(complete, tables):
        st = _vc(tb["status"])
        e = {"bytes": p.stat().st_size, "rows": tb.num_rows, "downloaded": sum(c for s, c in st.items() if s not in DL_FAIL),
             "success": st.get("success", 0), "kept": 0, "texts_kept": 0}
        if "keep" in cols and selected:
            e["kept"] = int(pc.sum(tb["keep"]).as_py() or 0)
        if "captions" in cols and selected:
            e["texts_kept"] = int(pc.sum(pc.list_value_length(tb["captions"])).as_py() or 0)
        dl["per_shard"].append(e)
    exp["download"] = dl

    # failures by class and domain, recomputed row by row (a row without error_class: classified from its message)
    from urllib.parse import urlsplit

    from capfilt.io.failures import TRANSIENT_CLASSES, classify

    def domain(u: Any) -> str:
        host = ((urlsplit(u.strip()).hostname or "") if isinstance(u, str) else "").lower()
        return (host[4:] if host.startswith("www.") else host) or "(no host)"

    shard_index = {p.name: j for j, p in enumerate(complete)}
    klass = [r.get("error_class") or classify(r["status"], r.get("error_message")) for r in rows]
    failed = [(r, c, i) for i, (r, c) in enumerate(zip(rows, klass)) if c is not None]
    by_class = Counter(c for _, c, _ in failed)
    by_domain: dict[str, Counter] = {}
    for r, c, _ in failed:
        by_domain.setdefault(domain(r["url"]), Counter())[c] += 1
    top = sorted(by_domain.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))[:10]
    examples: dict[str, list] = {}
    for r, c, i in failed:
        if len(examples.setdefault(c, [])) < 4:
            examples[c].append({"shard": shard_index[shard_of[i][0]], "row": shard_of[i][1],
                                "has_image": r.get("width") is not None})
    exp["failures"] = {
        "rows": n, "failed": len(failed), "transient": sum(v for k, v in by_class.items() if k in TRANSIENT_CLASSES),
        "by_class": [{"count": v, "share": v / len(failed), "transient": k in TRANSIENT_CLASSES}
                     for k, v in sorted(by_class.items(), key=lambda kv: (-kv[1], kv[0]))],
        "distinct_failing_domains": len(by_domain),
        "top_domains": [{"count": sum(cs.values()), "classes": dict(cs)} for _, cs in top],
        "examples": examples, "retries": run.get("retries") or [],
        "_names": ([k for k, _ in sorted(by_class.items(), key=lambda kv: (-kv[1], kv[0]))], [d for d, _ in top],
                   {c: [rows[i]["key"] for _, cc, i in failed if cc == c][:4] for c in by_class}),
    }

    if scorers:
        f: dict[str, Any] = {"thresholds": {s: select.get(f"{s}_threshold") for s in scorers if select.get(f"{s}_threshold") is not None},
                             "scores": {}, "removed": {}}
        if select.get("top_k") is not None:
            f["top_k"] = select["top_k"]
        for s in scorers:
            lo, hi, bins = BINS[s]
            thr = select.get(f"{s}_threshold")
            f["scores"][s] = {}
            for w, arr in (("web", t[f"web_{s}"] if f"web_{s}" in cols else pa.array([], pa.float32())),
                           ("synthetic", pc.list_flatten(t[f"synthetic_{s}"]) if f"synthetic_{s}" in cols else pa.array([], pa.float32()))):
                v = arr.drop_null().to_numpy().astype(np.float64)
                v = v[np.isfinite(v)]
                h = {**_moments(v), "histogram": {"range": [lo, hi], "bins": bins,
                                                  "counts": np.histogram(np.clip(v, lo, hi), bins=bins, range=(lo, hi))[0].tolist()}}
                if thr is not None:
                    h["below_threshold"] = int((v < thr).sum())
                    if v.size:
                        h["below_threshold_share"] = float((v < thr).sum()) / v.size
                f["scores"][s][w] = h
        web_scored = web_kept = syn_scored = syn_kept = 0
        for r in rows:
            srcs = r.get("caption_sources") or []
            ws = r.get(f"web_{primary}")
            if ws is not None and math.isfinite(ws):
                web_scored += 1
                web_kept += "web" in srcs
            ss = [x for x in (r.get(f"synthetic_{primary}") or []) if x is not None and math.isfinite(x)]
            syn_scored += len(ss)
            syn_kept += min(len(ss), srcs.count("synthetic"))
        for w, sc, k in (("web", web_scored, web_kept), ("synthetic", syn_scored, syn_kept)):
            f["removed"][w] = {"scored": sc, "kept": k, "removed": sc - k}
            if sc:
                f["removed"][w]["removed_share"] = (sc - k) / sc
        if select.get("top_k") is not None and web_scored:
            f["web_in_top_k_share"] = web_kept / web_scored
        if "web_text_truncated" in cols:
            tr = t["web_text_truncated"]
            f["web_text_truncated"] = {"measured": len(tr) - tr.null_count,
                                       "truncated": int(pc.sum(tr.cast(pa.int64())).as_py() or 0)}
            score = cfg.get("score") or {}
            if {"itm", "itc"} & set(score.get("scorers") or []):
                f["web_text_truncated"]["max_text_tokens"] = score.get("max_text_tokens")
        exp["filter"] = f

    caps: dict[str, Any] = {}
    if "caption" in cols:
        caps["web"] = _texts([r["caption"] for r in rows if r["caption"] is not None], dup=False)
    if "synthetic_captions" in cols and t["synthetic_captions"].null_count < n:
        texts, owners = [], []
        for i, r in enumerate(rows):
            for x in r["synthetic_captions"] or []:
                if x is not None:
                    texts.append(x)
                    owners.append(i)
        caps["synthetic"] = _texts(texts, dup=True, rows=owners)
    if caps:
        exp["captions"] = caps

    # samples: the report picks them (seeded); check they are valid picks and that each entry's
    # numbers are the row's numbers
    by_key = {r["key"]: (i, r) for i, r in enumerate(rows)}
    eligible = {r["key"] for r in rows if r["status"] == "success" and r.get("width") is not None}
    picked = [s["key"] for s in data["samples"]]
    assert len(picked) == len(set(picked)) == min(len(eligible), data["_samples_requested"])
    assert set(picked) <= eligible
    exp["samples"] = [_sample_entry(by_key[k][1], *shard_of[by_key[k][0]], primary, selected) for k in picked]

    bl_kept, bl_dropped = [], []
    if primary and selected:
        for i, r in enumerate(rows):
            ws = r.get(f"web_{primary}")
            if ws is None or not math.isfinite(ws):
                continue
            (bl_kept if "web" in (r.get("caption_sources") or []) else bl_dropped).append((ws, i))
    lows = [i for _, i in sorted(bl_kept)[:8]]
    highs = [i for _, i in sorted(bl_dropped, key=lambda x: (-x[0], x[1]))[:8]]
    exp["borderline"] = {
        "lowest_kept_web": [_sample_entry(rows[i], *shard_of[i], primary, selected) for i in lows],
        "highest_dropped_web": [_sample_entry(rows[i], *shard_of[i], primary, selected) for i in highs],
    }
    exp["_keys"] = {"lowest_kept_web": [rows[i]["key"] for i in lows], "highest_dropped_web": [rows[i]["key"] for i in highs]}
    exp["_run"] = run
    exp["_selected"] = selected
    exp["_primary"] = primary
    return exp


def check_report(out: Path, data: dict[str, Any], samples: int) -> int:
    """Assert that the report ``data`` of ``out`` holds exactly the directly computed numbers.

    Returns:
        How many numeric/boolean leaves were compared.
    """
    exp = expected_report(out, {**data, "_samples_requested": samples})
    # run.json is echoed, not recomputed
    run = exp["_run"]
    for k in ("config", "models", "versions", "timings", "totals", "stages"):
        assert data["run"][k] == json_safe(run.get(k))  # Infinity (max_aspect_ratio) -> null: strict JSON
    assert data["run"]["present"] == bool(run)
    assert data["run"]["tiny_models"] == ((run.get("models") or {}).get("name") == "tiny"
                                          or (run.get("config") or {}).get("models") == "tiny")
    assert data["run"]["attempts"] == (len(run["attempts"]) if isinstance(run.get("attempts"), list) else None)
    assert data["run"]["input_rows"] == run.get("input_rows")
    # the texts that go with the numbers
    assert [[e["status"], e["message"]] for e in data["download"]["top_errors"]] == \
        [list(p) for p in exp["download"].pop("_top_error_pairs")]
    if "captions" in exp and "synthetic" in exp["captions"]:
        assert [m["text"] for m in data["captions"]["synthetic"]["most_frequent"]] == \
            exp["captions"]["synthetic"].pop("_most_frequent_texts")
    assert [s["key"] for s in data["borderline"]["lowest_kept_web"]] == exp["_keys"]["lowest_kept_web"]
    assert [s["key"] for s in data["borderline"]["highest_dropped_web"]] == exp["_keys"]["highest_dropped_web"]
    assert data["filter"] is None if "filter" not in exp else data["filter"]["primary_scorer"] == exp["_primary"]
    assert (data["overview"]["rows_kept"] is not None) == exp["_selected"]
    classes, domains, example_keys = exp["failures"].pop("_names")
    assert [c["class"] for c in data["failures"]["by_class"]] == classes
    assert [d["domain"] for d in data["failures"]["top_domains"]] == domains
    assert {c: [e["key"] for e in ex] for c, ex in data["failures"]["examples"].items()} == example_keys

    got = {k: v for k, v in leaves(data).items() if not k.startswith("run.")}
    want = leaves({k: v for k, v in exp.items() if not k.startswith("_")})
    assert sorted(got) == sorted(want), (sorted(set(got) ^ set(want)))[:20]
    for k, v in want.items():
        if isinstance(v, bool) or isinstance(got[k], bool):
            assert got[k] is v, k
        elif isinstance(v, float) or isinstance(got[k], float):
            assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
        else:
            assert got[k] == v, k
    return len(want)
