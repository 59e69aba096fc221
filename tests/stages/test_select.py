"""The CapFilt decision (BLIP §3.3 threshold, BLIP-2 §3.4 top-k ranking) on hand-made scores."""

from __future__ import annotations

import pyarrow as pa
import pytest

from capfilt.config import SelectConfig
from capfilt.stages.select import SelectStage


def _batch():
    return pa.table({
        "status": ["success", "success", "failed_to_download", "success"],
        "caption": ["web a", "web b", "web c", None],
        "synthetic_captions": [["s1", "s2"], ["s3"], None, ["s4", "s5"]],
        "web_itm": pa.array([0.9, 0.1, None, None], pa.float32()),
        "synthetic_itm": pa.array([[0.4, 0.7], [0.2], None, [0.5, 0.95]], pa.list_(pa.float32())),
        "web_clip": pa.array([0.20, 0.30, None, None], pa.float32()),
        "synthetic_clip": pa.array([[0.25, 0.10], [0.05], None, [0.3, 0.2]], pa.list_(pa.float32())),
    })


def test_itm_threshold_web_and_synthetic_alike():
    out = SelectStage(SelectConfig(itm_threshold=0.5))(_batch())
    assert out.column("captions").to_pylist() == [["web a", "s2"], [], None, ["s5", "s4"]]
    assert out.column("caption_sources").to_pylist() == [["web", "synthetic"], [], None, ["synthetic", "synthetic"]]
    scores = out.column("caption_scores").to_pylist()
    assert scores[0] == pytest.approx([0.9, 0.7]) and scores[3] == pytest.approx([0.95, 0.5])
    assert out.column("keep").to_pylist() == [True, False, False, True]
    assert out.column("drop_reason").to_pylist() == [None, "below_threshold", "not_downloaded", None]


def test_blip2_top2_by_clip_without_threshold():
    out = SelectStage(SelectConfig(itm_threshold=None, rank_by="clip", top_k=2))(_batch())
    assert out.column("captions").to_pylist() == [["s1", "web a"], ["web b", "s3"], None, ["s4", "s5"]]
    assert out.column("keep").to_pylist() == [True, True, False, True]


def test_threshold_changes_are_consistent_with_scores():
    b = _batch()
    for t in (0.0, 0.45, 0.5, 0.9, 0.96):
        out = SelectStage(SelectConfig(itm_threshold=t))(b)
        for i, row in enumerate(out.to_pylist()):
            if row["status"] != "success":
                continue
            cands = ([(row["caption"], row["web_itm"])] if row["caption"] else []) + list(
                zip(row["synthetic_captions"], row["synthetic_itm"]))
            expect = sorted([c for c in cands if c[1] is not None and c[1] >= t], key=lambda c: -c[1])
            assert row["captions"] == [c[0] for c in expect]
            assert row["keep"] == bool(expect)


def test_missing_scores_never_pass_and_download_recipe_keeps_web_caption():
    b = pa.table({"status": ["success"], "caption": ["only web"]})
    out = SelectStage(SelectConfig(itm_threshold=0.5))(b)
    assert out.column("keep").to_pylist() == [False]
    out = SelectStage(SelectConfig(itm_threshold=None))(b)
    assert out.column("captions").to_pylist() == [["only web"]]
    assert out.column("caption_scores").to_pylist() == [[None]]


def test_duplicate_candidates_count_once_so_top2_keeps_the_web_caption():
    """Two samples of the same caption (differing in case, spacing and a final period) must not fill
    BLIP-2's top 2: the old selection kept ["a red circle", "A red  circle."] and dropped the web text."""
    b = pa.table({
        "status": ["success"],
        "caption": ["a red circle on grey"],
        "synthetic_captions": [["a red circle", "A red  circle.", "a blue square"]],
        "web_clip": pa.array([0.30], pa.float32()),
        "synthetic_clip": pa.array([[0.35, 0.34, 0.10]], pa.list_(pa.float32())),
    })
    out = SelectStage(SelectConfig(itm_threshold=None, rank_by="clip", top_k=2))(b)
    assert out.column("captions").to_pylist() == [["a red circle", "a red circle on grey"]]
    assert out.column("caption_sources").to_pylist() == [["synthetic", "web"]]
    assert out.column("caption_scores").to_pylist()[0] == pytest.approx([0.35, 0.30])
    # the setting is recorded in the recipe; off, the old behaviour comes back
    off = SelectStage(SelectConfig(itm_threshold=None, rank_by="clip", top_k=2, dedup_texts=False))(b)
    assert off.column("captions").to_pylist() == [["a red circle", "A red  circle."]]


def test_normalize_text():
    from capfilt.stages.select import normalize_text

    assert normalize_text("  A  Dog\tRuns!! ") == "a dog runs"
    assert normalize_text("a dog runs") == normalize_text("A dog runs.")
    assert normalize_text("a dog, runs") != normalize_text("a dog runs")
