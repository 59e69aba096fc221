"""Shared pieces of the export tests: the CLI, the source rows, reading tars back."""

from __future__ import annotations

import glob
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
from typer.testing import CliRunner

from capfilt.cli import app


def cli(*args: str):
    """Run ``capfilt export ARGS`` in-process; returns typer's result (``exit_code``, ``output``)."""
    return CliRunner().invoke(app, ["export", *map(str, args)])


def source_rows(out: Path, committed_only: bool = True) -> list[dict]:
    """Every row of the committed parts of ``out`` (those with ``_stats/NAME.stats.json``), in part order."""
    rows = []
    for p in sorted(out.glob("*.parquet")):
        if committed_only and not (out / "_stats" / f"{p.stem}.stats.json").exists():
            continue
        rows += pq.read_table(p).to_pylist()
    return rows


def read_tars(dest: Path) -> list[dict]:
    """Samples of every tar in ``dest`` read back with ``webdataset`` (raw bytes per member), in shard order."""
    import webdataset as wds

    shards = sorted(glob.glob(str(dest / "*.tar")))
    return list(wds.WebDataset(shards, shardshuffle=False)) if shards else []


def stats(dest: Path) -> dict[str, dict]:
    """``{name: stats}`` of the destination's ``_stats/*.stats.json``."""
    return {p.name[: -len(".stats.json")]: json.loads(p.read_text()) for p in sorted((dest / "_stats").glob("*.json"))}


def decodes(data: bytes) -> tuple[int, int]:
    """Size of the image ``data`` after a full decode with PIL (raises if it is not an image)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.size
