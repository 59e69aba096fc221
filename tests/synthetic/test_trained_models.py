"""Tests that random weights could not support, on the ``shapes`` preset (models capfilt trained on its
own synthetic world, shipped in models/shapes/ and loaded through the same from_pretrained path as Hub
checkpoints). Images and captions come from a world seed the models never saw.

Every test here can tell a right answer from a wrong one: a swapped image, a one-attribute-wrong
caption or junk must score lower than the true caption, and the exact-match checks parse the
generated captions back into objects.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from capfilt.config import load_pipeline, load_preset
from capfilt.stages.caption import decoding_of
from capfilt.synthetic.evaluate import caption_report
from capfilt.synthetic.splits import generate
from capfilt.synthetic.world import describe, make_noisy, parse_caption

SEED = 4242  # not a seed the shipped models were trained on (seed 0)
#: Decision threshold for these tests: the one `capfilt report --label-col noise_type` suggests for the
#: shipped filter (its ITM is under-confident at BLIP's 0.5 after a CPU-sized training; RESULTS.md).
THRESHOLD = 0.25


@pytest.fixture(scope="module")
def preset():
    return load_preset("shapes")


@pytest.fixture(scope="module")
def scorer(preset):
    from capfilt.modeling.blip_scorer import BlipScorer

    return BlipScorer.from_spec(preset.filter, preset)


@pytest.fixture(scope="module")
def captioner(preset):
    from capfilt.modeling.captioner import BlipCaptioner

    return BlipCaptioner.from_spec(preset.captioner, preset)


@pytest.fixture(scope="module")
def world():
    """48 clean test rows: (PIL image, true content, exact caption, one-attribute-wrong caption, junk)."""
    from capfilt.synthetic.evaluate import decode

    rows = list(generate("test", 48, seed=SEED))
    rng = np.random.default_rng(SEED)
    images = decode([r.image for r in rows])
    contents = [r.scene.content() for r in rows]
    return {"images": images, "contents": contents,
            "true": [describe(c, rng) for c in contents],
            "wrong_attribute": [make_noisy("wrong_attribute", c, rng) for c in contents],
            "junk": [make_noisy("junk", c, rng) for c in contents]}


def _itm(scorer, images, texts):
    return np.array([float(r.itm[0]) for r in scorer.score(images, [[t] for t in texts])])


def test_itm_keeps_true_captions_and_drops_them_on_a_swapped_image(scorer, world):
    imgs, true = world["images"], world["true"]
    own = _itm(scorer, imgs, true)
    # each caption scored against another image whose content differs (the "unrelated" web case)
    n = len(imgs)
    other = [next(j for j in range(i + 1, i + n) if world["contents"][j % n] != world["contents"][i]) % n
             for i in range(n)]
    swapped = _itm(scorer, [imgs[j] for j in other], true)
    assert (own >= THRESHOLD).mean() >= 0.8, own
    assert (swapped < THRESHOLD).mean() >= 0.85, swapped
    assert ((own >= THRESHOLD) != (swapped >= THRESHOLD)).mean() >= 0.7  # the image changes the decision
    assert (own > swapped).mean() >= 0.9


def test_itm_ranks_the_true_caption_above_one_wrong_attribute_and_junk(scorer, world):
    own = _itm(scorer, world["images"], world["true"])
    wrong = _itm(scorer, world["images"], world["wrong_attribute"])
    junk = _itm(scorer, world["images"], world["junk"])
    assert (own > wrong).mean() >= 0.7, (own, wrong)
    assert (junk < 0.5).mean() >= 0.95
    assert (own > junk).mean() >= 0.95


def test_batch_1_and_16_give_the_same_scores_and_keep_decisions(scorer, world):
    imgs, texts = world["images"][:16], [[t, w] for t, w in zip(world["true"][:16], world["wrong_attribute"][:16])]
    batched = scorer.score(imgs, texts)
    single = [scorer.score([im], [ts])[0] for im, ts in zip(imgs, texts)]
    b = np.stack([r.itm for r in batched])
    s = np.stack([r.itm for r in single])
    np.testing.assert_allclose(b, s, atol=1e-5)
    assert ((b >= THRESHOLD) == (s >= THRESHOLD)).all()
    np.testing.assert_allclose(np.stack([r.itc for r in batched]), np.stack([r.itc for r in single]), atol=1e-5)
    assert (b[:, 0] > b[:, 1]).mean() >= 0.6  # and the scores are discriminative, not flat


def test_multi_image_grouping_and_text_chunk_boundary(scorer, world, monkeypatch):
    """Texts of one image split across text chunks (chunk 5, 3 texts per image) score as with one
    chunk and as the naive per-pair forward; the true caption beats junk everywhere and a
    one-attribute-wrong caption on most images."""
    import capfilt.modeling.blip_scorer as bs

    imgs = world["images"][:16]
    texts = [[w, t, j] for w, t, j in zip(world["wrong_attribute"][:16], world["true"][:16], world["junk"][:16])]
    whole = np.stack([r.itm for r in scorer.score(imgs, texts)])
    monkeypatch.setattr(bs, "TEXT_CHUNK", 5)
    chunked = np.stack([r.itm for r in scorer.score(imgs, texts)])
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    naive = np.array([[bs.naive_scores(scorer.model, scorer.processor, im, t)[0] for t in ts]
                      for im, ts in zip(imgs, texts)])
    np.testing.assert_allclose(whole, naive, atol=1e-4)
    assert (whole[:, 1] > whole[:, 2]).all(), whole  # true caption above junk on every image
    assert (whole[:, 1] > whole[:, 0]).mean() >= 0.6, whole  # and above a one-attribute-wrong one mostly


def test_captioner_writes_correct_captions_batch_independent(captioner, world):
    dec = decoding_of(load_pipeline("blip").caption)
    seeds = list(range(100, 100 + 32))
    imgs = world["images"][:32]
    b16 = captioner.generate(imgs, seeds, replace(dec, batch_size=16))
    b1 = captioner.generate(imgs, seeds, replace(dec, batch_size=1))
    assert b16 == b1
    caps = [c[0] for c in b16]
    contents = world["contents"][:32]
    rep = caption_report(caps, contents)
    assert rep["exact"] >= 0.05 and rep["colors"] >= 0.5 and rep["count"] >= 0.55, list(zip(caps, contents))
    # the captions describe *their* image: against the next image's content they are far worse
    def colours(c: Counter) -> Counter:
        return Counter(k[0] for k in c.elements())

    own = np.mean([colours(parse_caption(c)) == colours(contents[i]) for i, c in enumerate(caps)])
    shifted = np.mean([colours(parse_caption(c)) == colours(contents[(i + 1) % 32]) for i, c in enumerate(caps)])
    assert own >= shifted + 0.4, (own, shifted)


def test_trained_checkpoint_reloads_as_a_preset_whose_captions_end_properly(tmp_path, preset):
    """`capfilt train caption` on a few human pairs from the shapes captioner writes final/preset.yaml;
    loaded through load_preset + from_pretrained, its captions end with [SEP] before max_length and
    still describe the image."""
    from capfilt.modeling.captioner import BlipCaptioner
    from capfilt.synthetic.evaluate import decode
    from capfilt.synthetic.splits import write_split
    from capfilt.train.config import load_recipe
    from capfilt.train.loop import train

    write_split(tmp_path / "human", "human", 64, seed=SEED)
    rec = load_recipe("shapes-caption", {"model.captioner": preset.captioner.id, "train.max_steps": 4,
                                         "train.batch_size": 16, "optim.lr": 1e-5, "optim.warmup_steps": 0,
                                         "data.num_workers": 0})
    res = train(rec, str(tmp_path / "human" / "captions.json"), tmp_path / "ckpt", echo=None)
    assert res.preset is not None and res.preset.is_file()
    p = load_preset(str(res.preset))
    cap = BlipCaptioner.from_spec(p.captioner, p)
    rows = list(generate("test", 12, seed=SEED + 1))
    cfg = load_pipeline("blip").caption
    texts = [c[0] for c in cap.generate(decode([r.image for r in rows]), list(range(12)), decoding_of(cfg))]
    ids = cap.processor.tokenizer(texts).input_ids
    assert all(len(i) < cfg.max_length - 3 for i in ids), texts  # ended by [SEP], not cut at max_length
    assert all(parse_caption(t) for t in texts), texts  # each names at least one object
    colours = [Counter(k[0] for k in parse_caption(t).elements()) == Counter(k[0] for k in r.scene.content().elements())
               for t, r in zip(texts, rows)]
    assert np.mean(colours) >= 0.4, texts  # still describes the image after the finetuning steps
    assert Counter(texts).most_common(1)[0][1] <= 4  # not one caption for every image
