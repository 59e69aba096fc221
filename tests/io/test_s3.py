"""Input and output on S3: a real S3-compatible server (moto's server mode) on 127.0.0.1.

Credentials and the endpoint come from the environment only (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``), as on a real deployment. The pipeline runs on
real Ray (tiny models, photos from a 127.0.0.1 HTTP server); its workers read the input and
write the shards on S3 themselves. Then an interrupted run is resumed on S3: one shard loses its
stats object, another gets an uncommitted leftover, and the same command completes the output
with every key exactly once without rewriting the untouched shard objects.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers.s3server import AWS_ENV, moto_s3

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PHOTOS = sorted((FIXTURES / "coco" / "images").glob("*.jpg"))[:10]
BUCKET = "capfilt-test"
ROWS, PER_SHARD = 24, 4


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with AWS_* pointing at it; yields a boto3 client."""
    with moto_s3(BUCKET) as client:
        yield client


def _objects(client, prefix: str) -> dict[str, dict]:
    """Objects under ``prefix``: key -> {ETag, LastModified, Size}."""
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = {"etag": o["ETag"], "modified": o["LastModified"], "size": o["Size"]}
    return out


def _read_shards(client, prefix: str) -> pa.Table:
    tables = []
    for key in sorted(_objects(client, prefix)):
        rel = key[len(prefix):]
        if rel.endswith(".parquet") and "/" not in rel:
            body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            tables.append(pq.read_table(io.BytesIO(body)).replace_schema_metadata(None))
    return pa.concat_tables(tables) if tables else pa.table({})


def test_move_is_copy_and_delete_on_s3(s3):
    """pyarrow's S3 ``move`` (what the writer commits with) works on the server: copy, then delete."""
    from capfilt.io.filesystem import locate

    loc = locate(f"s3://{BUCKET}/movecheck")
    assert not loc.is_local and loc.path == f"{BUCKET}/movecheck"
    with loc.fs.open_output_stream(loc.join("tmp", "a.tmp").path) as f:
        f.write(b"x" * 1000)
    loc.fs.move(loc.join("tmp", "a.tmp").path, loc.join("a.bin").path)
    objs = _objects(s3, "movecheck/")
    assert objs["movecheck/a.bin"]["size"] == 1000 and "movecheck/tmp/a.tmp" not in objs
    assert loc.is_dir() and not locate(f"s3://{BUCKET}/nothing-here").exists()


def test_output_overlapping_input_prefix_is_refused(s3):
    from capfilt.api import RunOptions, run
    from capfilt.errors import OutputError

    s3.put_object(Bucket=BUCKET, Key="overlap/in/rows.csv", Body=b"url,caption\nhttp://127.0.0.1:1/a.jpg,a\n")
    with pytest.raises(OutputError, match="overlaps input"):
        run(RunOptions(inputs=[f"s3://{BUCKET}/overlap/in"], output=f"s3://{BUCKET}/overlap/in/out",
                       pipeline="download", progress=False))


