"""The CLI as a user meets it: one clear message and a non-zero exit, before any download."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers.httpserver import ImageServer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _capfilt(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "capfilt.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=e)


@pytest.fixture()
def served_input(tmp_path):
    with ImageServer(root=FIXTURES / "coco" / "images") as srv:
        pq.write_table(pa.table({"url": [srv.url("000000000139.jpg")], "caption": ["a room"]}), tmp_path / "in.parquet")
        yield tmp_path / "in.parquet", srv


def _assert_one_message(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    text = " ".join((r.stderr + r.stdout).split())
    for n in needles:
        assert n in text, text


def test_missing_url_column(tmp_path, served_input):
    _, srv = served_input
    pq.write_table(pa.table({"link_to_image": ["x"], "TEXT": ["y"]}), tmp_path / "bad.parquet")
    r = _capfilt("run", "--input", str(tmp_path / "bad.parquet"), "--output", str(tmp_path / "o"), "--models", "tiny")
    _assert_one_message(r, "bad.parquet", "link_to_image, TEXT", "--url-col")
    assert not (tmp_path / "o").exists()


def test_unreadable_file_named(tmp_path):
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1\x00garbage")
    r = _capfilt("run", "--input", str(tmp_path / "corrupt.parquet"), "--output", str(tmp_path / "o"))
    _assert_one_message(r, "corrupt.parquet", "not a readable Parquet file")


def test_preset_without_weights_stops_before_download(tmp_path, served_input):
    inp, srv = served_input
    hub = tmp_path / "empty-hf-home"
    r = _capfilt("run", "--input", str(inp), "--output", str(tmp_path / "o"), "--models", "blip-base",
                 "--allow-private-network", env={"HF_HOME": str(hub), "HF_HUB_OFFLINE": "1"})
    _assert_one_message(r, "Salesforce/blip-image-captioning-base", "--models")
    assert srv.hits == {}  # nothing was downloaded


def test_unknown_recipe_key_and_bad_override(tmp_path, served_input):
    inp, _ = served_input
    r = _capfilt("run", "--input", str(inp), "--output", str(tmp_path / "o"), "--set", "caption.top_q=0.9")
    _assert_one_message(r, "caption.top_q", "unknown key")
    r = _capfilt("run", "--input", str(inp), "--output", str(tmp_path / "o"), "--pipeline", "nope")
    _assert_one_message(r, "unknown pipeline 'nope'", "blip2")


def test_output_inside_input_folder_refused(tmp_path, served_input):
    inp, _ = served_input
    r = _capfilt("run", "--input", str(tmp_path), "--output", str(tmp_path / "out"), "--models", "tiny")
    _assert_one_message(r, "overlaps input")


def test_flag_values_reach_the_recipe_typed_not_reparsed(tmp_path):
    """``--caption-col "text #1"`` stays "text #1" (as YAML it would be "text"), ``--keep-columns`` a list."""
    with ImageServer(root=FIXTURES / "coco" / "images") as srv:
        pq.write_table(pa.table({"link": [srv.url("000000000139.jpg")], "text #1": ["a room"], "it's": ["x"],
                                 "other": ["y"]}), tmp_path / "in.parquet")
        r = _capfilt("run", "-i", str(tmp_path / "in.parquet"), "-o", str(tmp_path / "out"), "--pipeline", "download",
                     "--executor", "local", "--url-col", "link", "--caption-col", "text #1", "--keep-columns",
                     "it's", "--allow-private-network", "--set", "output.rows_per_shard=5", "--no-progress")
    assert r.returncode == 0, r.stdout + r.stderr
    t = pq.read_table(tmp_path / "out")
    assert t.column("caption").to_pylist() == ["a room"] and "it's" in t.column_names and "other" not in t.column_names


@pytest.mark.parametrize("flags", [(), ("--url-col", "1", "--caption-col", "0", "--csv-header", "false",
                                         "--input-format", "tsv")], ids=["auto-detected", "documented-flags"])
def test_headerless_caption_first_tsv_like_cc3m(tmp_path, flags):
    """CC3M's ``caption<TAB>url`` without a header row: every row read, captions as captions."""
    with ImageServer(root=FIXTURES / "coco" / "images") as srv:
        names = ["000000000139.jpg", "000000000802.jpg"]
        (tmp_path / "cc3m.tsv").write_text("".join(f"caption of {n}\t{srv.url(n)}\n" for n in names))
        r = _capfilt("run", "-i", str(tmp_path / "cc3m.tsv"), "-o", str(tmp_path / "out"), "--pipeline", "download",
                     "--executor", "local", "--allow-private-network", "--no-progress", *flags)
    assert r.returncode == 0, r.stdout + r.stderr
    t = pq.read_table(tmp_path / "out").sort_by("key")
    assert t.column("caption").to_pylist() == [f"caption of {n}" for n in names]
    assert t.column("status").to_pylist() == ["success", "success"]


def test_help_documents_input_format_and_header_options():
    r = _capfilt("run", "--help", env={"COLUMNS": "200"})
    text = " ".join(r.stdout.split())
    for needle in ("--input-format", "auto|parquet|csv|tsv|jsonl|txt|coco", "--csv-header", "auto|true|false",
                   "0-based position", "caption<TAB>url"):
        assert needle in text, needle


def test_flags_are_values_and_set_names_the_override(tmp_path, served_input):
    """``--caption-col null`` is a column named "null" (not auto-detection); a bad ``--set`` is named."""
    inp, _ = served_input
    r = _capfilt("run", "-i", str(inp), "-o", str(tmp_path / "o"), "--pipeline", "download", "--caption-col", "null")
    _assert_one_message(r, "--caption-col 'null' was not found", "url, caption")
    r = _capfilt("run", "-i", str(inp), "-o", str(tmp_path / "o"), "--set", "caption.num_captions=yes")
    _assert_one_message(r, "with overrides caption.num_captions", "caption.num_captions='yes'")
    r = _capfilt("run", "-i", str(inp), "-o", str(tmp_path / "o"), "--set", "download.encode_format=png")
    _assert_one_message(r, "download.encode_format=png", "download.encode_quality", "0-9")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("cmd", [["run"], ["demo"], ["report"], ["inspect"], ["train", "blip"], ["synth"],
                                 ["bootstrap"], ["export"]])
def test_help_shows_no_type_after_flags(cmd):
    from typer.testing import CliRunner

    from capfilt.cli import app

    r = CliRunner().invoke(app, [*cmd, "--help"], env={"COLUMNS": "160"})
    assert r.exit_code == 0 and "--help" in r.output
    assert "<bool>" not in r.output


@pytest.mark.parametrize("bad", ["langid.enabled", "=1"])
def test_a_malformed_set_is_one_line_exit_2(tmp_path, bad):
    """Found by a fresh-clone trial: `--set langid.enabled` (no value) printed a 42-line traceback."""
    from typer.testing import CliRunner

    from capfilt.cli import app

    r = CliRunner().invoke(app, ["run", "-i", str(tmp_path / "x.csv"), "-o", str(tmp_path / "o"), "--set", bad])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "section.key=value" in r.output or "empty key" in r.output
