"""The paper recipes on the demo input: BLIP-2 ranking (§3.4) and refiltering stored scores."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from capfilt.api import RunOptions, run
from capfilt.config import ConfigError, load_pipeline
from capfilt.demo import run_demo


def _rows(out: Path) -> list[dict]:
    return ds.dataset(sorted(str(p) for p in out.glob("*.parquet")), format="parquet").to_table().to_pylist()


@pytest.fixture(scope="module")
def blip2_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("blip2") / "out"
    run_demo(out, models="tiny", pipeline="blip2", progress=False, world="photos")
    return out


def test_recipes_are_the_papers():
    blip = load_pipeline("blip")
    assert (blip.caption.num_captions, blip.caption.top_p, blip.caption.repetition_penalty) == (1, 0.9, 1.1)
    assert (blip.caption.max_length, blip.caption.min_length, blip.caption.prompt) == (30, 5, "a picture of ")
    assert blip.caption.num_beams == 1 and blip.select.itm_threshold == 0.5 and blip.select.top_k is None
    assert blip.select.include_web and blip.select.include_synthetic
    blip2 = load_pipeline("blip2")
    assert blip2.caption.num_captions == 10 and "clip" in blip2.score.scorers
    assert (blip2.select.rank_by, blip2.select.top_k, blip2.select.itm_threshold) == ("clip", 2, None)


def test_blip2_top2_by_clip(blip2_out):
    rows = _rows(blip2_out)
    ok = [r for r in rows if r["status"] == "success"]
    assert len(ok) == 6
    for r in ok:
        assert len(r["synthetic_captions"]) == 10
        cands = [(r["caption"], r["web_clip"], "web")] + [
            (c, s, "synthetic") for c, s in zip(r["synthetic_captions"], r["synthetic_clip"])]
        assert len(cands) == 11 and all(s is not None for _, s, _ in cands)
        assert len(r["synthetic_itm"]) == 10 and r["web_itm"] is not None  # ITM stored for refiltering
        top2 = sorted(cands, key=lambda c: -c[1])[:2]
        assert r["captions"] == [c for c, _, _ in top2]
        assert r["caption_sources"] == [src for _, _, src in top2]
        assert r["caption_scores"] == pytest.approx([s for _, s, _ in top2])
        assert r["keep"] is True


def test_refilter_threshold_consistent_and_model_free(blip2_out, tmp_path, monkeypatch):
    import capfilt.modeling.loading as loading

    def no_models(*a, **k):
        raise AssertionError("refilter must not load a model")

    monkeypatch.setattr(loading, "load_pretrained", no_models)
    t0 = time.time()
    res = run(RunOptions(inputs=[str(blip2_out)], output=str(tmp_path / "re"), pipeline="refilter",
                         overrides=["select.itm_threshold=0.9"], progress=False))
    assert time.time() - t0 < 30
    old = {r["key"]: r for r in _rows(blip2_out)}
    new = _rows(tmp_path / "re")
    assert len(new) == len(old) == res.totals["rows"]
    changed = 0
    for r in new:
        o = old[r["key"]]
        for col in ("synthetic_captions", "synthetic_itm", "web_itm", "synthetic_clip", "image", "status"):
            assert r[col] == o[col]
        if r["status"] != "success":
            assert r["keep"] is False and r["drop_reason"] == "not_downloaded"
            continue
        cands = [(r["caption"], r["web_itm"])] + list(zip(r["synthetic_captions"], r["synthetic_itm"]))
        expect = sorted([c for c in cands if c[1] >= 0.9], key=lambda c: -c[1])
        assert r["captions"] == [c for c, _ in expect]
        assert r["keep"] == bool(expect)
        changed += r["captions"] != o["captions"]
    assert changed > 0  # the new threshold really re-decided rows


def test_refilter_says_when_a_score_was_never_computed(tmp_path):
    out = tmp_path / "blip"
    run_demo(out, models="tiny", pipeline="blip", progress=False, world="photos")
    with pytest.raises(ConfigError, match="no stored clip scores"):
        run(RunOptions(inputs=[str(out)], output=str(tmp_path / "re"), pipeline="refilter",
                       overrides=["select.rank_by=clip", "select.itm_threshold=null"], progress=False))


def test_blip2_captioner_preset_runs_end_to_end(tmp_path):
    out = tmp_path / "b2"
    res = run_demo(out, models="tiny-blip2", pipeline="blip", progress=False, world="photos")
    assert res.record.models["captioner"]["kind"] == "blip2"
    ok = [r for r in _rows(out) if r["status"] == "success"]
    assert len(ok) == 6 and all(len(r["synthetic_captions"]) == 1 and r["synthetic_captions"][0] for r in ok)
