"""Open the HTML report in real headless Chromium (Debian's ``chromium``) through Selenium.

Checks: no console errors, every section heading shown, every figure and thumbnail decoded
(``naturalWidth > 0``), no request left the page (the CSP blocks them and would log an error).
A full-page screenshot is saved under the test's tmp dir. CI installs chromium with
``.ci/install_chromium.sh``; the test is skipped only where ``/usr/bin/chromium`` is absent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from capfilt.report import build_report
from capfilt.report.html import LABELS_SECTION, sections
from tests.helpers.report_fixture import make_output

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path(shutil.which("chromedriver") or "/usr/bin/chromedriver")

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian chromium not installed at /usr/bin/chromium "
                                "(CI installs it with .ci/install_chromium.sh)")


@pytest.fixture()
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install 'capfilt[test]')")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
              f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,900"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    env_before = os.environ.get("SE_OFFLINE")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a driver
    driver = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()
        if env_before is None:
            os.environ.pop("SE_OFFLINE", None)


@pytest.mark.parametrize("recipe", ["blip", "blip2", "download"])
def test_report_renders_in_chromium(tmp_path, browser, recipe):
    out = make_output(tmp_path / "out", rows=90, rows_per_shard=30, recipe=recipe, incomplete_shards=1, seed=2)
    html = tmp_path / "report.html"
    data = build_report(out, html=html, json_path=tmp_path / "report.json", samples=12)
    browser.get(html.as_uri())

    headings = [h.text for h in browser.find_elements("css selector", "section > h2")]
    assert headings == [title for _sid, title in sections(data)]
    for sid, _title in sections(data):
        assert browser.find_element("id", sid).is_displayed()
    fail = data["failures"]
    assert fail["failed"] > 0 and headings.index("Failures by class") == headings.index("Download health") + 1
    section = browser.find_element("id", "failures")
    assert len(section.find_elements("css selector", "#failures-by-class tbody tr")) == len(fail["by_class"])
    tables = section.find_elements("css selector", "table.failure-examples")
    assert [t.get_attribute("data-class") for t in tables] == list(fail["examples"])
    last = fail["by_class"][-1]["class"]  # click through to its examples
    section.find_element("css selector", f'a[href="#failures-{last}"]').click()
    assert browser.execute_script("return location.hash") == f"#failures-{last}"
    assert browser.find_element("id", f"failures-{last}").is_displayed()

    plots = browser.execute_script(
        "return Array.from(document.querySelectorAll('img.plot')).map(i => [i.dataset.plot, i.complete, i.naturalWidth, i.naturalHeight])")
    expected = {"status", "sizes", "lengths"} | ({f"score_{s}" for s in data["filter"]["scores"]} if data["filter"] else set())
    assert {p[0] for p in plots} == expected
    assert all(p[1] and p[2] > 100 and p[3] > 100 for p in plots), plots
    thumbs = browser.execute_script(
        "return Array.from(document.querySelectorAll('img.thumb')).map(i => [i.complete, i.naturalWidth])")
    assert len(thumbs) >= len(data["samples"]) == 12 and all(c and w > 0 for c, w in thumbs)

    body = browser.find_element("tag name", "body").text
    assert "Untrained models." in body  # the fixture records the tiny preset
    assert "Partial output: 2 of 3 shard(s) read, 1 incomplete shard(s) skipped." in body

    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(int(height), 20000))
    shot = tmp_path / f"report-{recipe}.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 50_000

    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == []


def test_labels_section_renders_in_chromium(tmp_path, browser):
    """``--label-col``: the "Filter vs labels" section is shown after "Filter", its confusion matrix has
    one row per label value, and the precision/recall figure decodes."""
    out = make_output(tmp_path / "out", rows=120, rows_per_shard=40, seed=3, noise_col="noise_type")
    html = tmp_path / "report.html"
    data = build_report(out, html=html, json_path=tmp_path / "report.json", samples=4, label_col="noise_type")
    browser.get(html.as_uri())

    headings = [h.text for h in browser.find_elements("css selector", "section > h2")]
    assert headings == [title for _sid, title in sections(data)]
    assert headings.index(LABELS_SECTION[1]) == headings.index("Filter") + 1
    section = browser.find_element("id", LABELS_SECTION[0])
    assert section.is_displayed()
    rows = section.find_elements("css selector", "table.confusion tbody tr")
    assert len(rows) == len(data["labels"]["classes"]) == 5 and all(r.is_displayed() for r in rows)
    assert rows[0].find_elements("tag name", "td")[0].text == "clean (matches)"
    assert [r.find_elements("tag name", "td")[3].text for r in rows] == [f"{c['kept']:,}" for c in data["labels"]["classes"]]
    assert "Suggested threshold: itm ≥" in section.text
    fig = browser.execute_script(
        "const i = document.querySelector('#labels img.plot[data-plot=labels_pr]');"
        " return i && [i.complete, i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width]")
    assert fig and fig[0] and fig[1] > 100 and fig[2] > 100 and fig[3] > 100, fig
    assert browser.find_element("css selector", 'nav a[href="#labels"]').text == LABELS_SECTION[1]
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == []


def test_sample_table_sorts_and_filters_in_chromium(tmp_path, browser):
    """Issue 14: the sampled rows as a table a curator can sort (click a header; again to reverse)
    and filter (type), with the page's only script allowed by its CSP hash (no console error)."""
    out = make_output(tmp_path / "out", rows=90, rows_per_shard=30, seed=5)
    html = tmp_path / "report.html"
    data = build_report(out, html=html, json_path=tmp_path / "report.json", samples=16)
    browser.get(html.as_uri())
    table = browser.find_element("id", "sample-table")
    rows = lambda: [r for r in table.find_elements("css selector", "tbody tr") if r.is_displayed()]  # noqa: E731
    assert len(rows()) == len(data["samples"]) == 16

    def column(i):
        return [r.find_elements("tag name", "td")[i].get_attribute("data-v") for r in rows()]

    header = table.find_elements("css selector", "thead th")[3]  # web score
    browser.execute_script("arguments[0].scrollIntoView()", header)
    header.click()
    asc = [float(v) for v in column(3) if v is not None]
    assert len(asc) >= 10 and asc == sorted(asc)
    header.click()
    desc = [float(v) for v in column(3) if v is not None]
    assert desc == sorted(asc, reverse=True)
    key = data["samples"][3]["key"]
    box = browser.find_element("id", "sample-filter")
    box.send_keys(key)
    shown = rows()
    assert len(shown) == 1 and shown[0].find_elements("tag name", "td")[0].text == key
    box.clear()
    box.send_keys("x")  # clear() fires no input event; a new keystroke re-filters
    box.send_keys("\b")
    assert len(rows()) == 16
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert errors == []
