"""BLIP ITM/ITC and CLIP scorers: equal to the plain transformers call, to the naive per-pair forward,
independent of batching and padding, sensitive to the image, robust to long captions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capfilt.config import load_preset
from capfilt.modeling.blip_scorer import BlipScorer, naive_scores
from capfilt.modeling.clip_scorer import ClipScorer
from capfilt.modeling.tiny import ensure_tiny_checkpoints, random_blip

COCO = Path(__file__).resolve().parents[1] / "fixtures" / "coco" / "images"
TEXTS = [
    ["a man riding a motorcycle down a street", "two dogs playing in the snow",
     "a plate of food with broccoli and rice on a wooden table near a window"],
    ["a pizza", "a cat sitting on a laptop keyboard"],
    ["a group of people standing next to a train at a station platform", "a", "a clock tower"],
]


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    files = sorted(COCO.glob("*.jpg"))[:3]
    return [Image.open(f).convert("RGB") for f in files]


@pytest.fixture(scope="module")
def blip_scorer() -> BlipScorer:
    preset = load_preset("tiny")
    return BlipScorer.from_spec(preset.filter, preset)


@pytest.fixture(scope="module")
def clip_scorer() -> ClipScorer:
    preset = load_preset("tiny")
    return ClipScorer.from_spec(preset.clip, preset)


def test_itm_equals_direct_transformers_call(blip_scorer, images):
    """Acceptance: the wrapper's ITM probabilities equal BlipForImageTextRetrieval called directly."""
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    path = ensure_tiny_checkpoints() / "tiny-blip-itm"
    model = BlipForImageTextRetrieval.from_pretrained(path).eval()
    proc = BlipProcessor.from_pretrained(path)
    results = blip_scorer.score(images, TEXTS)
    for image, texts, res in zip(images, TEXTS, results):
        inputs = proc(images=[image] * len(texts), text=texts, return_tensors="pt", padding=True)
        inputs["input_ids"][:, 0] = blip_scorer.itm_prefix_id  # [ENC]: the tiny tokenizer has it (BLIP's ITM input)
        with torch.no_grad():
            direct = torch.softmax(model(**inputs).itm_score, dim=-1)[:, 1].numpy()
        assert res.itm.dtype == np.float32 and res.itm.shape == (len(texts),)
        np.testing.assert_allclose(res.itm, direct, atol=1e-5, rtol=0)


def test_optimized_equals_naive_per_pair_forward_tiny(blip_scorer, images):
    results = blip_scorer.score(images, TEXTS)
    for image, texts, res in zip(images, TEXTS, results):
        naive = np.array([naive_scores(blip_scorer.model, blip_scorer.processor, image, t,
                                       itm_prefix_id=blip_scorer.itm_prefix_id) for t in texts])
        np.testing.assert_allclose(res.itm, naive[:, 0], atol=1e-4, rtol=0)
        np.testing.assert_allclose(res.itc, naive[:, 1], atol=1e-4, rtol=0)
        assert np.all((res.itm >= 0) & (res.itm <= 1)) and np.all(np.abs(res.itc) <= 1 + 1e-6)


def test_optimized_equals_naive_blip_base_sized(images):
    """Same equivalence on a BLIP-base-shaped model (ViT-B/16 384 px, BERT-base) with random weights."""
    from transformers import BlipForImageTextRetrieval

    model, proc = random_blip(BlipForImageTextRetrieval, "base", seed=0)
    scorer = BlipScorer(model, proc)
    texts = [TEXTS[0]]
    res = scorer.score(images[:1], texts)[0]
    naive = np.array([naive_scores(model, proc, images[0], t, itm_prefix_id=scorer.itm_prefix_id) for t in texts[0]])
    np.testing.assert_allclose(res.itm, naive[:, 0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(res.itc, naive[:, 1], atol=1e-4, rtol=0)
    wrong = scorer.score(images[1:2], texts)[0]
    assert np.max(np.abs(wrong.itc - res.itc)) > 1e-3  # the image matters at this size too


def test_batched_equals_one_at_a_time_whatever_the_padding(blip_scorer, images):
    together = blip_scorer.score(images, TEXTS)
    for image, texts, res in zip(images, TEXTS, together):
        alone = blip_scorer.score([image], [texts])[0]
        np.testing.assert_allclose(res.itm, alone.itm, atol=1e-5, rtol=0)
        np.testing.assert_allclose(res.itc, alone.itc, atol=1e-5, rtol=0)
        for j, t in enumerate(texts):  # a text alone has no padding at all
            single = blip_scorer.score([image], [[t]])[0]
            np.testing.assert_allclose(single.itm[0], res.itm[j], atol=1e-5, rtol=0)
            np.testing.assert_allclose(single.itc[0], res.itc[j], atol=1e-5, rtol=0)


def test_wrong_image_changes_scores(blip_scorer, images):
    right = blip_scorer.score(images[:2], [TEXTS[0], TEXTS[0]])
    swapped = blip_scorer.score(images[1::-1], [TEXTS[0], TEXTS[0]])
    np.testing.assert_allclose(swapped[1].itm, right[0].itm, atol=1e-6)
    assert np.max(np.abs(right[0].itm - right[1].itm)) > 1e-4
    assert np.max(np.abs(right[0].itc - right[1].itc)) > 1e-3


def test_long_caption_is_truncated_not_crashing(blip_scorer, images):
    long_text = "dog " * 500
    res = blip_scorer.score(images[:1], [[long_text, "dog " * 33]])[0]  # [CLS] + 33 words + [SEP] = 35
    assert res.itm[0] == pytest.approx(res.itm[1], abs=1e-6)
    assert res.itc[0] == pytest.approx(res.itc[1], abs=1e-6)
    assert blip_scorer.tokenize([long_text])[0].shape == (1, 35)


def test_empty_text_lists_and_subset_of_scorers(images):
    preset = load_preset("tiny")
    scorer = BlipScorer.from_spec(preset.filter, preset, scorers=["itc"])
    res = scorer.score(images[:2], [[], ["a dog"]])
    assert res[0].itc.shape == (0,) and res[0].itm is None
    assert res[1].itc.shape == (1,) and res[1].itm is None
    assert scorer.score([], []) == []
    with pytest.raises(ValueError, match="2 images but 1"):
        scorer.score(images[:2], [["a"]])
    with pytest.raises(ValueError, match="clip"):
        BlipScorer(scorer.model, scorer.processor, scorers=["clip"])


def test_clip_equals_clipmodel_logits_over_scale(clip_scorer, images):
    res = clip_scorer.score(images, TEXTS)
    for image, texts, r in zip(images, TEXTS, res):
        inputs = clip_scorer.processor(images=image, text=texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = clip_scorer.model(**inputs)
            direct = (out.logits_per_image / clip_scorer.model.logit_scale.exp())[0].numpy()
        assert r.clip.dtype == np.float32 and r.itm is None
        np.testing.assert_allclose(r.clip, direct, atol=1e-5, rtol=0)
    alone = clip_scorer.score(images[1:2], TEXTS[1:2])[0]
    np.testing.assert_allclose(alone.clip, res[1].clip, atol=1e-5)
    other = clip_scorer.score(images[:1], TEXTS[1:2])[0]
    assert np.max(np.abs(other.clip - res[1].clip)) > 1e-3


def test_clip_truncates_to_context(clip_scorer, images):
    res = clip_scorer.score(images[:1], [["a dog " * 300]])[0]
    assert res.clip.shape == (1,) and np.isfinite(res.clip).all()
    assert clip_scorer.max_text_tokens == 77
