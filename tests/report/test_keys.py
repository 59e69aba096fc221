"""The HTML report names recorded values for a person ("Wall time (all attempts)"), with the raw
``run.json`` key beside it (issue 14)."""

from __future__ import annotations

import html as htmllib
import json
import re

from capfilt.report import build_report
from capfilt.report.keys import human_label, human_value
from tests.helpers.report_fixture import make_output


def test_labels_and_values():
    assert human_label("timings.wall_seconds") == "Wall time (all attempts)"
    assert human_label("totals.status.too_small") == "Rows with status too_small"
    assert human_label("versions.torch") == "torch version"
    assert human_label("totals.some_new_counter") == "Some new counter"  # fallback: readable, never empty
    assert human_label("images_per_s") == "images/s"
    assert human_value("timings.wall_seconds", 48.09) == "48.1 s"
    assert human_value("timings.wall_seconds", 125.2) == "2 min 5 s"
    assert human_value("totals.rows", 12) == 12


def test_report_html_shows_human_labels_with_the_raw_key(tmp_path):
    out = make_output(tmp_path / "out", rows=40, rows_per_shard=20, recipe="blip", seed=1)
    record = json.loads((out / "_capfilt" / "run.json").read_text())
    record["totals"] = {"rows": 40, "status": {"success": 38, "too_small": 2}, "parts": 2}
    (out / "_capfilt" / "run.json").write_text(json.dumps(record))
    build_report(out, html=tmp_path / "r.html", json_path=tmp_path / "r.json", samples=4)
    page = htmllib.unescape((tmp_path / "r.html").read_text())
    rows = {m.group(1): (m.group(2), m.group(3))
            for m in re.finditer(r"<tr><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td></tr>", page)}
    assert rows["Wall time (all attempts)"] == ("12.5 s", "timings.wall_seconds")
    assert rows["Rows written"] == ("40", "totals.rows")
    assert rows["Rows with status too_small"] == ("2", "totals.status.too_small")
    assert "<td>timings.wall_seconds</td><td>" not in page  # the raw key is no longer the label
