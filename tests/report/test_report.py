"""``capfilt report`` / ``capfilt inspect`` on contract-conforming outputs built from real files.

The outputs come from :mod:`tests.helpers.report_fixture` (real COCO thumbnails and captions, seeded
scores, the recipe's select rule); every number of the JSON is recomputed directly from the
shards by :mod:`tests.helpers.report_expect`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console
from typer.testing import CliRunner

from capfilt import schema
from capfilt.stages.registry import output_schema
from capfilt.errors import OutputError
from capfilt.report import build_report, inspect_output
from capfilt.report.html import SECTIONS
from capfilt.report.accumulate import repeated_ngram, word_count
from capfilt.report.layout import uses_tiny_models
from capfilt.report.stats import compute_report_data
from tests.helpers.report_expect import check_report, repetitive
from tests.helpers.report_fixture import make_output


def _report(out: Path, tmp: Path, samples: int = 24) -> tuple[dict, str]:
    data = build_report(out, html=tmp / "r.html", json_path=tmp / "r.json", samples=samples)
    on_disk = json.loads((tmp / "r.json").read_text())
    assert on_disk == {k: v for k, v in data.items() if k != "files"}
    return on_disk, (tmp / "r.html").read_text()


@pytest.mark.parametrize("recipe", ["blip", "blip2", "download"])
def test_every_json_number_matches_pyarrow(tmp_path, recipe):
    out = make_output(tmp_path / "out", rows=130, rows_per_shard=40, recipe=recipe, seed=3)
    data, html = _report(out, tmp_path, samples=10)
    n = check_report(out, data, samples=10)
    assert n > 300  # histograms, per-shard rows, sample scores...
    assert data["overview"]["rows"] == 130 and data["shards"]["read"] == 4
    for _sid, title in SECTIONS:
        assert f"<h2>{title}</h2>" in html
    if recipe == "download":
        assert data["filter"] is None and data["overview"]["rows_kept"] is None
        assert data["captions"]["synthetic"] is None and data["captions"]["web"]["count"] > 100
        assert "nothing was filtered" in html
    else:
        assert data["filter"]["primary_scorer"] == ("clip" if recipe == "blip2" else "itm")
        # the fixture injects "dai dai dai"-style captions and one generic caption
        syn = data["captions"]["synthetic"]
        assert syn["repetitive"] > 0 and any("dai dai" in t for t in syn["repetitive_examples"])
        assert syn["most_frequent"][0]["text"] == "a picture of a room with a table"
    if recipe == "blip2":
        assert data["filter"]["top_k"] == 2 and 0 < data["filter"]["web_in_top_k_share"] < 1
        assert "web caption in top-2" in html
        assert "clip" in data["filter"]["scores"]


def test_download_output_written_with_null_select_columns(tmp_path):
    """The real writer keeps every contract column: a download run has all-null captions and keep=False."""
    out = make_output(tmp_path / "out", rows=60, rows_per_shard=30, recipe="download", seed=1)
    full = output_schema(scorers=[])
    for p in out.glob("*.parquet"):
        t = pq.read_table(p)
        pq.write_table(schema.conform(t, full), p)
    data, html = _report(out, tmp_path, samples=6)
    check_report(out, data, samples=6)
    assert data["overview"]["rows_kept"] is None  # not "0 kept": nothing was selected
    assert all(s["keep"] is None for s in data["samples"])
    assert "dropped" not in html.split('id="samples"')[1]


def test_interrupted_run(tmp_path):
    out = make_output(tmp_path / "out", rows=200, rows_per_shard=40, recipe="blip", incomplete_shards=2,
                      run_json="partial", seed=5)
    (out / "_capfilt" / "tmp").mkdir()
    (out / "_capfilt" / "tmp" / "00004.abc.parquet").write_bytes(b"partial write")  # ignored: under _capfilt
    data, html = _report(out, tmp_path, samples=8)
    check_report(out, data, samples=8)
    assert data["shards"] == {**data["shards"], "found": 5, "complete": 3, "read": 3, "incomplete": 2,
                              "incomplete_files": ["00003.parquet", "00004.parquet"]}
    assert data["overview"]["rows"] == 120
    assert data["run"]["missing_keys"] == ["models", "timings", "totals", "stages"]
    assert "Partial output: 3 of 5 shard(s) read, 2 incomplete shard(s) skipped." in html
    assert "lacks models, timings, totals, stages" in html
    # a run record with status/input_rows as capfilt.api writes it while running
    rec = json.loads((out / "_capfilt" / "run.json").read_text())
    rec.update(status="running", input_rows=200, attempts=[{"started": 1.0}])
    (out / "_capfilt" / "run.json").write_text(json.dumps(rec))
    data2, html2 = _report(out, tmp_path, samples=8)
    check_report(out, data2, samples=8)
    assert any("read 120 of the run's 200 input rows" in w for w in data2["warnings"])
    assert any("'running'" in w for w in data2["warnings"])


def test_no_run_json_and_no_shards(tmp_path):
    out = make_output(tmp_path / "out", rows=50, rows_per_shard=25, run_json="none", seed=2)
    data, html = _report(out, tmp_path, samples=4)
    check_report(out, data, samples=4)
    assert data["run"]["present"] is False and "No run record" in html
    assert data["filter"]["thresholds"]["itm"] is None  # unknown without the recipe: no line drawn
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "e").mkdir()
    data, html = _report(empty, tmp_path / "e", samples=4)
    assert data["overview"]["rows"] == 0 and data["shards"]["found"] == 0
    assert any("no Parquet shards" in w for w in data["warnings"])
    for _sid, title in SECTIONS:
        assert f"<h2>{title}</h2>" in html
    with pytest.raises(OutputError, match="not a capfilt output folder"):
        build_report(tmp_path / "missing")


def test_corrupt_committed_shard_is_reported_not_fatal(tmp_path):
    out = make_output(tmp_path / "out", rows=90, rows_per_shard=30, seed=4)
    (out / "00001.parquet").write_bytes(b"PAR1 this is not parquet")
    data = compute_report_data(str(out), samples=4).data
    assert data["shards"]["read"] == 2 and data["overview"]["rows"] == 60
    assert any("00001.parquet cannot be read" in w for w in data["warnings"])
    assert [s.get("error") is not None for s in data["download"]["per_shard"]] == [False, True, False]


def test_tiny_models_are_called_noise(tmp_path):
    out = make_output(tmp_path / "out", rows=40, rows_per_shard=40, models="tiny")
    _, html = _report(out, tmp_path, samples=4)
    assert "Untrained models." in html and "captions and all scores are noise" in html
    out2 = make_output(tmp_path / "out2", rows=40, rows_per_shard=40, models="blip-large")
    d2, html2 = _report(out2, tmp_path, samples=4)
    assert "Untrained models." not in html2 and d2["run"]["tiny_models"] is False
    assert d2["run"]["model_ids"]["captioner"] == "Salesforce/blip-image-captioning-large"
    assert uses_tiny_models({"config": {"models": "tiny"}}) and not uses_tiny_models(None)


def test_html_is_self_contained_and_escapes_captions(tmp_path):
    out = make_output(tmp_path / "out", rows=30, rows_per_shard=30, seed=0)
    t = pq.read_table(out / "00000.parquet")
    caps = t.column("caption").to_pylist()
    evil = '<script>alert("x")</script><img src="http://example.com/x.png">'
    caps = [evil if c is not None else None for c in caps]
    t = t.set_column(t.column_names.index("caption"), "caption", pa.array(caps))
    pq.write_table(t, out / "00000.parquet")
    data, html = _report(out, tmp_path, samples=30)
    # the page's only script is the sort/filter one its CSP names by hash; captions are escaped
    from capfilt.report.html import _SORT_JS, _script_hash

    assert html.count("<script") == 1 and f"<script>{_SORT_JS}</script>" in html and "&lt;script&gt;" in html
    assert f"script-src '{_script_hash()}'" in html
    # no network: nothing but data: URIs and in-page anchors
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert refs and all(r.startswith(("data:", "#")) for r in refs), [r for r in refs if not r.startswith(("data:", "#"))]
    assert "default-src 'none'" in html
    assert html.count('class="plot"') == 5  # status, sizes, itm, itc, lengths
    assert html.count('class="thumb"') >= len(data["samples"]) > 0


def test_samples_are_seeded_and_bounded(tmp_path):
    out = make_output(tmp_path / "out", rows=100, rows_per_shard=20, seed=7)
    a = compute_report_data(str(out), samples=12, seed=1)
    b = compute_report_data(str(out), samples=12, seed=1)
    c = compute_report_data(str(out), samples=12, seed=2)
    keys = [s["key"] for s in a.data["samples"]]
    assert keys == [s["key"] for s in b.data["samples"]] and keys != [s["key"] for s in c.data["samples"]]
    assert len(keys) == 12 and set(keys) <= set(a.images)
    shown = set(keys) | {s["key"] for v in ("lowest_kept_web", "highest_dropped_web") for s in a.data["borderline"][v]}
    assert set(a.images) == shown  # image bytes read only for the rows shown
    assert compute_report_data(str(out), samples=0).data["samples"] == []


def test_repetition_and_word_count():
    cases = {
        "a dai dai dai dai dai": "dai",
        "a man riding a wave on a wave on a wave": "a wave on",
        "A Cat. cat sitting": "cat",
        "a man and a woman on a bench": None,
        "it's s fine": None,
        "": None,
    }
    for text, rep in cases.items():
        assert repeated_ngram(text) == rep, text
        assert repetitive(text) == (rep is not None), text
    assert word_count("  two   words ") == 2 and word_count("") == 0


def test_inspect_prints_overview(tmp_path):
    out = make_output(tmp_path / "out", rows=80, rows_per_shard=40, incomplete_shards=1, seed=9)
    con = Console(record=True, width=120)
    data = inspect_output(out, con)
    text = con.export_text()
    assert "shards read" in text and "1 of 2" in text and "1 incomplete skipped" in text
    assert f"{data['overview']['rows_kept']:,}" in text and "untrained tiny models" in text
    assert data["samples"] == []


def test_cli_report_and_inspect(tmp_path):
    from capfilt.cli import app

    out = make_output(tmp_path / "out", rows=60, rows_per_shard=30, seed=11)
    r = CliRunner().invoke(app, ["report", str(out), "--samples", "5"])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "_capfilt" / "report.json").read_text())
    assert len(data["samples"]) == 5 and (out / "_capfilt" / "report.html").stat().st_size > 10_000
    assert "read 2 of 2 shard(s), 60 rows" in r.output
    html, js = tmp_path / "x" / "r.html", tmp_path / "y" / "r.json"
    r = CliRunner().invoke(app, ["report", str(out), "--html", str(html), "--json", str(js), "--samples", "0"])
    assert r.exit_code == 0, r.output
    assert html.exists() and json.loads(js.read_text())["samples"] == []
    r = CliRunner().invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0 and "rows kept" in r.output
    r = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "not a capfilt output folder" in r.output
    shutil.rmtree(out)


def test_most_frequent_texts_found_in_a_second_pass(tmp_path, monkeypatch):
    """Beyond the text cache only hashes are kept; the top texts are read back from the shards."""
    from capfilt.report.accumulate import TextStats

    monkeypatch.setattr(TextStats, "TEXT_CACHE", 2)
    out = make_output(tmp_path / "out", rows=80, rows_per_shard=20, recipe="blip2", seed=6)
    data, html = _report(out, tmp_path, samples=4)
    check_report(out, data, samples=4)  # texts included, in order
    top = data["captions"]["synthetic"]["most_frequent"]
    assert len(top) == 15 and all(m["text"] for m in top)
    assert top[0]["text"] in html


def test_web_captions_longer_than_the_filter_reads_are_counted_in_report_and_inspect(tmp_path):
    """Issue 10 item 13: the fixture's 1-in-29 five-fold alt texts exceed the 35 tokens ITM/ITC read."""
    out = make_output(tmp_path / "out", rows=120, rows_per_shard=40, seed=5)
    t = pa.concat_tables([pq.read_table(p, columns=["web_text_truncated"]) for p in sorted(out.glob("*.parquet"))])
    n_long = int(pa.compute.sum(t["web_text_truncated"].cast(pa.int64())).as_py())
    measured = len(t) - t["web_text_truncated"].null_count
    assert n_long >= 2
    data, html = _report(out, tmp_path)
    assert data["filter"]["web_text_truncated"] == {"measured": measured, "truncated": n_long, "max_text_tokens": 35}
    line = (f"{n_long:,} of {measured:,} web captions ({n_long / measured:.1%}) were longer than the filter reads "
            f"(35 tokens) and were judged on their first 35 tokens")
    assert line in html
    con = Console(record=True, width=160)
    inspect_output(out, con)
    text = con.export_text()
    assert "web captions truncated" in text and f"{n_long:,} of {measured:,}" in text
    assert "judged on their first 35 tokens" in text


def test_a_folder_that_is_not_an_output_is_refused_and_left_untouched(tmp_path):
    """Found by a fresh-clone trial: `capfilt report www` wrote report files into a folder of images."""
    from capfilt.errors import OutputError
    from capfilt.report import build_report

    www = tmp_path / "www"
    www.mkdir()
    (www / "a.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(OutputError, match="is not a capfilt output"):
        build_report(www, html=www / "_capfilt" / "report.html", json_path=www / "_capfilt" / "report.json")
    assert sorted(p.name for p in www.iterdir()) == ["a.jpg"]
