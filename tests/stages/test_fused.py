"""Issue 15 item 6: caption and score fused into one actor give the two stages' output, decoding once."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import capfilt.stages._model_rows as model_rows
from capfilt.api import RunOptions, run
from capfilt.config import load_pipeline, load_preset
from capfilt.schema import SUCCESS
from capfilt.stages.base import RunContext
from capfilt.stages.caption import CaptionStage
from capfilt.stages.fused import CaptionScoreStage
from capfilt.stages.registry import enabled_stages, output_schema
from capfilt.stages.score import ScoreStage
from tests.helpers.httpserver import photo_server

COCO = Path(__file__).resolve().parents[1] / "fixtures" / "coco" / "images"


def _batch() -> pa.Table:
    jpgs = [f.read_bytes() for f in sorted(COCO.glob("*.jpg"))[:4]]
    images = [jpgs[0], jpgs[1], jpgs[1], b"\xff\xd8 truncated", jpgs[2], None]
    return pa.table({"key": [f"0000_{i:09d}" for i in range(6)],
                     "caption": ["a man on a bike", "a pizza", "a pizza", "x", None, "y"],
                     "status": [SUCCESS] * 5 + ["failed_to_download"],
                     "error_message": pa.array([None] * 5 + ["404"], pa.string()),
                     "image": pa.array(images, pa.binary())})


def test_recipe_switch_replaces_caption_and_score_by_one_stage():
    two = enabled_stages(load_pipeline("blip", {"resources.fused": False}))
    one = enabled_stages(load_pipeline("blip", {}))  # fused is the default
    assert CaptionStage in two and ScoreStage in two and CaptionScoreStage not in two
    assert CaptionScoreStage in one and CaptionStage not in one and ScoreStage not in one
    assert one.index(CaptionScoreStage) == two.index(CaptionStage)
    assert CaptionScoreStage.output_fields(["itm"]) == [] and CaptionScoreStage.stats(pa.table({})) == {}
    assert CaptionScoreStage not in enabled_stages(load_pipeline("blip", {"resources.fused": True,
                                                                           "score.enabled": False}))


def test_fused_output_equals_the_two_stages_and_each_image_is_decoded_once(monkeypatch):
    cfg = load_pipeline("blip", {"caption.num_captions": 2, "caption.batch_size": 2, "score.batch_size": 3})
    ctx = RunContext("/tmp/never-written", "rid", load_preset("tiny"), schema=pa.schema([]))
    caption, score = CaptionStage.build(cfg, ctx), ScoreStage.build(cfg, ctx)
    fused = CaptionScoreStage.build(cfg, ctx)
    separate = score(caption(_batch()))
    calls = []
    real = model_rows.decode_image

    def counting(data):
        calls.append(data)
        return real(data)

    monkeypatch.setattr("capfilt.stages.fused.decode_image", counting)
    together = fused(_batch())
    drop = [c for c in together.column_names if c.startswith("_seconds_")]
    assert together.drop_columns(drop).equals(separate.drop_columns(drop))
    assert {"_seconds_caption", "_seconds_score"} <= set(drop)
    assert together.column("status").to_pylist()[3] == "failed_to_caption"
    # rows 0, 1, 2 (same bytes as 1), 3 (corrupt, fails in caption, not scored) and 4: 4 distinct images,
    # each decoded once for both models (without the memo: 5 for the captioner + 3 for the scorer)
    assert len(calls) == len(set(calls)) == 4
    assert not hasattr(fused.caption, "decode") or fused.caption.decode is CaptionStage.decode


def test_a_fused_run_through_ray_writes_the_same_columns(tmp_path):
    photos = sorted(COCO.glob("*.jpg"))[:6]
    with photo_server(photos) as srv:
        pq.write_table(pa.table({"url": [srv.url(f"photo{i}.jpg") for i in range(6)],
                                 "caption": [f"web caption {i}" for i in range(6)]}), tmp_path / "in.parquet")
        res = run(RunOptions(inputs=[str(tmp_path / "in.parquet")], output=str(tmp_path / "out"), models="tiny",
                             progress=False, overrides=["download.allow_private_network=true", "resources.fused=true",
                                                        "download.image_size=64"]))
    assert res.record.status == "complete" and res.totals["images_captioned"] == 6
    assert set(res.totals["throughput"]) >= {"caption", "score"}
    t = pq.read_table(next((tmp_path / "out").glob("*.parquet")))
    assert t.schema.names == output_schema([], ["itm", "itc"]).names
    assert all(0 <= v <= 1 for v in t.column("web_itm").to_pylist())
    assert all(len(c) == 1 for c in t.column("synthetic_captions").to_pylist())


def test_out_of_memory_halves_the_micro_batch_and_the_stage_keeps_the_size_that_fits():
    """Issue 15 item 7 (GPU-ready batch sizes), with the OOM torch raises on a GPU made here by hand:
    no CUDA on this machine. Batches above 2 rows 'do not fit'."""
    import torch

    from capfilt.modeling.batching import FitLimit
    from capfilt.stages._model_rows import run_rows

    sizes = []

    def fn(part):
        sizes.append(len(part))
        if len(part) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [r * 10 for r in part]

    limit = FitLimit()
    results, errors = run_rows(list(range(10)), 8, fn, "caption", limit)
    assert results == {r: r * 10 for r in range(10)} and errors == {}
    assert sizes == [8, 4, 2, 2, 2, 2, 2] and limit.size == 2
    sizes.clear()
    run_rows(list(range(5)), 8, fn, "caption", limit)  # the next block starts at the size that fitted
    assert sizes == [2, 2, 1]
    with pytest.raises(torch.OutOfMemoryError):  # one row that does not fit is an infrastructure fault
        run_rows([0], 1, lambda part: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory")), "score")
