"""End-to-end: real LAION rows and real COCO photos through the whole pipeline on real Ray.

Images come from a real HTTP server on 127.0.0.1 started by the test; models are the offline
``tiny`` preset (random weights: captions are noise, only the mechanics are checked).
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt.api import RunOptions, run
from tests.helpers.httpserver import ImageServer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
COCO = FIXTURES / "coco"


def _read_out(out: Path) -> pa.Table:
    files = sorted(str(p) for p in out.glob("*.parquet"))
    return ds.dataset(files, format="parquet").to_table()


def _bucket(path: str) -> str:
    """Which behaviour the fake web host gives a path: stable, from the path's hash."""
    h = int(hashlib.sha256(path.encode()).hexdigest(), 16) % 20
    return "image" if h < 12 else "404" if h < 15 else "junk" if h < 18 else "slow"


def _laion_server() -> ImageServer:
    photos = sorted((FIXTURES / "coco" / "images").glob("*.jpg"))

    def fallback(req, path):
        kind = _bucket(unquote(req.path))
        if kind == "image":
            body = photos[int(hashlib.md5(req.path.encode()).hexdigest(), 16) % len(photos)].read_bytes()
            ctype = "image/jpeg"
        elif kind == "404":
            req.send_response(404)
            req.send_header("Content-Length", "0")
            req.end_headers()
            return
        elif kind == "junk":
            body, ctype = b"<html><body>this is not an image</body></html>", "image/jpeg"
        else:
            time.sleep(8.0)
            body, ctype = photos[0].read_bytes(), "image/jpeg"
        req.send_response(200)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    return ImageServer(fallback=fallback)


def _rewrite_hosts(src: Path, dst: Path, base: str) -> pa.Table:
    """Point every URL at ``base`` keeping path and query exactly (messy real URLs stay messy)."""
    t = pq.read_table(src)
    urls = []
    for u in t.column("URL").to_pylist():
        rest = u.split("://", 1)[1] if "://" in u else u
        path = rest[rest.find("/"):] if "/" in rest else "/"
        urls.append(base + path)
    t = t.set_column(t.column_names.index("URL"), "URL", pa.array(urls))
    pq.write_table(t, dst)
    return t


@pytest.fixture(scope="module")
def laion_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("laion")
    with _laion_server() as srv:
        src = _rewrite_hosts(FIXTURES / "meta/test_1000.parquet", tmp / "laion.parquet", srv.base)
        t0 = time.time()
        result = run(RunOptions(inputs=[str(tmp / "laion.parquet")], output=str(tmp / "out"), models="tiny",
                                executor="ray",  # 1,000 rows: auto would run them in-process
                                overrides=["download.allow_private_network=true", "download.timeout=3",
                                           "output.rows_per_shard=250", "download.thread_count=32"],
                                progress=False))
        elapsed = time.time() - t0
    return src, tmp / "out", result, elapsed


def test_laion_1000_every_row_once_with_status(laion_run):
    src, out, result, elapsed = laion_run
    t = _read_out(out)
    assert t.num_rows == 1000 == result.totals["rows"]
    keys = t.column("key").to_pylist()
    assert len(set(keys)) == 1000
    by_key = {r["key"]: r for r in t.select(["key", "url", "caption", "status", "error_message"]).to_pylist()}
    src_rows = src.to_pylist()
    for i, s in enumerate(src_rows):
        row = by_key[f"0000_{i:09d}"]
        assert row["caption"] == s["TEXT"]
        kind = _bucket(unquote("/" + row["url"].split("/", 3)[3]))
        if kind == "image":
            assert row["status"] == "success", (row["url"], row["error_message"])
            assert row["error_message"] is None
        else:
            assert row["status"] != "success" and row["error_message"], row
            if kind == "404":
                assert row["status"] == "failed_to_download" and "404" in row["error_message"]
            if kind == "slow":
                assert row["status"] == "failed_to_download" and "time" in row["error_message"].lower()
    assert elapsed < 300  # bounded: slow answers are cut at the 3 s timeout


