"""The issue's acceptance: a real ``capfilt run`` of the 79 COCO photos served on 127.0.0.1 exports to
WebDataset (keys, images and captions read back with ``webdataset``) and to HF Parquet (PIL images
from ``datasets``); and an export into ``s3://`` (moto's server) resumes the same way as a local one."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.api import RunOptions, run
from tests.export.helpers import cli, read_tars, source_rows
from tests.helpers.httpserver import photo_server
from tests.helpers.report_fixture import make_output
from tests.helpers.s3server import moto_s3

pytest.importorskip("webdataset")
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PHOTOS = sorted((FIXTURES / "coco" / "images").glob("*.jpg"))


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory) -> Path:
    """A download-recipe run over the 79 COCO photos (one URL per photo), 30 rows per shard."""
    assert len(PHOTOS) == 79
    tmp = tmp_path_factory.mktemp("coco")
    ann = json.loads((FIXTURES / "coco" / "captions_val2017.json").read_text())
    first = {}
    for a in ann["annotations"]:
        first.setdefault(a["image_id"], a["caption"].strip())
    ids = {im["file_name"]: im["id"] for im in ann["images"]}
    with photo_server(PHOTOS) as srv:
        # photo_server picks the photo by the path's md5: find, for each photo, a path that serves it
        import hashlib

        paths: dict[int, str] = {}
        n = 0
        while len(paths) < len(PHOTOS):
            p = f"/img/{n}.jpg"
            paths.setdefault(int(hashlib.md5(p.encode()).hexdigest(), 16) % len(PHOTOS), p)
            n += 1
        rows = [{"url": srv.url(paths[i].lstrip("/")), "caption": first[ids[PHOTOS[i].name]],
                 "coco_id": ids[PHOTOS[i].name]} for i in range(len(PHOTOS))]
        pq.write_table(pa.Table.from_pylist(rows), tmp / "coco.parquet")
        result = run(RunOptions(inputs=[str(tmp / "coco.parquet")], output=str(tmp / "out"), pipeline="download",
                                executor="local", progress=False,
                                overrides=["download.allow_private_network=true", "output.rows_per_shard=30"]))
    assert result.record.status == "complete"
    return tmp / "out"


def test_real_run_exports_to_webdataset_and_hf(coco_run, tmp_path, monkeypatch):
    rows = source_rows(coco_run)
    assert len(rows) == 79 and all(x["status"] == "success" for x in rows)
    r = cli(coco_run, "--to", tmp_path / "wds")
    assert r.exit_code == 0, r.output
    samples = read_tars(tmp_path / "wds")
    assert [s["__key__"] for s in samples] == [x["key"] for x in rows]   # download recipe: every success row
    assert [s["jpg"] for s in samples] == [x["image"] for x in rows]
    assert [s["txt"].decode() for s in samples] == [x["caption"] for x in rows]
    assert [json.loads(s["json"])["coco_id"] for s in samples] == [x["coco_id"] for x in rows]
    assert sorted(p.name for p in (tmp_path / "wds").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]

    datasets = pytest.importorskip("datasets")
    from PIL import Image

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert cli(coco_run, "--to", tmp_path / "hf", "--format", "hf-parquet").exit_code == 0
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "hf" / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == 79 and ds["key"] == [x["key"] for x in rows]
    assert isinstance(ds[78]["image"], Image.Image) and ds[78]["image"].size == (rows[78]["width"], rows[78]["height"])
    assert ds["text"] == [x["caption"] for x in rows]


def test_export_to_s3_resumes(tmp_path):
    out = make_output(tmp_path / "out", rows=60, rows_per_shard=20)
    with moto_s3("exports") as s3:
        dest = "s3://exports/runs/wds"
        r = cli(out, "--to", dest)
        assert r.exit_code == 0, r.output
        listed = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="exports", Prefix="runs/wds/")["Contents"])
        assert [k for k in listed if k.endswith(".tar")] == [f"runs/wds/0000{i}.tar" for i in range(3)]
        assert not [k for k in listed if "/tmp/" in k]
        kept = [x for x in source_rows(out) if x["keep"]]
        keys = []
        for i in range(3):
            body = s3.get_object(Bucket="exports", Key=f"runs/wds/0000{i}.tar")["Body"].read()
            with tarfile.open(fileobj=io.BytesIO(body)) as tf:
                keys += [m.name[: -len(".jpg")] for m in tf.getmembers() if m.name.endswith(".jpg")]
        assert keys == [x["key"] for x in kept]
        s3.delete_object(Bucket="exports", Key="runs/wds/_stats/00001.stats.json")
        r = cli(out, "--to", dest)
        assert r.exit_code == 0 and r.output.count("(already done)") == 2, r.output
        st = json.loads(s3.get_object(Bucket="exports", Key="runs/wds/_stats/00001.stats.json")["Body"].read())
        assert st["rows_in"] == 20 and st["rows_in"] == st["written"] + sum(st["filtered"].values())
