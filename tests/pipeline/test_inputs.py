"""Inputs across runs in one process: what a run reads is the file as it is now."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from capfilt.api import RunOptions, run
from tests.helpers.httpserver import ImageServer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.mark.parametrize("executor", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_second_in_process_run_reads_the_edited_file(tmp_path, executor):
    """No decoded input outlives its run: edit the CSV (same row count), rerun with overwrite.

    With Ray the read tasks of both runs land on the same reused worker processes, where the old
    per-process cache served the first run's rows."""
    names = ["000000000139.jpg", "000000000802.jpg"]
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    with ImageServer(root=FIXTURES / "coco" / "images") as srv:
        def go(tag: str) -> list[str]:
            inp.write_text("url,caption\n" + "".join(f"{srv.url(n)},{tag} {n}\n" for n in names))
            run(RunOptions(inputs=[str(inp)], output=str(out), pipeline="download", executor=executor,
                           overwrite=True, progress=False,
                           overrides={"download.allow_private_network": True, "output.rows_per_shard": 1}))
            return pq.read_table(out).sort_by("key").column("caption").to_pylist()

        assert go("old") == [f"old {n}" for n in names]
        assert go("new") == [f"new {n}" for n in names]


def test_mostly_private_hosts_warn_before_the_run_with_the_flag_to_pass(tmp_path, caplog):
    """Issue 14: 249 s of work to learn that loopback URLs are refused; now a warning before any work."""
    import logging

    from capfilt.config import load_pipeline
    from capfilt.plan import inspect_source

    (tmp_path / "in.csv").write_text("url,caption\n" + "".join(f"http://127.0.0.1:9/{i}.jpg,c\n" for i in range(6))
                                     + "http://192.0.2.10/x.jpg,c\n")
    with caplog.at_level(logging.WARNING, logger="capfilt.plan"):
        inspect_source(load_pipeline("download"), [str(tmp_path / "in.csv")])
    assert "point at loopback/private addresses (e.g. host 127.0.0.1)" in caplog.text
    assert "--allow-private-network" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="capfilt.plan"):
        inspect_source(load_pipeline("download", {"download.allow_private_network": True}), [str(tmp_path / "in.csv")])
    assert "loopback/private" not in caplog.text
