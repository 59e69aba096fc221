"""ScoreStage on real pyarrow batches with the tiny preset (no Ray)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from capfilt.config import ScoreConfig, load_preset
from capfilt.errors import ModelLoadError
from capfilt.schema import FAILED_TO_SCORE, SUCCESS, score_fields
from capfilt.stages.score import ScoreStage

COCO = Path(__file__).resolve().parents[1] / "fixtures" / "coco" / "images"
SYN = [["a dog on a couch", "a plate of food"], [], None, ["a street"], ["x"], ["a train", "a bus", "a cat"]]
WEB = ["a man riding a motorcycle", None, "a pizza", "   ", "broken", "a long web caption " * 40]


def _batch() -> pa.Table:
    jpgs = [f.read_bytes() for f in sorted(COCO.glob("*.jpg"))[:5]]
    images = [jpgs[0], jpgs[1], jpgs[2], jpgs[3], b"\xff\xd8\xff\xe0 truncated jpeg", jpgs[4]]
    return pa.table({
        "key": [f"k{i}" for i in range(6)],
        "caption": WEB,
        "status": [SUCCESS, SUCCESS, SUCCESS, SUCCESS, SUCCESS, SUCCESS],
        "error_message": pa.array([None] * 6, pa.string()),
        "image": pa.array(images, pa.binary()),
        "synthetic_captions": pa.array(SYN, pa.list_(pa.string())),
    })


@pytest.fixture(scope="module")
def stage() -> ScoreStage:
    s = ScoreStage(ScoreConfig(scorers=["itm", "itc", "clip"], batch_size=4), load_preset("tiny"))
    s.setup()
    return s


def test_constructor_is_cheap_and_picklable():
    s = ScoreStage(ScoreConfig(), load_preset("tiny"))
    assert s.scorers == [] and s.shape == "actor_pool" and s.name == "score"
    assert pickle.loads(pickle.dumps(s)).cfg == s.cfg


def test_columns_types_alignment_and_nulls(stage):
    batch = _batch()
    out = stage(batch)
    assert out.num_rows == 6 and out.column("key").to_pylist() == batch.column("key").to_pylist()
    for s in ("itm", "itc", "clip"):
        for field in score_fields(s):
            assert out.schema.field(field.name).type == field.type
    assert out.schema.field("_texts_score").type == pa.int32()
    assert out.schema.field("_seconds_score").type == pa.float64()
    status = out.column("status").to_pylist()
    assert status == [SUCCESS, SUCCESS, SUCCESS, SUCCESS, FAILED_TO_SCORE, SUCCESS]
    assert out.column("error_message")[4].as_py().startswith(("OSError", "ValueError", "SyntaxError"))
    for s in ("itm", "itc", "clip"):
        syn = out.column(f"synthetic_{s}").to_pylist()
        web = out.column(f"web_{s}").to_pylist()
        assert [None if x is None else len(x) for x in syn] == [2, 0, None, 1, None, 3]
        assert [w is None for w in web] == [False, True, False, True, True, False]
    assert out.column("_texts_score").to_pylist() == [3, 0, 1, 1, 0, 4]
    itm = [v for row in out.column("synthetic_itm").to_pylist() if row for v in row]
    assert all(0.0 <= v <= 1.0 for v in itm)


def test_scores_equal_the_scorers_directly(stage):
    out = stage(_batch())
    blip, clip = stage.scorers
    image = Image.open(sorted(COCO.glob("*.jpg"))[0]).convert("RGB")
    direct_blip = blip.score([image], [SYN[0] + [WEB[0]]])[0]
    direct_clip = clip.score([image], [SYN[0] + [WEB[0]]])[0]
    np.testing.assert_allclose(out.column("synthetic_itm")[0].as_py(), direct_blip.itm[:2], atol=1e-6)
    np.testing.assert_allclose(out.column("web_itm")[0].as_py(), direct_blip.itm[2], atol=1e-6)
    np.testing.assert_allclose(out.column("synthetic_itc")[0].as_py(), direct_blip.itc[:2], atol=1e-6)
    np.testing.assert_allclose(out.column("web_clip")[0].as_py(), direct_clip.clip[2], atol=1e-6)


def test_batch_size_does_not_change_scores(stage):
    batch = _batch()
    big = stage(batch)
    small = ScoreStage(stage.cfg.model_copy(update={"batch_size": 1}), stage.preset)
    small.scorers = stage.scorers
    one = small(batch)
    for name in ("synthetic_itm", "web_itm", "synthetic_itc", "web_clip"):
        a, b = big.column(name).to_pylist(), one.column(name).to_pylist()
        for x, y in zip(a, b):
            if x is None or y is None:
                assert x is None and y is None
            else:
                np.testing.assert_allclose(x, y, atol=1e-5)


def test_non_success_rows_untouched_and_missing_synthetic_column(stage):
    batch = _batch().drop_columns(["synthetic_captions"])
    batch = batch.set_column(batch.column_names.index("status"), "status",
                             pa.array(["failed_to_download", SUCCESS, SUCCESS, SUCCESS, SUCCESS, SUCCESS]))
    out = stage(batch)
    assert out.column("status")[0].as_py() == "failed_to_download"
    assert out.column("web_itm")[0].as_py() is None and out.column("synthetic_itm")[0].as_py() is None
    assert out.column("synthetic_itm")[2].as_py() is None  # no synthetic captions at all -> null
    assert out.column("web_itm")[2].as_py() is not None


def test_only_requested_scorers_and_clip_needs_a_clip_model():
    stage = ScoreStage(ScoreConfig(scorers=["itm"]), load_preset("tiny"))
    out = stage(_batch().slice(0, 1))
    assert "synthetic_itm" in out.column_names and "web_itc" not in out.column_names
    no_clip = load_preset("tiny").model_copy(update={"clip": None})
    with pytest.raises(ModelLoadError, match="no clip model"):
        ScoreStage(ScoreConfig(scorers=["clip"]), no_clip).setup()


def test_a_long_web_caption_is_recorded_as_judged_on_its_prefix(stage):
    """ITM/ITC read the first 35 tokens; a 160-word web caption is scored on that prefix and kept whole,
    so the row says so (issue 10 item 13), and the shard stats count it."""
    out = stage(_batch())
    tok = stage.scorers[0].processor.tokenizer
    tokens = out.column("web_text_tokens").to_pylist()
    truncated = out.column("web_text_truncated").to_pylist()
    assert out.schema.field("web_text_tokens").type == pa.int32()
    long_count = len(tok(WEB[5]).input_ids)
    assert long_count > 35 and tokens[5] == long_count and truncated[5] is True
    assert tokens[0] == len(tok(WEB[0]).input_ids) <= 35 and truncated[0] is False
    assert out.column("status").to_pylist()[4] == FAILED_TO_SCORE
    # no web caption (null, blank), or not scored: null
    assert [tokens[i] for i in (1, 3, 4)] == [None, None, None] and [truncated[i] for i in (1, 3, 4)] == [None] * 3
    assert tokens[2] is not None and truncated[2] is False
    assert ScoreStage.stats(out)["web_texts_truncated"] == 1
    # the scores of the long caption are those of its first 35 tokens
    prefix = tok.decode(tok(WEB[5]).input_ids[1:34])
    again = stage(_batch().set_column(1, "caption", pa.array(WEB[:5] + [prefix])))
    assert again.column("web_itm").to_pylist()[5] == pytest.approx(out.column("web_itm").to_pylist()[5], abs=1e-5)
    assert again.column("web_text_truncated").to_pylist()[5] is False


def test_length_fields_are_declared_in_the_output_schema():
    from capfilt.stages.registry import output_schema

    names = output_schema(scorers=["itm", "itc"]).names
    assert names.index("web_itc") < names.index("web_text_tokens") < names.index("web_text_truncated") < names.index("captions")
    assert "web_text_tokens" not in output_schema(scorers=[]).names  # the download recipe scores nothing
