"""An export is resumable and never loses a row silently: a rerun rewrites only the shards that are
not done, incomplete source parts are skipped and reported (exit 2), bad folders are refused with one
message, and counts that do not add up stop the export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from capfilt.errors import OutputError
from capfilt.export import export_output
from tests.export.helpers import cli, read_tars, source_rows, stats
from tests.helpers.report_fixture import make_output

pytest.importorskip("webdataset")


def _mtimes(dest: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(dest.glob("*.tar"))}


@pytest.mark.parametrize("lose", ["tar", "stats"])
def test_rerun_rewrites_only_the_missing_shard(tmp_path, lose):
    out = make_output(tmp_path / "out", rows=100, rows_per_shard=25)
    dest = tmp_path / "wds"
    assert cli(out, "--to", dest).exit_code == 0
    before, counts = _mtimes(dest), stats(dest)
    if lose == "tar":
        (dest / "00002.tar").unlink()
    else:  # a crash between moving the shard into place and writing its stats
        (dest / "_stats" / "00002.stats.json").unlink()
    (dest / "_capfilt" / "tmp").mkdir()
    (dest / "_capfilt" / "tmp" / "00003.0123.tar").write_bytes(b"half a shard")  # a crashed write
    r = cli(out, "--to", dest)
    assert r.exit_code == 0, r.output
    after = _mtimes(dest)
    assert [n for n in after if after[n] != before.get(n)] == ["00002.tar"]
    assert r.output.count("(already done)") == 3
    assert stats(dest) == counts                                   # same counts, still adding up
    assert not (dest / "_capfilt" / "tmp").exists()
    assert [s["__key__"] for s in read_tars(dest)] == [x["key"] for x in source_rows(out) if x["keep"]]


def test_changed_options_or_source_redo_the_shards(tmp_path):
    out = make_output(tmp_path / "out", rows=50, rows_per_shard=25)
    dest = tmp_path / "wds"
    assert cli(out, "--to", dest).exit_code == 0
    kept = sum(s["written"] for s in stats(dest).values())
    assert cli(out, "--to", dest, "--all").exit_code == 0            # other options: every shard redone
    assert sum(s["written"] for s in stats(dest).values()) == sum(1 for x in source_rows(out) if x["image"]) > kept
    # the source part 00001 disappears (e.g. reconciled away): its shard is removed, not left to duplicate rows
    (out / "00001.parquet").unlink()
    (out / "_stats" / "00001.stats.json").unlink()
    r = cli(out, "--to", dest, "--all")
    assert r.exit_code == 0 and "removed 1 shard(s) whose source part no longer exists: 00001" in r.output
    assert sorted(p.name for p in dest.glob("*.tar")) == ["00000.tar"] and sorted(stats(dest)) == ["00000"]


def test_incomplete_source_shard_is_skipped_and_reported(tmp_path):
    out = make_output(tmp_path / "out", rows=75, rows_per_shard=25, incomplete_shards=1)
    dest = tmp_path / "wds"
    r = cli(out, "--to", dest)
    assert r.exit_code == 2
    assert "1 shard(s) of" in r.output and "00002.parquet" in r.output and "were not exported" in r.output
    assert sorted(p.name for p in dest.glob("*.tar")) == ["00000.tar", "00001.tar"]
    summary = json.loads((dest / "_capfilt" / "export.json").read_text())
    assert summary["status"] == "partial" and summary["skipped_incomplete"] == ["00002.parquet"]
    assert summary["totals"]["rows_in"] == 50
    # the run finishes (its stats appear): the rerun writes only that shard
    before = _mtimes(dest)
    (out / "_stats" / "00002.stats.json").write_text(json.dumps({"rows": 25}))
    r = cli(out, "--to", dest)
    assert r.exit_code == 0, r.output
    after = _mtimes(dest)
    assert [n for n in after if after[n] != before.get(n)] == ["00002.tar"]
    assert json.loads((dest / "_capfilt" / "export.json").read_text())["totals"]["rows_in"] == 75


def test_bad_folders_exit_2_with_one_message(tmp_path):
    (tmp_path / "empty").mkdir()
    r = cli(tmp_path / "empty", "--to", tmp_path / "d1")
    assert r.exit_code == 2 and "is not a capfilt output" in r.output and "Traceback" not in r.output
    r = cli(tmp_path / "nowhere", "--to", tmp_path / "d2")
    assert r.exit_code == 2 and "does not exist" in r.output
    out = make_output(tmp_path / "out", rows=20, rows_per_shard=20)
    r = cli(out, "--to", out)
    assert r.exit_code == 2 and "is the output folder itself" in r.output
    r = cli(out, "--to", out / "wds")
    assert r.exit_code == 2 and "is inside the output folder" in r.output and not (out / "wds").exists()
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"x")
    r = cli(out, "--to", tmp_path / "photos")
    assert r.exit_code == 2 and "not a capfilt export" in r.output
    assert sorted(os.listdir(tmp_path / "photos")) == ["holiday.jpg"]
    assert cli(out, "--to", tmp_path / "wds").exit_code == 0
    r = cli(out, "--to", tmp_path / "wds", "--format", "hf-parquet")
    assert r.exit_code == 2 and "holds a webdataset export" in r.output
    r = cli(out, "--to", "nosuchscheme://bucket/x")
    assert r.exit_code == 2 and "no filesystem for scheme 'nosuchscheme'" in r.output
    r = cli(out, "--to", tmp_path / "x", "--format", "csv")
    assert r.exit_code == 2 and "'csv' is not one of webdataset, hf-parquet" in r.output


def test_a_part_that_disagrees_with_its_stats_stops_the_export(tmp_path):
    out = make_output(tmp_path / "out", rows=40, rows_per_shard=20)
    (out / "_stats" / "00001.stats.json").write_text(json.dumps({"rows": 21}))
    with pytest.raises(OutputError, match=r"00001.parquet holds 20 rows but its stats file says 21"):
        export_output(str(out), "webdataset", str(tmp_path / "wds"))


def test_an_export_interrupted_mid_shard_finishes_on_rerun(tmp_path, monkeypatch):
    """Ctrl-C while the second shard is being written: the first stays committed, nothing half-written
    is left in place, and the same command finishes the rest."""
    from capfilt.export import webdataset as wds_export

    out = make_output(tmp_path / "out", rows=75, rows_per_shard=25)
    dest = tmp_path / "wds"
    real = wds_export.write_tar
    calls = []

    def interrupted(batches, stream, *args):
        calls.append(1)
        if len(calls) == 2:
            stream.write(b"partial tar bytes")
            raise KeyboardInterrupt
        return real(batches, stream, *args)

    monkeypatch.setattr(wds_export, "write_tar", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_output(str(out), "webdataset", str(dest))
    assert sorted(p.name for p in dest.glob("*.tar")) == ["00000.tar"] and sorted(stats(dest)) == ["00000"]
    assert not list((dest / "_capfilt" / "tmp").glob("*"))
    assert json.loads((dest / "_capfilt" / "export.json").read_text())["status"] == "running"
    monkeypatch.setattr(wds_export, "write_tar", real)
    result = export_output(str(out), "webdataset", str(dest))
    assert [(s.name, s.written_now) for s in result.shards] == [("00000", False), ("00001", True), ("00002", True)]
    assert result.totals["rows_in"] == 75 == result.totals["written"] + sum(result.totals["filtered"].values())
    assert [s["__key__"] for s in read_tars(dest)] == [x["key"] for x in source_rows(out) if x["keep"]]


def test_a_full_disk_is_one_message_and_the_rerun_finishes(tmp_path, monkeypatch):
    import errno

    from capfilt.export import commit

    out = make_output(tmp_path / "out", rows=40, rows_per_shard=20)
    real, calls = commit.commit_shard, []

    def full(dest, name, *args):
        calls.append(name)
        if name == "00001":
            raise OSError(errno.ENOSPC, "No space left on device", f"{dest.path}/_capfilt/tmp/{name}.x.tar")
        return real(dest, name, *args)

    monkeypatch.setattr(commit, "commit_shard", full)
    r = cli(out, "--to", tmp_path / "wds")
    assert r.exit_code == 2 and "cannot write the export to" in r.output and "the disk is full" in r.output
    assert "Traceback" not in r.output and sorted(stats(tmp_path / "wds")) == ["00000"]
    monkeypatch.setattr(commit, "commit_shard", real)
    r = cli(out, "--to", tmp_path / "wds")
    assert r.exit_code == 0 and r.output.count("(already done)") == 1