@pytest.mark.slow
def test_pipeline_on_s3_and_resume(s3, tmp_path, monkeypatch):
    import capfilt.api as api
    from capfilt.runner import init_ray
    from tests.helpers.httpserver import ImageServer

    # Ray may already run in this process without the S3 variables (another test module, or a
    # user's notebook): start it here before they are visible, so the stages must carry them.
    saved = {k: os.environ.pop(k) for k in [*AWS_ENV, "AWS_ENDPOINT_URL"]}
    init_ray(None)
    os.environ.update(saved)

    driver_batches: list[pa.Table] = []
    real_run_ray = api.run_ray

    def recording_run_ray(*args, **kwargs):  # what reaches the driver from the Ray job
        for b in real_run_ray(*args, **kwargs):
            driver_batches.append(b)
            yield b

    monkeypatch.setattr(api, "run_ray", recording_run_ray)

    with ImageServer(root=PHOTOS[0].parent) as srv:
        rows = [{"url": srv.url(PHOTOS[i % len(PHOTOS)].name), "caption": f"web caption {i}", "n": i}
                for i in range(ROWS - 2)]
        rows += [{"url": srv.url("status/404"), "caption": "gone", "n": ROWS - 2},
                 {"url": srv.url("html"), "caption": "not an image", "n": ROWS - 1}]
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        s3.put_object(Bucket=BUCKET, Key="in/rows.parquet", Body=buf.getvalue())

        opts = api.RunOptions(inputs=[f"s3://{BUCKET}/in/rows.parquet"], output=f"s3://{BUCKET}/out",
                              models="tiny", progress=False, executor="ray",
                              overrides=["download.allow_private_network=true", f"output.rows_per_shard={PER_SHARD}",
                                         "output.block_rows=2",  # shards stream in blocks, staged on S3
                                         "download.image_size=64", "download.timeout=10"])
        first = api.run(opts)

        t = _read_shards(s3, "out/")
        assert t.num_rows == ROWS == first.totals["rows"]
        keys = t.column("key").to_pylist()
        assert sorted(keys) == [f"0000_{i:09d}" for i in range(ROWS)]
        by_n = {r["n"]: r for r in t.select(["n", "status", "error_message", "synthetic_captions"]).to_pylist()}
        assert all(by_n[i]["status"] == "success" and len(by_n[i]["synthetic_captions"]) == 1
                   for i in range(ROWS - 2))
        assert by_n[ROWS - 2]["status"] == "failed_to_download" and "404" in by_n[ROWS - 2]["error_message"]
        assert by_n[ROWS - 1]["status"] != "success" and by_n[ROWS - 1]["error_message"]

        objs = _objects(s3, "out/")
        shard_keys = sorted(k for k in objs if k.endswith(".parquet") and k.count("/") == 1)
        assert shard_keys == [f"out/{i:05d}.parquet" for i in range(ROWS // PER_SHARD)]
        assert all(f"out/_stats/{i:05d}.stats.json" in objs for i in range(ROWS // PER_SHARD))
        assert not [k for k in objs if k.startswith("out/_capfilt/tmp/") and not k.endswith("/")]
        assert not [k for k in objs if k.startswith("out/_capfilt/staging/") and not k.endswith("/")]
        record = json.loads(s3.get_object(Bucket=BUCKET, Key="out/_capfilt/run.json")["Body"].read())
        assert record["status"] == "complete" and record["output"] == f"s3://{BUCKET}/out"

        # the driver received only the writer's stats rows: no image bytes
        assert {tuple(b.column_names) for b in driver_batches} == {("name", "shard_id", "rows", "stats")}
        assert sum(b.nbytes for b in driver_batches) < 20_000 < sum(len(x or b"") for x in t.column("image").to_pylist())

        # --- interrupt: shard 1 loses its stats (never committed), shard 3 leaves an uncommitted
        # object and a temporary object behind; the others must stay untouched on resume
        s3.delete_object(Bucket=BUCKET, Key="out/_stats/00001.stats.json")
        s3.put_object(Bucket=BUCKET, Key="out/00003-000002.parquet", Body=b"half a shard")
        s3.put_object(Bucket=BUCKET, Key="out/_capfilt/tmp/00003.deadbeef.parquet", Body=b"junk")
        before = {k: v for k, v in _objects(s3, "out/").items() if k.endswith(".parquet")}

        driver_batches.clear()
        second = api.run(opts)
        assert second.resumed and second.parts_written == 1 and second.parts_skipped == ROWS // PER_SHARD - 1

    t2 = _read_shards(s3, "out/")
    keys2 = t2.column("key").to_pylist()
    assert len(keys2) == len(set(keys2)) == ROWS and set(keys2) == set(keys)
    after = _objects(s3, "out/")
    assert "out/00003-000002.parquet" not in after
    assert not [k for k in after if k.startswith("out/_capfilt/tmp/") and not k.endswith("/")]
    for i in range(ROWS // PER_SHARD):
        k = f"out/{i:05d}.parquet"
        if i == 1:
            assert after[k]["modified"] > before[k]["modified"] and f"out/_stats/{i:05d}.stats.json" in after
        else:  # untouched: same object, not rewritten
            assert after[k] == before[k], k
    record = json.loads(s3.get_object(Bucket=BUCKET, Key="out/_capfilt/run.json")["Body"].read())
    assert record["status"] == "complete" and len(record["attempts"]) == 2 and record["totals"]["rows"] == ROWS

    # --- refilter straight from S3 to S3 (no Ray, no models): every row once, new threshold applied
    refilt = api.run(api.RunOptions(inputs=[f"s3://{BUCKET}/out"], output=f"s3://{BUCKET}/refiltered",
                                    pipeline="refilter", overrides=["select.itm_threshold=0.99"], progress=False))
    t3 = _read_shards(s3, "refiltered/")
    assert refilt.totals["rows"] == t3.num_rows == ROWS and sorted(t3.column("key").to_pylist()) == sorted(keys)
    for r in t3.select(["web_itm", "synthetic_itm", "caption_scores", "keep"]).to_pylist():
        assert all(s >= 0.99 for s in r["caption_scores"] or [])
        expect = sum(s is not None and s >= 0.99 for s in [r["web_itm"], *(r["synthetic_itm"] or [])])
        assert len(r["caption_scores"] or []) == expect and r["keep"] == (expect > 0)
