"""The report on real pipeline outputs: ``capfilt demo`` and the COCO photos run (BLIP and BLIP-2 recipes).

The outputs come from the real pipeline (real HTTP server on 127.0.0.1, real download/resize,
the offline ``tiny`` models: captions and scores are noise, the report must say so); every number
of the report JSON is recomputed from the shards by :mod:`tests.helpers.report_expect`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from capfilt.report import build_report
from capfilt.report.html import SECTIONS
from tests.helpers.httpserver import ImageServer
from tests.helpers.report_expect import check_report

COCO = Path(__file__).resolve().parents[1] / "fixtures" / "coco"


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    from capfilt.demo import run_demo

    out = tmp_path_factory.mktemp("demo") / "out"
    run_demo(out, models="tiny", pipeline="blip", console=Console(file=open("/dev/null", "w")), progress=False,
             world="photos")
    return out


def _coco_run(tmp: Path, pipeline: str) -> Path:
    from capfilt.api import RunOptions, run

    ann = json.loads((COCO / "captions_val2017.json").read_text())
    first: dict[int, str] = {}
    for a in ann["annotations"]:
        first.setdefault(a["image_id"], a["caption"])
    with ImageServer(root=COCO / "images") as srv:
        rows = [{"url": srv.url(im["file_name"]), "caption": first[im["id"]]} for im in ann["images"][:24]]
        rows.append({"url": srv.url("status/404"), "caption": "a photo that is gone"})
        rows.append({"url": "ftp://example.com/x.jpg", "caption": "not http"})
        pq.write_table(pa.Table.from_pylist(rows), tmp / "coco.parquet")
        run(RunOptions(inputs=[str(tmp / "coco.parquet")], output=str(tmp / "out"), pipeline=pipeline, models="tiny",
                       overrides=["download.allow_private_network=true", "output.rows_per_shard=10",
                                  "download.image_size=96"] + (["caption.num_captions=4"] if pipeline == "blip2" else []),
                       executor="local", progress=False))
    return tmp / "out"


@pytest.mark.slow
def test_report_on_demo_output(demo_out, tmp_path):
    data = build_report(demo_out, html=tmp_path / "r.html", json_path=tmp_path / "r.json", samples=24)
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert check_report(demo_out, on_disk, samples=24) > 200
    html = (tmp_path / "r.html").read_text()
    for _sid, title in SECTIONS:
        assert f"<h2>{title}</h2>" in html
    # the demo serves 6 photos, one missing file and one text file
    assert on_disk["overview"]["rows"] == 8 and on_disk["overview"]["downloaded"] == 6
    assert len(on_disk["samples"]) == 6 and data["run"]["status"] == "complete"
    assert on_disk["run"]["tiny_models"] and on_disk["run"]["preset"] == "tiny"
    assert "Untrained models." in html and "captions and all scores are noise" in html
    assert on_disk["warnings"] == []


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["blip", "blip2"])
def test_report_on_coco_output(tmp_path, pipeline):
    out = _coco_run(tmp_path, pipeline)
    data = build_report(out, samples=12)
    on_disk = json.loads((out / "_capfilt" / "report.json").read_text())
    assert check_report(out, on_disk, samples=12) > 250
    assert data["overview"]["rows"] == 26 and data["shards"]["read"] == 3
    assert data["overview"]["status_counts"]["success"] == 24
    assert {e["status"] for e in data["download"]["top_errors"]} == {"failed_to_download", "invalid_url"}
    sizes = data["download"]["sizes"]
    assert sizes["original_width"]["max"] == 320  # the fixture photos' longest side, before resize
    assert min(sizes["width"]["min"], sizes["height"]["min"]) == 96  # keep_ratio: shorter side -> 96
    if pipeline == "blip2":
        f = data["filter"]
        assert f["primary_scorer"] == "clip" and f["top_k"] == 2 and set(f["scores"]) == {"itm", "itc", "clip"}
        assert f["removed"]["synthetic"]["scored"] == 96  # 24 images x 4 captions
        # top-2 of 5 candidates per image: exactly 2 texts kept per downloaded image
        assert data["overview"]["texts_kept"] == 48 and f["web_in_top_k_share"] is not None
    else:
        assert data["filter"]["thresholds"]["itm"] == 0.5
    html = (out / "_capfilt" / "report.html").read_text()
    assert html.count('class="plot"') == 3 + len(data["filter"]["scores"])  # status, sizes, lengths + scores
