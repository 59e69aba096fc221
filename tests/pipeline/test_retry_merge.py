"""The retry's merge step on a real output folder, without a pipeline: staged results replace their rows
in place, a staged file without its marker is a leftover, and merging the same staged files again (a
kill between committing a part and deleting them) changes nothing."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt import schema
from capfilt.io.failures import fill_classes
from capfilt.io.filesystem import locate
from capfilt.io.writer import commit_part, scan_output
from capfilt.retry import RetryWriter, merge_staged, pick_rows, wanted_set
from capfilt.stages.registry import known_stages, output_schema
from capfilt.stages.write import shard_stats


def _part(out, name: str, keys: list[str], status: list[str], message: list[str | None]) -> None:
    sch = output_schema([], ["itm", "itc"], "run0")
    t = pa.table({"key": keys, "url": [f"http://h{i}.example/x.jpg" for i in range(len(keys))],
                  "status": status, "error_message": message})
    t = schema.conform(fill_classes(t), sch)  # as the shard writer does
    commit_part(out, name, t, shard_stats(t, name, int(name[:5]), "run0", known_stages()), "zstd")


def test_merge_replaces_in_place_and_is_idempotent(tmp_path):
    out = locate(str(tmp_path / "out"))
    _part(out, "00000", ["0000_000000000", "0000_000000001", "0000_000000002"],
          ["failed_to_download", "success", "failed_to_download"],
          ["HTTP 503 Service Unavailable", None, "HTTP 404 Not Found"])
    _part(out, "00001", ["0000_000000003"], ["failed_to_download"], ["cannot resolve host h0.example (x)"])
    parts = scan_output(out)[0]
    specs, before = pick_rows(out, parts, wanted_set(None))
    assert specs.to_pylist() == [{"part": "00000", "path": parts[0].parquet, "rows": [0]},
                                 {"part": "00001", "path": parts[1].parquet, "rows": [0]}]
    assert before == {"http_5xx": 1, "dns": 1}

    sch = output_schema([], ["itm", "itc"], "run0")
    done = pa.table({"key": ["0000_000000000", "0000_000000003"], "url": ["u0", "u3"],
                     "status": ["success", "failed_to_download"], "error_message": [None, "timed out after 1.0 s"],
                     "image": [b"img", None], "_part": ["00000", "00001"], "_shard": [0, 1], "_offset": [0, 0]})
    stats = RetryWriter(out.uri, sch, "run0", known_stages())(done).to_pylist()
    assert [(s["name"], s["rows"]) for s in stats] == [("00000", 1), ("00001", 1)]
    staged = tmp_path / "out" / "_capfilt" / "retry"
    (staged / "00000.0123456789abcdef0123456789abcdef.parquet").write_bytes(b"half-written")  # no marker
    keep = tmp_path / "staged-copy"
    shutil.copytree(staged, keep)

    merged = merge_staged(out, "run0", known_stages())
    assert merged == {"parts": 2, "rows": 2, "status": {"success": 1, "failed_to_download": 1},
                      "error_class": {"timeout": 1}}
    assert not list(staged.iterdir())
    p0 = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()
    assert [r["key"] for r in p0] == ["0000_000000000", "0000_000000001", "0000_000000002"]
    assert [(r["status"], r["error_class"], r["image"]) for r in p0] == [
        ("success", None, b"img"), ("success", None, None), ("failed_to_download", "http_4xx", None)]
    assert p0[0]["url"] == "u0"
    st0 = json.loads((tmp_path / "out" / "_stats" / "00000.stats.json").read_text())
    assert st0["status"] == {"failed_to_download": 1, "success": 2} and st0["error_class"] == {"http_4xx": 1}
    p1 = pq.read_table(tmp_path / "out" / "00001.parquet").to_pylist()
    assert [(r["status"], r["error_class"]) for r in p1] == [("failed_to_download", "timeout")]

    # killed after committing the parts, before deleting the staged files: the next run merges them again
    snapshot = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.parquet")}
    for f in keep.iterdir():
        if f.name.endswith(".json") or (keep / (f.name[: -len(".parquet")] + ".json")).exists():
            shutil.copy(f, staged / f.name)
    again = merge_staged(out, "run0", known_stages())
    assert again["rows"] == 2 and not list(staged.iterdir())
    for name, data in snapshot.items():
        assert pq.read_table(tmp_path / "out" / name).equals(pq.read_table(pa.BufferReader(data)))
    assert json.loads((tmp_path / "out" / "_stats" / "00000.stats.json").read_text())["status"] == st0["status"]
    assert len(scan_output(out)[0]) == 2 and not scan_output(out)[1]
