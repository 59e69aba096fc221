"""Tar size is configurable: ``capfilt export --rows-per-file N`` splits each shard part into files of at
most N of its rows, each committed and resumed on its own; changing N (or dropping it) rewrites the
destination, and the counts still add up (issue 11)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.export.helpers import cli, read_tars, source_rows, stats
from tests.helpers.report_fixture import make_output

pytest.importorskip("webdataset")


def _tars(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.glob("*.tar"))


@pytest.mark.parametrize("fmt", ["webdataset", "hf-parquet"])
def test_rows_per_file_splits_parts_and_keeps_every_row(tmp_path, fmt):
    out = make_output(tmp_path / "out", rows=60, rows_per_shard=25)  # parts of 25, 25, 10 rows
    dest = tmp_path / "dest"
    r = cli(out, "--to", dest, "--format", fmt, "--rows-per-file", "10", "--all")
    assert r.exit_code == 0, r.output
    ext = "tar" if fmt == "webdataset" else "parquet"
    names = ["00000_0000", "00000_0001", "00000_0002", "00001_0000", "00001_0001", "00001_0002", "00002_0000"]
    assert sorted(p.stem for p in dest.glob(f"*.{ext}")) == names
    st = stats(dest)
    assert [st[n]["rows_in"] for n in names] == [10, 10, 5, 10, 10, 5, 10]
    assert all(st[n]["rows_in"] == st[n]["written"] + sum(st[n]["filtered"].values()) for n in names)
    with_image = [x["key"] for x in source_rows(out) if x["image"] is not None]
    if fmt == "webdataset":
        assert [s["__key__"] for s in read_tars(dest)] == with_image  # same rows, same order
        sizes = json.loads((dest / "sizes.json").read_text())
        assert sizes == {f"{n}.tar": st[n]["written"] for n in names}
    else:
        import pyarrow.parquet as pq

        assert [k for n in names for k in pq.read_table(dest / f"{n}.parquet", columns=["key"]).column("key").to_pylist()] \
            == with_image


def test_rows_per_file_resumes_and_changing_it_rewrites(tmp_path):
    out = make_output(tmp_path / "out", rows=50, rows_per_shard=25)
    dest = tmp_path / "wds"
    assert cli(out, "--to", dest, "--rows-per-file", "10").exit_code == 0
    (dest / "00001_0001.tar").unlink()  # a lost file is redone alone
    r = cli(out, "--to", dest, "--rows-per-file", "10")
    assert r.exit_code == 0, r.output
    assert r.output.count("(already done)") == 5
    kept = [x["key"] for x in source_rows(out) if x["keep"]]
    assert [s["__key__"] for s in read_tars(dest)] == kept
    r = cli(out, "--to", dest)  # back to one tar per part: the split files go
    assert r.exit_code == 0, r.output
    assert _tars(dest) == ["00000.tar", "00001.tar"]
    assert [s["__key__"] for s in read_tars(dest)] == kept
    assert cli(out, "--to", dest, "--rows-per-file", "0").exit_code != 0  # refused, nothing changed
    assert _tars(dest) == ["00000.tar", "00001.tar"]
