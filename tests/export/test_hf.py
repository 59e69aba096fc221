"""``capfilt export --format hf-parquet``: ``datasets.load_dataset("parquet", ...)`` gives PIL images in
``image`` (the HF ``Image`` feature declared in the Parquet schema metadata), and ``README.md`` is a
dataset card with the run's recipe and the export's numbers."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from tests.export.helpers import cli, source_rows
from tests.helpers.report_fixture import make_output

datasets = pytest.importorskip("datasets")


@pytest.fixture()
def offline_hf(tmp_path, monkeypatch):
    """No network and a fresh cache for ``datasets``."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache", raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def test_load_dataset_returns_pil_images(tmp_path, offline_hf):
    from PIL import Image

    out = make_output(tmp_path / "out", rows=90, rows_per_shard=40, recipe="blip2", seed=3)
    dest = tmp_path / "hf"
    r = cli(out, "--to", dest, "--format", "hf-parquet")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in dest.glob("*.parquet")) == ["00000.parquet", "00001.parquet", "00002.parquet"]
    meta = json.loads(pq.read_schema(dest / "00000.parquet").metadata[b"huggingface"])
    assert meta["info"]["features"]["image"] == {"_type": "Image"}

    ds = datasets.load_dataset("parquet", data_files=str(dest / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    kept = [x for x in source_rows(out) if x["keep"]]
    assert ds.num_rows == len(kept) > 0
    assert isinstance(ds.features["image"], datasets.Image)
    first = ds[0]
    assert isinstance(first["image"], Image.Image) and first["image"].size == (kept[0]["width"], kept[0]["height"])
    assert ds["key"] == [x["key"] for x in kept]
    assert ds["text"] == [x["captions"][0] for x in kept]
    assert ds["captions"] == [x["captions"] for x in kept] and ds["caption_sources"] == [x["caption_sources"] for x in kept]
    raw = ds.with_format("arrow")[:3]["image"].to_pylist()       # the stored bytes, untouched
    assert [d["bytes"] for d in raw] == [x["image"] for x in kept[:3]]
    assert [d["path"] for d in raw] == [f"{x['key']}.jpg" for x in kept[:3]]

    card = (dest / "README.md").read_text()
    assert card.startswith("---\nconfigs:") and "path: '*.parquet'" in card
    assert "# blip2: image-text pairs curated with capfilt" in card
    rows = source_rows(out)
    scored = [x for x in rows if x["status"] == "success" and x["caption"] is not None]
    removed = sum("web" not in x["caption_sources"] for x in scored)
    assert f"| kept by the filter | {len(kept)} |" in card and f"| in this dataset | {len(kept)} |" in card
    assert f"{removed / len(scored):.1%} of the {len(scored)} scored web captions were removed" in card
    assert '"rank_by": "clip"' in card and '"top_k": 2' in card   # the run's recipe


def test_text_column_does_not_clobber_a_passed_through_text(tmp_path, offline_hf):
    out = make_output(tmp_path / "out", rows=30, rows_per_shard=30, noise_col="text")
    dest = tmp_path / "hf"
    assert cli(out, "--to", dest, "--format", "hf-parquet").exit_code == 0
    t = pq.read_table(dest / "00000.parquet")
    kept = [x for x in source_rows(out) if x["keep"]]
    assert t.column("text").to_pylist() == [x["text"] for x in kept]
    assert t.column("capfilt_text").to_pylist() == [x["captions"][0] for x in kept]
