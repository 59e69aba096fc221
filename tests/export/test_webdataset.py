"""``capfilt export --format webdataset``: the tars read back with ``webdataset`` hold exactly the
source's kept rows (keys, image bytes, kept captions), ``--all`` every row with an image, in the
layout open_clip's loader reads, with counts that add up."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.export.helpers import cli, decodes, read_tars, source_rows, stats
from tests.helpers.report_fixture import make_output

pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """A blip-scored output: 120 rows in 3 parts of 50/50/20, ~12 % failed downloads, some not kept."""
    return make_output(tmp_path_factory.mktemp("src") / "out", rows=120, rows_per_shard=50, noise_col="noise_type")


def test_kept_rows_read_back_with_webdataset(out, tmp_path):
    dest = tmp_path / "wds"
    r = cli(out, "--to", dest)
    assert r.exit_code == 0, r.output
    rows = source_rows(out)
    kept = [x for x in rows if x["keep"]]
    assert 0 < len(kept) < len(rows)
    samples = read_tars(dest)
    assert [s["__key__"] for s in samples] == [x["key"] for x in kept]
    for s, x in zip(samples, kept):
        assert s["jpg"] == x["image"]                       # the stored bytes, untouched
        assert s["txt"].decode() == x["captions"][0]        # the best kept caption
        meta = json.loads(s["json"])
        assert meta["captions"] == x["captions"] and meta["caption_sources"] == x["caption_sources"]
        assert meta["caption_scores"] == pytest.approx(x["caption_scores"])
        assert meta["caption"] == x["caption"] and meta["synthetic_captions"] == x["synthetic_captions"]
        assert meta["web_itm"] == pytest.approx(x["web_itm"]) and meta["synthetic_itm"] == pytest.approx(x["synthetic_itm"])
        assert (meta["key"], meta["url"], meta["status"]) == (x["key"], x["url"], "success")
        assert meta["noise_type"] == x["noise_type"]        # pass-through metadata
        assert meta["text_source"] == f"kept:{x['caption_sources'][0]}"
        assert "image" not in meta
    assert decodes(samples[0]["jpg"]) == (kept[0]["width"], kept[0]["height"])

    st = stats(dest)
    assert sorted(st) == ["00000", "00001", "00002"]
    assert [v["rows_in"] for v in st.values()] == [50, 50, 20]
    assert sum(v["written"] for v in st.values()) == len(kept)
    reasons = Counter(f"not_kept:{x['drop_reason']}" for x in rows if not x["keep"])
    assert sum((Counter(v["filtered"]) for v in st.values()), Counter()) == reasons
    for v in st.values():
        assert v["rows_in"] == v["written"] + sum(v["filtered"].values())
    assert json.loads((dest / "sizes.json").read_text()) == {f"{k}.tar": v["written"] for k, v in st.items()}
    summary = json.loads((dest / "_capfilt" / "export.json").read_text())
    assert summary["status"] == "complete" and summary["totals"]["rows_in"] == 120
    assert summary["totals"]["written"] == len(kept) and summary["train_data"] == f"{dest}/{{00000..00002}}.tar"
    assert "{00000..00002}.tar" in r.output and "total" in r.output


def test_all_exports_every_row_with_an_image(out, tmp_path):
    dest = tmp_path / "wds-all"
    r = cli(out, "--to", dest, "--all")
    assert r.exit_code == 0, r.output
    rows = source_rows(out)
    with_image = [x for x in rows if x["image"]]
    assert any(not x["keep"] for x in with_image)  # --all adds rows the filter dropped
    samples = read_tars(dest)
    assert [s["__key__"] for s in samples] == [x["key"] for x in with_image]
    assert all(s["jpg"] == x["image"] for s, x in zip(samples, with_image))
    for s, x in zip(samples, with_image):  # a dropped row still gets a caption: its web caption, else a synthetic one
        want = x["captions"][0] if x["captions"] else (x["caption"] or x["synthetic_captions"][0])
        assert s["txt"].decode() == want
    missing = Counter(f"no_image:{x['status']}" for x in rows if not x["image"])
    assert sum((Counter(v["filtered"]) for v in stats(dest).values()), Counter()) == missing


def test_open_clip_reads_the_layout(out, tmp_path):
    """open_clip's webdataset pipeline (open_clip_train/data.py): samples need ``txt`` and one of
    ``jpg;png;jpeg;webp``, are decoded with ``pilrgb`` and renamed ``image``/``text``; the shard
    count comes from ``sizes.json`` beside the shards; ``--json-text-key caption`` reads a JSON field."""
    import braceexpand
    import webdataset as wds

    dest = tmp_path / "wds"
    assert cli(out, "--to", dest).exit_code == 0
    train_data = json.loads((dest / "_capfilt" / "export.json").read_text())["train_data"]
    urls = list(braceexpand.braceexpand(train_data))
    assert [Path(u).name for u in urls] == ["00000.tar", "00001.tar", "00002.tar"]
    sizes = json.loads((dest / "sizes.json").read_text())
    total = sum(int(sizes[Path(u).name]) for u in urls)       # open_clip's get_dataset_size
    pipeline = (wds.WebDataset(urls, shardshuffle=False)
                .select(lambda s: "txt" in s and any(k in s for k in ("jpg", "png", "jpeg", "webp")))
                .decode("pilrgb").rename(image="jpg;png;jpeg;webp", text="txt").to_tuple("image", "text"))
    got = list(pipeline)
    assert len(got) == total == sum(1 for x in source_rows(out) if x["keep"])
    assert all(im.mode == "RGB" and im.size[0] > 0 and isinstance(t, str) and t for im, t in got)
    by_json = [json.loads(s["json"]).get("caption") for s in wds.WebDataset(urls, shardshuffle=False)]
    assert by_json == [x["caption"] for x in source_rows(out) if x["keep"]]


def test_download_only_output_exports_every_downloaded_image(tmp_path):
    """No select stage (no ``keep``): every ``success`` row is exported with its web caption as ``txt``;
    the rows without an image are counted as ``no_image:<status>``."""
    out = make_output(tmp_path / "out", rows=40, rows_per_shard=40, recipe="download", seed=5)
    r = cli(out, "--to", tmp_path / "wds")
    assert r.exit_code == 0, r.output
    rows = source_rows(out)
    ok = [x for x in rows if x["status"] == "success"]
    samples = read_tars(tmp_path / "wds")
    assert [s["__key__"] for s in samples] == [x["key"] for x in ok]
    assert [s["txt"].decode() for s in samples] == [x["caption"] or "" for x in ok]
    assert [json.loads(s["json"])["text_source"] for s in samples] == ["web" if x["caption"] else "none" for x in ok]
    want = Counter(f"no_image:{x['status']}" for x in rows if x["status"] != "success")
    assert stats(tmp_path / "wds")["00000"]["filtered"] == dict(sorted(want.items())) and want