def test_output_contract_and_readback(laion_run):
    _src, out, _result, _ = laion_run
    shards = sorted(out.glob("*.parquet"))
    assert len(shards) == 4 and all((out / "_stats" / (p.stem + ".stats.json")).exists() for p in shards)
    schemas = {str(pq.read_schema(p).remove_metadata()) for p in shards}
    assert len(schemas) == 1
    meta = pq.read_schema(shards[0]).metadata
    assert meta[b"capfilt.schema_version"] == b"1" and meta[b"capfilt.run_id"]
    import duckdb
    import pandas as pd

    n_fp = sum(len(pd.read_parquet(p, engine="fastparquet")) for p in shards)
    n_pd = len(pd.read_parquet(out, engine="pyarrow"))
    n_duck = duckdb.sql(f"select count(*) from read_parquet('{out}/*.parquet')").fetchall()[0][0]
    assert n_fp == n_pd == n_duck == 1000
    fp = pd.read_parquet(shards[0], engine="fastparquet")
    ok = fp[fp.status == "success"]
    assert len(ok) and all(len(x) >= 1 for x in ok.synthetic_captions)  # lists survive fastparquet
    from datasets import Dataset

    d = Dataset.from_parquet([str(p) for p in shards])
    assert d.num_rows == 1000
    record = json.loads((out / "_capfilt" / "run.json").read_text())
    assert record["status"] == "complete" and record["totals"]["rows"] == 1000
    assert record["models"]["name"] == "tiny" and record["versions"]["transformers"]
    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "check_output.py"), str(out),
                        "--input-rows", "1000"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("coco")
    ann = json.loads((COCO / "captions_val2017.json").read_text())
    first = {}
    for a in ann["annotations"]:
        first.setdefault(a["image_id"], a["caption"])
    with ImageServer(root=COCO / "images") as srv:
        rows = [{"url": srv.url(im["file_name"]), "caption": first[im["id"]], "coco_id": im["id"]}
                for im in ann["images"]]
        pq.write_table(pa.Table.from_pylist(rows), tmp / "coco.parquet")
        result = run(RunOptions(inputs=[str(tmp / "coco.parquet")], output=str(tmp / "out"), models="tiny",
                                overrides=["download.allow_private_network=true", "output.rows_per_shard=40",
                                           "download.image_size=64"], progress=False))
    return rows, tmp / "out", result


def test_coco_real_photos(coco_run):
    rows, out, result = coco_run
    t = _read_out(out).to_pylist()
    assert len(t) == 79 and len({r["key"] for r in t}) == 79
    assert {r["coco_id"] for r in t} == {r["coco_id"] for r in rows}  # pass-through column kept
    for r in t:
        assert r["status"] == "success", r["error_message"]
        im = Image.open(io.BytesIO(r["image"]))
        assert im.format == "JPEG" and min(im.size) == 64 and im.size == (r["width"], r["height"])
        assert hashlib.sha256(r["image"]).hexdigest() == r["sha256"]
        assert len(r["synthetic_captions"]) == 1 and r["synthetic_captions"][0].strip()
        assert not r["synthetic_captions"][0].startswith("a picture of")
        scores = [r["web_itm"]] + r["synthetic_itm"]
        assert all(0.0 <= s <= 1.0 for s in scores)
        assert all(-1.0001 <= s <= 1.0001 for s in [r["web_itc"]] + r["synthetic_itc"])
        expect = [(c, s) for c, s in [(r["caption"], r["web_itm"])] + list(zip(r["synthetic_captions"],
                                                                                r["synthetic_itm"])) if s >= 0.5]
        expect.sort(key=lambda cs: -cs[1])
        assert r["captions"] == [c for c, _ in expect]
        assert r["keep"] == bool(expect)
        assert r["drop_reason"] == (None if expect else "below_threshold")
    stages = result.record.stages
    assert stages["caption"]["images_per_s"] > 0 and stages["score"]["texts_per_s"] > 0


def test_rerun_same_command_does_nothing_and_other_recipe_is_refused(coco_run, tmp_path):
    _rows, out, result = coco_run
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    inp = result.record.inputs[0]["uri"]
    again = run(RunOptions(inputs=[inp], output=str(out), models="tiny",
                           overrides=["download.allow_private_network=true", "output.rows_per_shard=40",
                                      "download.image_size=64"], progress=False))
    assert again.parts_written == 0 and again.parts_skipped == 2 and again.totals["rows"] == 79
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == before
    from capfilt.errors import OutputError

    with pytest.raises(OutputError, match="caption.num_captions"):
        run(RunOptions(inputs=[inp], output=str(out), models="tiny",
                       overrides=["download.allow_private_network=true", "output.rows_per_shard=40",
                                  "download.image_size=64", "caption.num_captions=3"], progress=False))
