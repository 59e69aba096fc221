"""run.json records what the models resolved to on this machine (issue 10 items 12 and 17)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.api import RunOptions, run
from tests.helpers.httpserver import photo_server

PHOTOS = sorted((Path(__file__).resolve().parents[1] / "fixtures" / "coco" / "images").glob("*.jpg"))[:2]


def test_run_json_records_model_sources_and_the_itm_prefix(tmp_path):
    with photo_server(PHOTOS) as srv:
        pq.write_table(pa.table({"url": [srv.url("a.jpg"), srv.url("b.jpg")], "caption": ["a", "b"]}),
                       tmp_path / "in.parquet")
        run(RunOptions(inputs=[str(tmp_path / "in.parquet")], output=str(tmp_path / "out"), models="shapes",
                       executor="local", progress=False,
                       overrides={"download.allow_private_network": True, "caption.num_captions": 1}))
    rec = json.loads((tmp_path / "out" / "_capfilt" / "run.json").read_text())
    models = rec["resolved"]["models"]
    assert set(models) == {"captioner", "filter"}
    assert models["filter"]["source"] == "local" and models["filter"]["path"].endswith("models/shapes/filter")
    # the shipped shapes filter was trained with [CLS] in its ITM input and records it; the run follows it
    assert rec["resolved"]["itm_text_prefix"]["prefix"] == "cls"
    assert rec["resolved"]["itm_text_prefix"]["setting"] == "auto"
