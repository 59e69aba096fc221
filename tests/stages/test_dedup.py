"""Exact and near-duplicate marking (sha256 and faiss on perceptual embeddings) on real photos."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from PIL import Image

from capfilt.api import RunOptions, run
from capfilt.config import DedupConfig
from capfilt.stages.dedup import DedupStage, perceptual_embedding
from tests.helpers.httpserver import ImageServer

COCO = Path(__file__).resolve().parents[1] / "fixtures" / "coco" / "images"


def _jpeg(path: Path, size: int | None = None, quality: int = 90) -> bytes:
    im = Image.open(path).convert("RGB")
    if size:
        im = im.resize((size, size * im.height // im.width))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _batch(images: list[bytes], status: list[str] | None = None) -> pa.Table:
    n = len(images)
    return pa.table({"key": [f"0000_{i:09d}" for i in range(n)], "status": status or ["success"] * n,
                     "error_message": pa.nulls(n, pa.string()), "image": pa.array(images, pa.binary()),
                     "sha256": [hashlib.sha256(b).hexdigest() for b in images]})


def test_exact_and_near_duplicates():
    photos = sorted(COCO.glob("*.jpg"))[:3]
    a = _jpeg(photos[0])
    a_small = _jpeg(photos[0], size=200, quality=60)  # same picture, resized and re-encoded
    b, c = _jpeg(photos[1]), _jpeg(photos[2])
    assert float(perceptual_embedding(a) @ perceptual_embedding(a_small)) > 0.97
    assert float(perceptual_embedding(a) @ perceptual_embedding(b)) < 0.9
    stage = DedupStage(DedupConfig(enabled=True, near=True))
    out = stage(_batch([a, b, a, a_small, c, b], ["success"] * 5 + ["failed_to_download"]))
    assert out.column("status").to_pylist() == ["success", "success", "duplicate", "duplicate", "success",
                                                "failed_to_download"]
    msgs = out.column("error_message").to_pylist()
    assert msgs[2] == "same image as row 0000_000000000 (sha256)"
    assert msgs[3].startswith("near-duplicate of row 0000_000000000 (cosine ")
    assert 0.95 <= float(msgs[3].rsplit(" ", 1)[1].rstrip(")")) <= 1.0
    # state carries across batches of the run
    out2 = stage(_batch([c]).set_column(0, "key", pa.array(["0001_000000000"])))
    assert out2.column("status").to_pylist() == ["duplicate"]
    exact_only = DedupStage(DedupConfig(enabled=True))(_batch([a, a_small, a]))
    assert exact_only.column("status").to_pylist() == ["success", "success", "duplicate"]


def test_pipeline_with_dedup_skips_models_for_copies(tmp_path):
    photos = sorted(COCO.glob("*.jpg"))[:4]
    with ImageServer(root=COCO) as srv:
        urls = [srv.url(p.name) for p in photos] + [srv.url(photos[0].name), srv.url(photos[2].name)]
        pq.write_table(pa.table({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]}), tmp_path / "in.parquet")
        res = run(RunOptions(inputs=[str(tmp_path / "in.parquet")], output=str(tmp_path / "out"), models="tiny",
                             overrides=["download.allow_private_network=true", "dedup.enabled=true",
                                        "download.image_size=64"], executor="local", progress=False))
    t = ds.dataset(str(tmp_path / "out" / "00000.parquet")).to_table().to_pylist()
    assert [r["status"] for r in t] == ["success"] * 4 + ["duplicate"] * 2
    assert t[4]["error_message"] == "same image as row 0000_000000000 (sha256)"
    assert t[4]["synthetic_captions"] is None and t[4]["keep"] is False
    assert res.totals["status"] == {"duplicate": 2, "success": 4}


def _photos(n: int = 3) -> list[bytes]:
    return [_jpeg(p) for p in sorted(COCO.glob("*.jpg"))[:n]]


def test_a_reexecuted_block_is_not_a_duplicate_of_itself():
    """Ray re-runs a block after a worker loss: the same rows must get the same answer."""
    a, b, c = _photos()
    for cfg in (DedupConfig(enabled=True), DedupConfig(enabled=True, near=True)):
        stage = DedupStage(cfg)
        batch = _batch([a, b, a, c])
        first = stage(batch)
        again = stage(batch)
        assert first.column("status").to_pylist() == ["success", "success", "duplicate", "success"]
        assert again.column("status").to_pylist() == first.column("status").to_pylist(), cfg
        assert again.column("error_message").to_pylist() == first.column("error_message").to_pylist()


def test_dedup_state_survives_a_restarted_actor(tmp_path):
    """A new stage instance (a restarted actor) over the same output remembers the rows claimed so far."""
    a, b, c = _photos()
    a_small = _jpeg(sorted(COCO.glob("*.jpg"))[0], size=200, quality=60)
    out = tmp_path / "out"
    cfg = DedupConfig(enabled=True, near=True)
    DedupStage(cfg, str(out))(_batch([a, b]))
    assert len(list((out / "_capfilt" / "dedup").glob("*.parquet"))) == 1
    restarted = DedupStage(cfg, str(out))
    later = _batch([c, a, a_small]).set_column(0, "key", pa.array(["0001_0", "0001_1", "0001_2"]))
    res = restarted(later)
    assert res.column("status").to_pylist() == ["success", "duplicate", "duplicate"]
    msgs = res.column("error_message").to_pylist()
    assert msgs[1] == "same image as row 0000_000000000 (sha256)"
    assert msgs[2].startswith("near-duplicate of row 0000_000000000")
    # and the first block, re-executed by the restarted actor, keeps its rows
    assert restarted(_batch([a, b])).column("status").to_pylist() == ["success", "success"]
    # without the log (a fresh output) the copies would have been kept: the log is what remembers
    fresh = DedupStage(cfg, str(tmp_path / "other"))
    assert fresh(later).column("status").to_pylist() == ["success", "success", "duplicate"]
