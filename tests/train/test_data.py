"""The trainers' streaming data: capfilt shards and COCO captions, sharding, shuffling, resume."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from capfilt.errors import InputError
from capfilt.train.coco import CocoCaptions
from capfilt.train.data import CapfiltShards, ImageTransform, StreamingDataset, clean_caption, collate_common
from tests.helpers.train import COCO, make_shards, one_torch_thread  # noqa: F401 (autouse fixture)


class _Processor:
    """BLIP's image processor as the tiny checkpoints use it (64 px, CLIP mean/std)."""

    def __new__(cls):
        from transformers import BlipImageProcessor

        return BlipImageProcessor(size={"height": 64, "width": 64})


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("shards")
    return out, make_shards(out, files=3, rows_per_group=8)


def _keys_from_loader(ds: StreamingDataset, workers: int) -> list[str]:
    dl = DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate_common)
    return [k for b in dl for k in b["keys"]]


def test_two_workers_two_ranks_each_kept_row_once_per_epoch(shards):
    out, kept = shards
    src = CapfiltShards(str(out))
    transform = ImageTransform(_Processor())
    per_epoch: dict[int, Counter] = {0: Counter(), 1: Counter()}
    positions: dict[int, list[int]] = {}
    for rank in range(2):
        ds = StreamingDataset(src, transform, seed=3, shuffle_buffer=16, rank=rank, world_size=2, epochs=2)
        dl = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_common)
        for b in dl:
            for k, e, c, p in zip(b["keys"], b["epoch"].tolist(), b["consumer"].tolist(), b["position"].tolist()):
                per_epoch[e][k] += 1
                positions.setdefault(c, []).append(p)
    assert len(kept) == 57
    for e in (0, 1):
        assert sorted(per_epoch[e]) == sorted(kept)  # every kept row ...
        assert set(per_epoch[e].values()) == {1}     # ... exactly once per epoch
    assert sorted(positions) == [0, 1, 2, 3]          # 2 ranks x 2 workers = 4 consumers
    for c, ps in positions.items():
        assert sorted(ps) == list(range(len(ps)))     # positions count each consumer's stream
    # block split: 57 rows over 4 consumers -> 14 or 15 per epoch
    assert sorted(len(ps) // 2 for ps in positions.values()) == [14, 14, 14, 15]


def test_more_consumers_than_row_groups_still_exactly_once(tmp_path):
    kept = make_shards(tmp_path, files=1, rows_per_group=1000)  # one row group in all
    src = CapfiltShards(str(tmp_path))
    assert src.num_units() == 1
    seen = Counter()
    for rank in range(3):
        ds = StreamingDataset(src, ImageTransform(_Processor()), seed=0, shuffle_buffer=8, rank=rank,
                              world_size=3, epochs=1)
        seen.update(_keys_from_loader(ds, workers=2))
    assert sorted(seen) == sorted(kept) and set(seen.values()) == {1}


def test_epochs_differ_in_order_and_texts_come_from_kept_captions(shards):
    out, kept = shards
    src = CapfiltShards(str(out))
    ds = StreamingDataset(src, ImageTransform(_Processor()), seed=0, shuffle_buffer=16, epochs=2, text_top_k=2)
    samples = list(ds.iter_consumer(0, 1))
    assert len(samples) == 2 * len(kept)
    e0 = [s["key"] for s in samples if s["epoch"] == 0]
    e1 = [s["key"] for s in samples if s["epoch"] == 1]
    assert sorted(e0) == sorted(e1) == sorted(kept) and e0 != e1
    rows = {r["key"]: r for f in sorted(out.glob("*.parquet")) for r in pq.read_table(f).to_pylist()}
    for s in samples:
        top2 = [clean_caption(c) for c in rows[s["key"]]["captions"][:2]]
        assert s["text"] in top2
        assert s["pixel_values"].shape == (3, 64, 64) and s["pixel_values"].dtype == torch.float32
    # both of the top-2 captions get sampled over the two epochs for some rows
    texts = Counter((s["key"], s["text"]) for s in samples)
    assert len({k for k, _ in texts}) < len(texts)


def test_resume_position_continues_the_same_stream(shards):
    out, _ = shards
    src = CapfiltShards(str(out))
    transform = ImageTransform(_Processor())
    full = StreamingDataset(src, transform, seed=5, shuffle_buffer=16, epochs=3)
    ref = [(s["key"], s["text"], s["position"]) for s in full.iter_consumer(1, 2)]
    for start in (0, 7, 28, 29, 40):  # inside epoch 0, at the epoch boundary (28 rows/epoch), inside epoch 1
        ds = StreamingDataset(src, transform, seed=5, shuffle_buffer=16, epochs=3, start_positions={1: start})
        got = [(s["key"], s["text"], s["position"]) for s in ds.iter_consumer(1, 2)]
        assert got == ref[start:]


def test_unreadable_image_is_skipped_not_fatal(tmp_path):
    kept = make_shards(tmp_path, files=1, rows_per_group=8)
    f = tmp_path / "00000.parquet"
    t = pq.read_table(f)
    images = t.column("image").to_pylist()
    bad = t.column("key").to_pylist().index(kept[0])
    images[bad] = b"\xff\xd8\xff\xe0 truncated jpeg"
    t = t.set_column(t.column_names.index("image"), "image", pa.array(images, pa.binary()))
    pq.write_table(t, f, row_group_size=8)
    ds = StreamingDataset(CapfiltShards(str(tmp_path)), ImageTransform(_Processor()), epochs=1)
    keys = [s["key"] for s in ds.iter_consumer(0, 1)]
    assert sorted(keys) == sorted(kept[1:])
    assert ds.stats["skipped"] == 1


def test_shards_errors_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="no committed capfilt shards"):
        CapfiltShards(str(tmp_path))
    with pytest.raises(InputError, match="does not exist"):
        CapfiltShards(str(tmp_path / "missing"))
    pq.write_table(pa.table({"key": ["a"], "url": ["u"]}), tmp_path / "plain.parquet")
    with pytest.raises(InputError, match=r"missing column\(s\) \['image', 'captions', 'keep'\]"):
        CapfiltShards(str(tmp_path / "plain.parquet"))


