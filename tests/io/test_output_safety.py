"""The output folder is the user's: capfilt never deletes what it did not write, and refuses
to resume onto inputs that changed (keys would shift)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from capfilt.api import RunOptions, run
from capfilt.config import ConfigError, load_pipeline
from capfilt.errors import InputError, OutputError
from tests.helpers.httpserver import photo_server

PHOTOS = sorted((Path(__file__).resolve().parents[1] / "fixtures" / "coco" / "images").glob("*.jpg"))[:4]


def _run(inputs, out, **kw):
    return run(RunOptions(inputs=[str(i) for i in inputs], output=str(out), pipeline="download", executor="local",
                          overrides=["download.allow_private_network=true", "output.rows_per_shard=2"],
                          progress=False, **kw))


@pytest.fixture()
def csv_dir(tmp_path):
    with photo_server(PHOTOS) as srv:
        d = tmp_path / "in"
        d.mkdir()
        for name in ("a", "c"):
            (d / f"{name}.csv").write_text("url,caption\n" + "".join(f"{srv.url(f'{name}{i}.jpg')},x\n" for i in range(3)))
        yield d, srv


def test_foreign_files_in_output_are_never_deleted(csv_dir, tmp_path):
    d, _ = csv_dir
    out = tmp_path / "out"
    out.mkdir()
    (out / "mydata.parquet").write_bytes(b"user data")
    (out / "draft.tmp").write_text("user draft")
    with pytest.raises(OutputError, match="did not write .*draft.tmp, mydata.parquet"):
        _run([d], out)
    with pytest.raises(OutputError, match="did not write"):
        _run([d], out, overwrite=True)
    assert (out / "mydata.parquet").read_bytes() == b"user data" and (out / "draft.tmp").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        _run([d], tmp_path / "afile")


def test_overwrite_removes_only_capfilt_files(csv_dir, tmp_path):
    d, _ = csv_dir
    out = tmp_path / "out"
    _run([d], out)
    (out / "notes.txt").write_text("mine")  # added later by the user
    res = _run([d], out, overwrite=True)
    assert res.totals["rows"] == 6 and (out / "notes.txt").read_text() == "mine"


def test_resume_refused_when_input_folder_changed(csv_dir, tmp_path):
    d, srv = csv_dir
    out = tmp_path / "out"
    _run([d], out)
    (d / "b.csv").write_text(f"url,caption\n{srv.url('b0.jpg')},x\n")
    with pytest.raises(OutputError, match=r"input changed since .*b.csv \(new\)"):
        _run([d], out)
    res = _run([d], out, overwrite=True)
    keys = ds.dataset(sorted(str(p) for p in out.glob("*.parquet"))).to_table().column("key").to_pylist()
    assert res.totals["rows"] == 7 and len(set(keys)) == 7


def test_bad_inputs_named_before_work(csv_dir, tmp_path):
    d, _ = csv_dir
    with pytest.raises(InputError, match="given twice"):
        _run([d / "a.csv", d / "a.csv"], tmp_path / "o1")
    pq.write_table(pa.table({"url": [["http://x/a.jpg"]], "caption": ["c"]}), tmp_path / "lists.parquet")
    with pytest.raises(InputError, match="URL column 'url' holds list<element: string>, not text"):
        _run([tmp_path / "lists.parquet"], tmp_path / "o2")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match="empty.jsonl is empty"):
        _run([tmp_path / "empty.jsonl"], tmp_path / "o3")
    (tmp_path / "latin1.csv").write_bytes("url,caption\nhttp://127.0.0.1:9/a.jpg,caf\xe9 cr\xe8me\n".encode("latin-1"))
    res = _run([tmp_path / "latin1.csv"], tmp_path / "o4")
    row = ds.dataset(str(tmp_path / "o4" / "00000.parquet")).to_table().to_pylist()[0]
    assert row["caption"] == "caf\ufffd cr\ufffdme" and res.totals["rows"] == 1
    with pytest.raises(OutputError, match="is not a folder"):
        run(RunOptions(inputs=[str(d / "a.csv")], output=str(tmp_path / "o5"), pipeline="refilter", progress=False))


def test_recipe_values_checked(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="itm_threshold"):
        load_pipeline("blip", ["select.itm_threshold=1.5"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blip").mkdir()  # a folder named like a bundled recipe does not shadow it
    assert load_pipeline("blip").name == "blip"
