"""The captioner: equal to a direct generate call with the same seed, independent of batch composition,
beam search and sampling at several batch sizes, prompt stripped, num_captions respected."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from capfilt.config import ModelPreset, load_preset
from capfilt.modeling.batching import run_with_oom_backoff
from capfilt.modeling.captioner import Blip2Captioner, BlipCaptioner, Decoding, PerRowSampler, load_captioner

COCO = Path(__file__).resolve().parents[1] / "fixtures" / "coco" / "images"
SEEDS = [101, 202, 303, 404, 505]


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [Image.open(f).convert("RGB") for f in sorted(COCO.glob("*.jpg"))[:5]]


@pytest.fixture(scope="module")
def captioner() -> BlipCaptioner:
    preset = load_preset("tiny")
    cap = load_captioner(preset.captioner, preset)
    assert type(cap) is BlipCaptioner
    return cap


def _direct(cap: BlipCaptioner, image, seed: int, cfg: Decoding) -> list[str]:
    """The plain transformers call (model card usage) with the BLIP/LAVIS decoding settings."""
    inputs = cap.processor(images=image, text=cfg.prompt, return_tensors="pt")
    kw = dict(max_length=cfg.max_length, min_length=cfg.min_length, repetition_penalty=cfg.repetition_penalty,
              num_return_sequences=cfg.num_captions)
    if cfg.num_beams > 1:
        kw.update(num_beams=cfg.num_beams, do_sample=False)
    else:
        kw.update(do_sample=True, top_p=cfg.top_p)
    torch.manual_seed(seed)
    out = cap.model.generate(**inputs, **kw)
    prefix = cfg.prompt.strip()
    texts = cap.processor.batch_decode(out, skip_special_tokens=True)
    assert all(t.startswith(prefix) for t in texts)
    return [t[len(prefix):].strip() for t in texts]


@pytest.mark.parametrize("num_captions", [1, 3])
def test_equals_direct_generate_with_same_seed(captioner, images, num_captions):
    cfg = Decoding(num_captions=num_captions, batch_size=4)
    batched = captioner.generate(images, SEEDS, cfg)
    for image, seed, caps in zip(images, SEEDS, batched):
        assert caps == _direct(captioner, image, seed, cfg)


def test_beam_search_equals_direct_generate(captioner, images):
    cfg = Decoding(num_beams=3, num_captions=2, batch_size=4)
    batched = captioner.generate(images[:4], SEEDS[:4], cfg)
    for image, seed, caps in zip(images, SEEDS, batched):
        assert caps == _direct(captioner, image, seed, cfg)


def test_batch_composition_does_not_change_a_rows_captions(captioner, images):
    cfg = Decoding(num_captions=2, batch_size=8)
    full = captioner.generate(images, SEEDS, cfg)
    reordered = captioner.generate([images[3], images[0]], [SEEDS[3], SEEDS[0]], cfg)
    assert reordered == [full[3], full[0]]
    duplicated = captioner.generate([images[2], images[2]], [SEEDS[2], 999], cfg)
    assert duplicated[0] == full[2]
    assert duplicated[1] != full[2]  # same image, other seed: other samples


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batch_size_1_and_4_agree(captioner, images, num_beams):
    one = captioner.generate(images, SEEDS, Decoding(num_beams=num_beams, num_captions=1, batch_size=1))
    four = captioner.generate(images, SEEDS, Decoding(num_beams=num_beams, num_captions=1, batch_size=4))
    assert one == four
    assert all(len(c) == 1 and c[0] for c in one)


def test_prompt_stripped_and_lengths(captioner, images):
    cfg = Decoding(num_captions=4, max_length=12, min_length=8)
    caps = captioner.generate(images[:2], SEEDS[:2], cfg)
    assert [len(c) for c in caps] == [4, 4]
    for text in (t for c in caps for t in c):
        assert not text.startswith("a picture of")
        ids = captioner.processor.tokenizer(text, add_special_tokens=False).input_ids
        prompt_len = 4  # [DEC] a picture of
        assert len(ids) <= cfg.max_length - prompt_len
    other = captioner.generate(images[:1], SEEDS[:1], Decoding(prompt="", max_length=10))
    assert len(other[0]) == 1 and other[0][0]


def test_deterministic_across_calls_and_seed_sensitive(captioner, images):
    cfg = Decoding(num_captions=2)
    assert captioner.generate(images[:2], SEEDS[:2], cfg) == captioner.generate(images[:2], SEEDS[:2], cfg)
    assert captioner.generate(images[:1], [1], cfg) != captioner.generate(images[:1], [2], cfg)
    with pytest.raises(ValueError, match="2 images but 1 seeds"):
        captioner.generate(images[:2], [1], cfg)


def test_image_keys_values_projected_once_per_image(captioner, images):
    """The cross-attention K/V of an image are computed once, not once per caption; same captions."""
    key = captioner.model.text_decoder.bert.encoder.layer[0].crossattention.self.key
    rows: list[int] = []
    handle = key.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    cfg = Decoding(num_captions=5, batch_size=4)
    try:
        shared = captioner.generate(images[:3], SEEDS[:3], cfg)
        assert rows == [3]
        rows.clear()
        plain = BlipCaptioner(captioner.model, captioner.processor, share_cross_kv=False)
        assert plain.generate(images[:3], SEEDS[:3], cfg) == shared
        assert rows == [15]  # what generate does alone: one projection per returned sequence
    finally:
        handle.remove()


def test_per_row_sampler_forces_one_token_per_row():
    torch.manual_seed(0)
    scores = torch.randn(4, 50)
    sampler = PerRowSampler([7, 8], rows_per_image=2, temperature=0.7, top_k=50, top_p=0.9, device="cpu")
    out = sampler(torch.zeros(4, 3, dtype=torch.long), scores.clone())
    assert torch.isfinite(out).sum(dim=1).tolist() == [1, 1, 1, 1]
    # image 1's draws depend only on its own generator and rows
    alone = PerRowSampler([8], rows_per_image=2, temperature=0.7, top_k=50, top_p=0.9, device="cpu")
    out1 = alone(torch.zeros(2, 3, dtype=torch.long), scores[2:].clone())
    assert torch.equal(out[2:].argmax(1), out1.argmax(1))


def test_oom_backoff_halves_and_logs(caplog):
    calls = []

    def fn(part):
        calls.append(len(part))
        if len(part) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 10 for x in part]

    with caplog.at_level(logging.WARNING):
        out = run_with_oom_backoff(fn, list(range(7)), 8, what="captioner")
    assert out == [x * 10 for x in range(7)]
    assert calls == [7, 4, 2, 2, 2, 1]
    assert "retrying with batch size 4" in caplog.text and "retrying with batch size 2" in caplog.text

    def boom(part):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        run_with_oom_backoff(boom, [1, 2], 2)


def test_blip2_captioner_tiny(images):
    preset = ModelPreset.model_validate({"name": "t", "builder": "tiny",
                                         "captioner": {"id": "tiny-blip2-captioner", "kind": "blip2"},
                                         "filter": {"id": "tiny-blip-itm"}})
    cap = load_captioner(preset.captioner, preset)
    assert isinstance(cap, Blip2Captioner)
    cfg = Decoding(num_captions=3, max_length=8, batch_size=4)
    together = cap.generate(images[:3], SEEDS[:3], cfg)
    assert [len(c) for c in together] == [3, 3, 3]
    assert [cap.generate([im], [s], cfg)[0] for im, s in zip(images[:3], SEEDS[:3])] == together
    beams = cap.generate(images[:2], SEEDS[:2], Decoding(num_beams=2, num_captions=2, max_length=8))
    assert [len(c) for c in beams] == [2, 2]


def test_clip_kind_is_not_a_captioner():
    from capfilt.errors import ModelLoadError

    preset = load_preset("tiny")
    with pytest.raises(ModelLoadError, match="kind 'clip'"):
        load_captioner(preset.clip, preset)