def test_no_kept_rows_is_an_error(tmp_path):
    make_shards(tmp_path, files=1, drop_every=1)  # the filter dropped everything
    with pytest.raises(InputError, match="no usable training rows"):
        StreamingDataset(CapfiltShards(str(tmp_path)), ImageTransform(_Processor()))


def test_coco_rows_groups_and_missing_images(tmp_path):
    data = json.loads((COCO / "captions_val2017.json").read_text())
    src = CocoCaptions(str(COCO / "captions_val2017.json"), rows_per_unit=50)
    assert src.missing == 0 and src.num_units() == 8  # 395 annotations
    seen = Counter()
    for rank in range(3):
        ds = StreamingDataset(src, ImageTransform(_Processor()), rank=rank, world_size=3, epochs=1,
                              shuffle_buffer=32)
        for s in ds.iter_consumer(rank, 3):
            image_id, ann_id = map(int, s["key"].split("/"))
            assert s["group"] == image_id
            seen[ann_id] += 1
    assert sorted(seen) == sorted(a["id"] for a in data["annotations"]) and set(seen.values()) == {1}
    # a copy of the annotations with one image file missing: its 5 captions are left out
    (tmp_path / "images").mkdir()
    for im in data["images"][1:]:
        (tmp_path / "images" / im["file_name"]).symlink_to(COCO / "images" / im["file_name"])
    (tmp_path / "captions.json").write_text(json.dumps(data))
    src2 = CocoCaptions(str(tmp_path / "captions.json"))
    assert src2.missing == 5 and src2.images_uri == str(tmp_path / "images")
    with pytest.raises(InputError, match="image folder"):
        CocoCaptions(str(tmp_path / "captions.json"), images=str(tmp_path / "nope"))


def test_clean_caption_is_blips_pre_caption():
    assert clean_caption("A man riding a wave on top of a surfboard.") == "a man riding a wave on top of a surfboard"
    assert clean_caption('Two dogs (brown & white) play-fight: "fun"!!') == "two dogs brown & white play fight fun"
    assert clean_caption("one two three four", max_words=2) == "one two"


def test_jpeg_draft_decode_matches_full_decode_closely():
    from PIL import Image

    data = (COCO / "images" / "000000000139.jpg").read_bytes()
    proc = _Processor()
    fast = ImageTransform(proc)(data)
    full = proc(images=Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="pt")["pixel_values"][0]
    assert fast.shape == full.shape == (3, 64, 64)
    assert float((fast - full).abs().mean()) < 0.05  # normalised units (std ~1)


def test_shards_on_s3(shards, monkeypatch):
    """The same shards read from object storage (a real moto S3 server on 127.0.0.1)."""
    moto_server = pytest.importorskip("moto.server")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
                     "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(k, v)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="bucket")
        out, kept = shards
        for p in out.rglob("*"):
            if p.is_file():
                s3.upload_file(str(p), "bucket", f"run/{p.relative_to(out)}")
        src = CapfiltShards("s3://bucket/run")
        ds = StreamingDataset(src, ImageTransform(_Processor()), epochs=1, world_size=2, rank=1)
        keys = _keys_from_loader(ds, workers=2)
        ds0 = StreamingDataset(src, ImageTransform(_Processor()), epochs=1, world_size=2, rank=0)
        keys += _keys_from_loader(ds0, workers=0)
        assert sorted(keys) == sorted(kept)
    finally:
        server.stop()
