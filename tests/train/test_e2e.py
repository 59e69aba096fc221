"""The bootstrapping loop closes: a captioner trained by ``caption-coco`` (tiny) is used by ``capfilt run``."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from capfilt.api import RunOptions, run
from capfilt.config import load_preset
from capfilt.train.config import load_recipe
from capfilt.train.loop import train
from tests.helpers.httpserver import ImageServer
from tests.helpers.train import COCO, frequent_word_rate, one_torch_thread  # noqa: F401 (autouse fixture)


def _captions(out) -> dict[str, list[str]]:
    t = ds.dataset(sorted(str(p) for p in out.glob("*.parquet")), format="parquet").to_table()
    return {r["key"]: r["synthetic_captions"] for r in t.to_pylist()}


@pytest.mark.slow
def test_trained_captioner_is_used_by_capfilt_run(tmp_path):
    res = train(load_recipe("tiny-caption-coco"), str(COCO / "captions_val2017.json"), tmp_path / "ckpt")
    preset_path = res.final / "preset.yaml"
    preset = load_preset(str(preset_path))
    assert preset.captioner.id == str((tmp_path / "ckpt" / "final" / "captioner").resolve())

    data = json.loads((COCO / "captions_val2017.json").read_text())
    overrides = ["download.allow_private_network=true", "download.image_size=64", "output.rows_per_shard=8"]
    with ImageServer(root=COCO / "images") as srv:
        rows = [{"url": srv.url(im["file_name"]), "caption": "a photo"} for im in data["images"][:8]]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
        trained = run(RunOptions(inputs=[str(tmp_path / "in.parquet")], output=str(tmp_path / "out_trained"),
                                 models=str(preset_path), overrides=overrides, progress=False))
        untrained = run(RunOptions(inputs=[str(tmp_path / "in.parquet")], output=str(tmp_path / "out_tiny"),
                                   models="tiny", overrides=overrides, progress=False))
    assert trained.record.models["captioner"]["id"] == preset.captioner.id
    a, b = _captions(tmp_path / "out_trained"), _captions(tmp_path / "out_tiny")
    assert sorted(a) == sorted(b) and len(a) == 8
    assert all(len(c) == 1 and c[0].strip() for c in a.values())
    # same rows, same seeds, same filter: only the captioner differs, and so do the captions
    assert sum(a[k] != b[k] for k in a) >= 6
    rate_a = frequent_word_rate([c[0] for c in a.values()])
    rate_b = frequent_word_rate([c[0] for c in b.values()])
    print(f"frequent COCO words in synthetic captions: trained {rate_a:.2f}, untrained {rate_b:.2f}")
    assert rate_a > 2 * rate_b
