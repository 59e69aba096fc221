"""Failures grouped by cause: the 1,000 real LAION rows of tests/fixtures (every host unreachable
here) through the download recipe; the end-of-run summary, ``capfilt inspect`` and the report (HTML and
JSON) show the same counts by class and the same top failing domains."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from rich.console import Console

from capfilt.api import RunOptions, run
from capfilt.io.failures import CLASSES, domain_of
from capfilt.report.build import build_report
from capfilt.report.inspect import inspect_output
from capfilt.summary import print_summary

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _plain(con: Console) -> str:
    """The recorded console text without table borders."""
    return re.sub(r"[│┃]", " ", con.export_text())


@pytest.fixture(scope="module")
def laion_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("laion") / "out"
    result = run(RunOptions(inputs=[str(FIXTURES / "meta/test_1000.parquet")], output=str(out), pipeline="download",
                            executor="local", overrides={"download.timeout": 2.0, "download.thread_count": 64}))
    return out, result


@pytest.mark.slow  # ~2 min: the system resolver takes its time over 1,000 unknown host names
def test_laion_failures_by_class_and_domain_everywhere(laion_out):
    out, result = laion_out
    rows = ds.dataset(sorted(str(p) for p in out.glob("*.parquet"))).to_table(
        columns=["url", "status", "error_message", "error_class"]).to_pylist()
    assert len(rows) == 1000
    failed = [r for r in rows if r["status"] != "success"]
    assert len(failed) >= 990  # no host is reachable from here
    # every failed row has a known class; the many distinct messages collapse to a few classes
    assert all(r["error_class"] in CLASSES for r in failed)
    assert all(r["error_class"] is None for r in rows if r["status"] == "success")
    by_class = Counter(r["error_class"] for r in failed)
    assert len({r["error_message"] for r in failed}) > 500 and len(by_class) <= 6
    assert by_class.most_common(1)[0][0] == "dns"
    by_domain = Counter(domain_of(r["url"]) for r in failed)
    top5 = sorted(by_domain.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    assert top5[0][1] >= 2  # some LAION hosts serve many rows

    # run totals (from the shards' stats: exact here, one shard of 1,000 rows) and the summary
    assert result.totals["error_class"] == dict(by_class)
    for d, n in top5:
        assert result.totals["failed_domains"][d] == n
    con = Console(record=True, width=160)
    print_summary(result, con)
    text = _plain(con)
    assert re.search(rf"failures by class\s+{len(failed):,} \(", text)
    for c, n in by_class.items():
        assert re.search(rf"  {c}( \(transient\))?\s+{n:,}\s", text), c
    assert "top failing domains" in text and re.search(rf"  {re.escape(top5[0][0])}\s+{top5[0][1]:,}", text)

    # capfilt inspect
    con = Console(record=True, width=200)
    data = inspect_output(out, console=con)
    text = _plain(con)
    assert f"failures by class: {len(failed):,} of 1,000 rows" in text
    for c, n in by_class.items():
        assert re.search(rf"  {c}\s+{n:,}\s", text), c
    assert re.search(rf"  {re.escape(top5[0][0])}\s+{top5[0][1]:,}", text)

    # the report: report.json and the HTML hold the same numbers
    rep = build_report(out)
    js = json.loads(Path(rep["files"]["json"]).read_text())
    f = js["failures"]
    assert f == data["failures"] | {"examples": f["examples"]}
    assert {c["class"]: c["count"] for c in f["by_class"]} == dict(by_class)
    assert [(d["domain"], d["count"]) for d in f["top_domains"][:5]] == top5
    assert f["failed"] == len(failed) and f["distinct_failing_domains"] == len(by_domain)
    assert set(f["examples"]) == set(by_class)
    for c, ex in f["examples"].items():
        assert 1 <= len(ex) <= 4 and all(e["error_class"] == c and e["url"] and e["message"] for e in ex)
    html = Path(rep["files"]["html"]).read_text()
    assert '<section id="failures"><h2>Failures by class</h2>' in html
    for c, n in by_class.items():
        assert f'<a href="#failures-{c}">{c}</a></td><td class="n" data-v="{n}">{n:,}</td>' in html
        assert f'<table class="failure-examples" data-class="{c}">' in html
    assert f"<td>{top5[0][0]}</td><td class=\"n\">{top5[0][1]:,}</td>" in html
