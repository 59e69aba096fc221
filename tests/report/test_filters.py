"""The report's "Curation filters" section, on a real run with blocklist, langid and safety on."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.api import RunOptions, run
from capfilt.report.html import render_html, sections
from capfilt.report.stats import compute_report_data
from tests.helpers.httpserver import photo_server

COCO = sorted((Path(__file__).resolve().parents[1] / "fixtures" / "coco" / "images").glob("*.jpg"))
CAPTIONS = ["a dog on the beach", "un chien sur la plage au coucher du soleil", "two people riding bikes",
            "ein Hund, der am Strand läuft", "a bowl of fruit on a table", "a red bus in the street"]


def test_filters_section_counts_what_the_filters_did(tmp_path):
    with photo_server(COCO[:6]) as srv:
        urls = [srv.url(f"img/{i}.jpg") for i in range(len(CAPTIONS))]
        pq.write_table(pa.table({"url": urls, "caption": CAPTIONS}), tmp_path / "in.parquet")
        plain = run(RunOptions(inputs=[str(tmp_path / "in.parquet")], output=str(tmp_path / "plain"),
                               pipeline="download", executor="local", progress=False,
                               overrides={"download.allow_private_network": True}))
        assert plain.totals["success"] == 6
        sha = pq.read_table(tmp_path / "plain").column("sha256")[0].as_py()
        (tmp_path / "list.txt").write_text(f"sha256:{sha}\n")
        run(RunOptions(inputs=[str(tmp_path / "in.parquet")], output=str(tmp_path / "out"), pipeline="download",
                       executor="local", progress=False,
                       overrides={"download.allow_private_network": True, "blocklist.enabled": True,
                                  "blocklist.lists": [str(tmp_path / "list.txt")], "langid.enabled": True,
                                  "safety.enabled": True}))
    t = pq.read_table(tmp_path / "out")
    status = Counter(t.column("status").to_pylist())
    data = compute_report_data(str(tmp_path / "out")).data
    f = data["filters"]
    removed = {r["status"]: r["rows"] for r in f["removed"]}
    assert removed["blocked_content"] == status["blocked_content"] >= 1  # every copy of the listed photo
    assert removed["nsfw"] == removed["contaminated"] == removed["wrong_language"] == 0
    assert f["web_langs"] == dict(Counter(t.column("web_lang").to_pylist()))
    assert f["web_langs"]["fr"] == f["web_langs"]["de"] == 1 and f["web_captions_unusable"] == 2
    assert sum(f["nsfw_score_hist"]["counts"]) == 6 - status["blocked_content"]
    assert ("filters", "Curation filters") in sections(data)
    html = render_html(data, {}, {})
    assert 'id="filters"' in html and "Web-caption languages" in html and "NSFW detector scores" in html
    # a run with no filter has no such section
    assert compute_report_data(str(tmp_path / "plain")).data["filters"] is None


def test_removed_samples_grid_blurs_nsfw_scored_images(tmp_path):
    """Each photo twice (file URLs): dedup removes the second copies, which the grid shows; the
    safety stage counts faces (threshold 1.0: it flags nothing, so the bytes stay) and every shown
    image with a face score >= BLUR_AT is embedded only blurred, the others as they are."""
    from capfilt.report.filters import BLUR_AT, blur
    from capfilt.report.html import thumbnail

    faces = {"download.allow_file_urls": True, "safety.enabled": True, "safety.classes": ["FACE_FEMALE", "FACE_MALE"],
             "safety.threshold": 1.0}

    def go(name: str, photos: list[Path], overrides: dict) -> None:
        urls = [p.as_uri() for p in photos]
        pq.write_table(pa.table({"url": urls, "caption": ["c"] * len(urls)}), tmp_path / f"{name}.parquet")
        run(RunOptions(inputs=[str(tmp_path / f"{name}.parquet")], output=str(tmp_path / name), pipeline="download",
                       executor="local", progress=False, overrides={**faces, **overrides}))

    go("scan", COCO[:40], {})  # which photos have a face score >= BLUR_AT
    score = {r["url"]: r["nsfw_score"] for r in pq.read_table(tmp_path / "scan").to_pylist()}
    with_face = [p for p in COCO[:40] if score[p.as_uri()] >= BLUR_AT][:3]
    without = [p for p in COCO[:40] if score[p.as_uri()] < BLUR_AT][:3]
    assert len(with_face) == len(without) == 3
    go("out", (with_face + without) * 2, {"dedup.enabled": True})
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    res = compute_report_data(str(tmp_path / "out"))
    shown = res.data["filters"]["removed_samples"]["dedup"]
    assert len(shown) == 6 and all(rows[r["key"]]["status"] == "duplicate" for r in shown)
    assert all(r["error_message"].startswith("same image as row") for r in shown)
    face = [r for r in shown if rows[r["key"]]["nsfw_score"] >= BLUR_AT]
    clear = [r for r in shown if rows[r["key"]]["nsfw_score"] < BLUR_AT]
    assert face and clear  # both kinds among the shown rows
    assert all(r["blurred"] for r in face) and not any(r["blurred"] for r in clear)
    html = render_html(res.data, {}, res.images)
    for r in face:
        original = rows[r["key"]]["image"]
        assert res.images[r["key"]] == blur(original)
        assert thumbnail(original) not in html and thumbnail(blur(original)) in html
    for r in clear:
        assert thumbnail(rows[r["key"]]["image"]) in html
    assert "Removed samples" in html and "blurred · same image as row" in html
