"""``capfilt report --label-col``: the filter evaluated against ground-truth labels.

The metric functions are checked on 10 hand-computed rows; the report on fixture outputs with a
``noise_type`` column is checked against a plain recomputation from the shards (a brute-force
threshold search included); the error cases go through the CLI.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from capfilt.errors import LabelError
from capfilt.report import build_report, inspect_output
from capfilt.report.html import FAILURES_SECTION, LABELS_SECTION, SECTIONS, sections
from capfilt.report.labels import (LabelScores, check_label_column, confusion, label_report, label_scorer,
                                   positive_values, removal_metrics, removed_by_threshold, split_values,
                                   suggest_thresholds, threshold_grid)
from tests.helpers.report_expect import check_report
from tests.helpers.report_fixture import make_output

# 10 rows: 5 clean, 3 unrelated, 2 wrong_count; codes 0, 1, 2
LABELS = ["clean", "clean", "clean", "unrelated", "clean", "clean", "wrong_count", "unrelated", "wrong_count", "unrelated"]
SCORES = np.array([0.95, 0.90, 0.80, 0.70, 0.60, 0.45, 0.40, 0.30, 0.20, 0.10], np.float32)
VALUES = ["clean", "unrelated", "wrong_count"]
CODES = np.array([VALUES.index(v) for v in LABELS], np.int64)
POSITIVE = np.array([True, False, False])


def test_confusion_and_metrics_by_hand():
    kept, removed = confusion(CODES, SCORES, 3, 0.5)
    # removed (< 0.5): clean 0.45 | unrelated 0.30, 0.10 | wrong_count 0.40, 0.20
    assert kept.tolist() == [4, 1, 0] and removed.tolist() == [1, 2, 2]
    m = removal_metrics(kept, removed, POSITIVE)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (4, 1, 1, 4)
    assert m["precision"] == pytest.approx(0.8) and m["recall"] == pytest.approx(0.8)
    assert m["f1"] == pytest.approx(0.8) and m["clean_keep_rate"] == pytest.approx(0.8)
    assert m["accuracy"] == pytest.approx(0.8)
    # threshold 0.35: removes 0.30, 0.20, 0.10 (all noisy)
    kept, removed = confusion(CODES, SCORES, 3, 0.35)
    m = removal_metrics(kept, removed, POSITIVE)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 0, 2, 5)
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(0.6) and m["f1"] == pytest.approx(0.75)
    # nothing removed: precision undefined (NaN -> null in JSON), recall 0
    m = removal_metrics(*confusion(CODES, SCORES, 3, 0.0), POSITIVE)
    assert np.isnan(m["precision"]) and m["recall"] == 0.0 and m["clean_keep_rate"] == 1.0


def test_suggested_thresholds_by_hand():
    noisy = ~POSITIVE[CODES]
    # splits (removed below): 0.425 removes the 4 lowest noisy and no clean: F1 = 8 / 9 (best);
    # 0.75 removes all 5 noisy and 2 clean: F1 = 10 / 12
    best, keep = suggest_thresholds(SCORES, noisy)
    assert best == pytest.approx(0.425, abs=1e-6)
    assert keep == pytest.approx(0.425, abs=1e-6)  # keeping >= 90 % of 5 clean: no clean removed
    _, keep80 = suggest_thresholds(SCORES, noisy, min_clean_keep=0.8)
    assert keep80 == pytest.approx(0.525, abs=1e-6)  # between 0.45 (clean, removed) and 0.60 (clean, kept)
    _, keep0 = suggest_thresholds(SCORES, noisy, min_clean_keep=0.0)
    assert keep0 == pytest.approx(0.925, abs=1e-6)  # everything but the top score removed
    # no noisy rows: no F1; removing the lowest of 10 clean still keeps 90 %
    assert suggest_thresholds(SCORES, np.zeros(10, bool)) == (None, pytest.approx(0.15))
    assert suggest_thresholds(np.zeros(0, np.float32), np.zeros(0, bool)) == (None, None)
    # ties: equal scores are never split
    best, _ = suggest_thresholds(np.array([0.2, 0.2, 0.8], np.float32), np.array([True, False, False]))
    assert best == pytest.approx(0.5)


def test_curve_by_hand():
    grid = threshold_grid("itm", SCORES)
    assert grid.shape == (101,) and grid[0] == 0.0 and grid[-1] == 1.0 and grid[50] == pytest.approx(0.5)
    rem = removed_by_threshold(CODES, SCORES, 3, grid)
    assert rem.shape == (3, 101)
    assert rem[:, 50].tolist() == [1, 2, 2] and rem[:, 0].tolist() == [0, 0, 0] and rem[:, 100].tolist() == [5, 3, 2]
    assert rem[:, 35].tolist() == [0, 2, 1]  # < 0.35: unrelated 0.30, 0.10; wrong_count 0.20
    per = np.bincount(CODES, minlength=3)[:, None]
    m = removal_metrics(per - rem, rem, POSITIVE)
    assert m["recall"][50] == pytest.approx(0.8) and m["precision"][35] == pytest.approx(1.0)
    assert np.isnan(m["precision"][0]) and m["clean_keep_rate"][100] == 0.0
    cos = threshold_grid("clip", np.array([0.213, 0.377], np.float32))
    assert cos[0] == pytest.approx(0.21) and cos[-1] == pytest.approx(0.38)


def test_label_report_by_hand():
    acc = LabelScores("noise_type")
    scores = np.concatenate([SCORES, [np.nan, 0.99, np.nan]]).astype(np.float64)
    labels = LABELS + ["junk", None, "clean"]  # junk and the last clean: not scored; None: unlabelled
    acc.add(pa.array(labels[:6]), scores[:6])
    acc.add(pa.array(labels[6:]), scores[6:])
    acc.add(None, np.array([0.5]))  # a shard without the column: unlabelled
    r = label_report(acc, "itm", None)
    assert r["threshold"] == 0.5 and r["threshold_source"] == "default" and r["positive_values"] == ["clean"]
    assert (r["rows"], r["unlabelled"], r["labelled"], r["scored"], r["unscored"]) == (14, 2, 12, 10, 2)
    assert [(c["label"], c["rows"], c["scored"], c["kept"], c["removed"], c["unscored"]) for c in r["classes"]] == [
        ("clean", 6, 5, 4, 1, 1), ("unrelated", 3, 3, 1, 2, 0), ("wrong_count", 2, 2, 0, 2, 0), ("junk", 1, 0, 0, 0, 1)]
    assert r["classes"][1]["removed_rate"] == pytest.approx(2 / 3) and np.isnan(r["classes"][3]["kept_rate"])
    assert r["metrics"]["precision"] == pytest.approx(0.8) and r["metrics"]["tp"] == 4
    best = r["suggested"]["best_f1"]
    assert best["threshold"] == pytest.approx(0.425, abs=1e-6) and best["f1"] == pytest.approx(8 / 9)
    assert best["classes"][0] == {"label": "clean", "kept": 5, "removed": 0} and best["removed"] == 4
    assert r["curve"]["recall_by_label"]["unrelated"][50] == pytest.approx(2 / 3)
    assert list(r["curve"]["recall_by_label"]) == ["unrelated", "wrong_count", "junk"]
    r2 = label_report(acc, "itm", 0.75, given_positive=["clean", "wrong_count"], min_clean_keep=0.5)
    assert r2["threshold_source"] == "recipe" and r2["positive_source"] == "option"
    assert [c["label"] for c in r2["classes"]][:2] == ["clean", "wrong_count"]
    # removed (< 0.75): unrelated 0.70 0.30 0.10 (noisy); clean 0.60 0.45 and wrong_count 0.40 0.20 (now positive)
    assert (r2["metrics"]["tp"], r2["metrics"]["fp"], r2["metrics"]["fn"], r2["metrics"]["tn"]) == (3, 4, 0, 3)


def test_label_values_and_types():
    acc = LabelScores("ok")
    acc.add(pa.array([True, False, None]), np.array([0.9, 0.1, 0.5]))
    acc.add(pa.array([1, 0, 1], pa.int64()).cast(pa.int64()), np.array([0.8, 0.2, 0.7]))
    codes, scores = acc.arrays()
    assert acc.values == ["true", "false", "1", "0"] and codes.tolist() == [0, 1, -1, 2, 3, 2]
    assert codes.dtype == np.int16 and scores.dtype == np.float32
    r = label_report(acc, "itm", None)
    assert r["positive_values"] == ["1", "true"] and r["metrics"]["tp"] == 2 and r["metrics"]["fp"] == 0
    bad = LabelScores("captions")
    with pytest.raises(LabelError, match="type list<item: string>"):
        bad.add(pa.array([["a"], ["b"]]), np.array([0.1, 0.2]))
    many = LabelScores("caption")
    with pytest.raises(LabelError, match="more than 100 distinct values"):
        many.add(pa.array([f"text {i}" for i in range(150)]), np.zeros(150))


def test_positive_values_and_columns():
    assert positive_values(["Unrelated", " Clean "], "noise_type") == [" Clean "]
    assert positive_values(["yes", "no"], "audit") == ["yes"]
    assert positive_values(["ok", "bad"], "audit", ["OK"]) == ["ok"]
    with pytest.raises(LabelError, match=r"'ok', 'bad'; none of the default positive values .* --label-positive"):
        positive_values(["ok", "bad"], "audit")
    assert split_values(["clean,wrong_count", " junk ", ""]) == ["clean", "wrong_count", "junk"]
    assert split_values(None) is None and split_values([","]) is None
    check_label_column(["key", "noise_type"], "noise_type")
    with pytest.raises(LabelError, match=r"label column 'nois' is not in this output; its pass-through input "
                                         r"columns are: lang, noise_type$"):
        check_label_column(["key", "url", "web_itm", "noise_type", "lang", "keep"], "nois")
    assert label_scorer({"web_itc", "web_clip"}) == "clip" and label_scorer({"web_itm", "web_clip"}) == "itm"
    with pytest.raises(LabelError, match="no web caption scores"):
        label_scorer({"key", "caption"})


# ------------------------------------------------------------------------------ on fixture outputs
def _expected(out: Path, column: str, threshold: float, positive: set[str]) -> dict:
    """Per label [scored, kept, removed, unscored], metrics and the brute-force best-F1 split, the plain way."""
    rows = []
    for p in sorted(out.glob("*.parquet")):
        if (out / "_stats" / (p.stem + ".stats.json")).exists():
            rows += pq.read_table(p, columns=[column, "status", "web_itm"]).to_pylist()
    per: dict[str, list[int]] = {}
    pairs = []
    for r in rows:
        if r[column] is None:
            continue
        c = per.setdefault(r[column], [0, 0, 0, 0])
        if r["status"] != "success" or r["web_itm"] is None:
            c[3] += 1
            continue
        c[0] += 1
        c[1 if r["web_itm"] >= threshold else 2] += 1
        pairs.append((r["web_itm"], r[column] not in positive))
    tp = sum(v[2] for k, v in per.items() if k not in positive)
    fp = sum(v[2] for k, v in per.items() if k in positive)
    fn = sum(v[1] for k, v in per.items() if k not in positive)
    tn = sum(v[1] for k, v in per.items() if k in positive)
    uniq = sorted({s for s, _ in pairs})
    cands = [uniq[0]] + [(a + b) / 2 for a, b in zip(uniq, uniq[1:])]
    n_noisy = sum(n for _, n in pairs)

    def f1(t: float) -> float:
        t_p = sum(1 for s, n in pairs if n and s < t)
        f_p = sum(1 for s, n in pairs if not n and s < t)
        return 2 * t_p / (2 * t_p + f_p + n_noisy - t_p)

    scores = [f1(t) for t in cands]
    best = cands[scores.index(max(scores))]
    return {"per": per, "rows": len(rows), "tp": tp, "fp": fp, "fn": fn, "tn": tn, "best": best,
            "best_f1": max(scores), "pairs": pairs, "cands": cands}


def test_report_on_fixture_matches_plain_recomputation(tmp_path):
    out = make_output(tmp_path / "out", rows=260, rows_per_shard=70, seed=4, noise_col="noise_type", incomplete_shards=1)
    data = build_report(out, html=tmp_path / "r.html", json_path=tmp_path / "r.json", samples=4, label_col="noise_type")
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert on_disk == {k: v for k, v in data.items() if k != "files"}
    check_report(out, {**on_disk, "labels": None}, samples=4)  # every other number unchanged
    lab = on_disk["labels"]
    exp = _expected(out, "noise_type", 0.5, {"clean"})
    assert lab["scorer"] == "itm" and lab["threshold"] == 0.5 and lab["threshold_source"] == "recipe"
    assert lab["rows"] == exp["rows"] == on_disk["overview"]["rows"] == 210
    got = {c["label"]: [c["scored"], c["kept"], c["removed"], c["unscored"]] for c in lab["classes"]}
    assert got == exp["per"]
    assert [c["label"] for c in lab["classes"]][0] == "clean" and len(lab["classes"]) == 5
    noise_rows = [c["rows"] for c in lab["classes"][1:]]
    assert noise_rows == sorted(noise_rows, reverse=True)
    assert lab["unscored"] == sum(v[3] for v in exp["per"].values()) > 0
    assert lab["unlabelled"] == exp["rows"] - lab["labelled"] > 0
    m = lab["metrics"]
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (exp["tp"], exp["fp"], exp["fn"], exp["tn"])
    assert m["precision"] == pytest.approx(exp["tp"] / (exp["tp"] + exp["fp"]))
    assert m["recall"] == pytest.approx(exp["tp"] / (exp["tp"] + exp["fn"]))
    assert m["clean_keep_rate"] == pytest.approx(exp["tn"] / (exp["tn"] + exp["fp"]))
    # the fixture's select step used the same scores: kept by threshold == web caption in caption_sources
    kept_web = sum(1 for p in out.glob("*.parquet") if (out / "_stats" / (p.stem + ".stats.json")).exists()
                   for r in pq.read_table(p, columns=["noise_type", "caption_sources"]).to_pylist()
                   if r["noise_type"] is not None and "web" in (r["caption_sources"] or []))
    assert kept_web == m["tn"] + m["fn"]
    best = lab["suggested"]["best_f1"]
    assert best["threshold"] == pytest.approx(exp["best"], abs=1e-7) and best["f1"] == pytest.approx(exp["best_f1"])
    keep = lab["suggested"]["clean_keep"]
    assert keep["clean_keep_rate"] >= 0.9 and keep["threshold"] >= lab["curve"]["thresholds"][0]
    # the next higher split would keep less than 90 % of clean captions
    clean = [s for s, noisy in exp["pairs"] if not noisy]
    nxt = min(t for t in exp["cands"] if t > keep["threshold"] + 1e-9)
    assert sum(s >= keep["threshold"] for s in clean) / len(clean) == pytest.approx(keep["clean_keep_rate"])
    assert sum(s >= nxt for s in clean) / len(clean) < 0.9
    curve = lab["curve"]
    assert len(curve["thresholds"]) == 101 and curve["precision"][50] == pytest.approx(m["precision"])
    assert set(curve["recall_by_label"]) == {"unrelated", "wrong_attribute", "wrong_count", "junk"}
    assert all(curve["recall_by_label"]["unrelated"][i] <= curve["recall_by_label"]["unrelated"][i + 1] for i in range(100))

    html = (tmp_path / "r.html").read_text()
    assert f"<h2>{LABELS_SECTION[1]}</h2>" in html and 'data-plot="labels_pr"' in html
    table = re.search(r'<table class="confusion">.*?</table>', html).group(0)
    assert table.count("<tr>") == 1 + 5
    assert f"Suggested threshold: itm ≥ {best['threshold']:.3f}" in html
    shown = [t for s, t in sections(on_disk) if s != FAILURES_SECTION[0]]  # failed rows add their own section
    assert shown == [t for _, t in SECTIONS[:3]] + [LABELS_SECTION[1]] + [t for _, t in SECTIONS[3:]]


def test_report_without_labels_has_no_section(tmp_path):
    out = make_output(tmp_path / "out", rows=40, rows_per_shard=40, seed=1, noise_col="noise_type")
    data = build_report(out, html=tmp_path / "r.html", json_path=tmp_path / "r.json", samples=2)
    assert data["labels"] is None and [s for s in sections(data) if s != FAILURES_SECTION] == SECTIONS
    assert LABELS_SECTION[1] not in (tmp_path / "r.html").read_text()


def test_blip2_run_has_no_itm_threshold(tmp_path):
    out = make_output(tmp_path / "out", rows=60, rows_per_shard=30, recipe="blip2", seed=2, noise_col="noise_type")
    lab = build_report(out, html=tmp_path / "r.html", json_path=tmp_path / "r.json", samples=0,
                       label_col="noise_type")["labels"]
    assert lab["scorer"] == "itm" and lab["threshold"] == 0.5 and lab["threshold_source"] == "default"
    assert lab["classes"][0]["label"] == "clean" and lab["scored"] > 0


def test_cli_labels_and_errors(tmp_path):
    from capfilt.cli import app

    out = make_output(tmp_path / "out", rows=80, rows_per_shard=40, seed=5, noise_col="noise_type")
    r = CliRunner().invoke(app, ["report", str(out), "--samples", "0", "--label-col", "noise_type",
                                 "--label-positive", "clean,wrong_attribute"])
    assert r.exit_code == 0, r.output
    lab = json.loads((out / "_capfilt" / "report.json").read_text())["labels"]
    assert lab["positive_values"] == ["clean", "wrong_attribute"] and lab["positive_source"] == "option"
    assert "filter vs noise_type: at itm >= 0.5" in r.output and "suggested threshold" in r.output

    r = CliRunner().invoke(app, ["report", str(out), "--label-col", "noise"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "label column 'noise' is not in this output; its pass-through input columns are: noise_type" in r.output

    r = CliRunner().invoke(app, ["report", str(out), "--label-col", "noise_type", "--label-positive", "matches"])
    assert r.exit_code == 2 and "none of 'matches' (given with --label-positive)" in r.output

    # a column none of whose values is a default positive one
    for p in out.glob("*.parquet"):
        t = pq.read_table(p)
        i = t.column_names.index("noise_type")
        vals = ["ok" if v == "clean" else v for v in t.column("noise_type").to_pylist()]
        pq.write_table(t.set_column(i, "noise_type", pa.array(vals, pa.string())), p)
    r = CliRunner().invoke(app, ["report", str(out), "--label-col", "noise_type"])
    assert r.exit_code == 2 and "none of the default positive values" in r.output and "--label-positive" in r.output

    r = CliRunner().invoke(app, ["inspect", str(out), "--label-col", "noise_type", "--label-positive", "ok"])
    assert r.exit_code == 0, r.output
    assert "filter vs labels: noise_type" in r.output and "ok (matches)" in r.output

    dl = make_output(tmp_path / "dl", rows=30, rows_per_shard=30, recipe="download", seed=1)
    r = CliRunner().invoke(app, ["report", str(dl), "--label-col", "url"])
    assert r.exit_code == 2 and "no web caption scores" in r.output


def test_inspect_api_with_labels(tmp_path):
    from rich.console import Console

    out = make_output(tmp_path / "out", rows=50, rows_per_shard=50, seed=6, noise_col="noise_type")
    con = Console(record=True, width=140)
    data = inspect_output(out, con, label_col="noise_type")
    text = con.export_text()
    assert data["labels"]["scored"] > 0 and "clean (matches)" in text and "removal precision" in text
