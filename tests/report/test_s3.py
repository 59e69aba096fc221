"""``capfilt report`` on an output in object storage: moto's S3 server on 127.0.0.1.

The output is built locally (tests/helpers/report_fixture.py) and uploaded; the report reads it through
pyarrow's S3 filesystem (endpoint and credentials from the environment only) and writes its
default HTML/JSON back into ``s3://.../_capfilt/``. Numbers must equal the local report's.
"""

from __future__ import annotations

import json

import pytest

from capfilt.report import build_report
from tests.helpers.report_fixture import make_output
from tests.helpers.s3server import moto_s3

BUCKET = "capfilt-report"


@pytest.fixture()
def s3():
    """moto's S3 server on 127.0.0.1 with AWS_* pointing at it; yields a boto3 client."""
    with moto_s3(BUCKET) as client:
        yield client


def test_report_reads_and_writes_s3(s3, tmp_path):
    local = make_output(tmp_path / "out", rows=60, rows_per_shard=20, recipe="blip2", incomplete_shards=1, seed=8)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            s3.upload_file(str(p), BUCKET, f"runs/out/{p.relative_to(local).as_posix()}")
    remote = build_report(f"s3://{BUCKET}/runs/out", samples=6)
    assert remote["files"] == {"html": f"s3://{BUCKET}/runs/out/_capfilt/report.html",
                               "json": f"s3://{BUCKET}/runs/out/_capfilt/report.json"}
    on_s3 = json.loads(s3.get_object(Bucket=BUCKET, Key="runs/out/_capfilt/report.json")["Body"].read())
    html = s3.get_object(Bucket=BUCKET, Key="runs/out/_capfilt/report.html")["Body"].read().decode()
    assert "<h2>Samples</h2>" in html and html.count('class="thumb"') >= 6
    here = build_report(local, html=tmp_path / "r.html", json_path=tmp_path / "r.json", samples=6)
    # same numbers, same samples; only the location and per-shard file sizes' paths differ
    for k in ("shards", "overview", "filter", "captions", "samples", "borderline"):
        assert on_s3[k] == here[k], k
    assert on_s3["download"]["per_shard"] == here["download"]["per_shard"]
    assert on_s3["shards"]["read"] == 2 and on_s3["shards"]["incomplete"] == 1
