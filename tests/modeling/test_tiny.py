"""The tiny preset builder: deterministic, atomic, loadable through the normal from_pretrained path."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from capfilt.modeling import tiny
from capfilt.modeling.tiny import TINY_NAMES, ensure_tiny_checkpoints


def _build_in(path: str) -> str:
    return str(ensure_tiny_checkpoints(Path(path)))


def test_builds_every_model_with_processor_files(tmp_path):
    root = ensure_tiny_checkpoints(tmp_path)
    assert root == (tmp_path / "tiny-v1").resolve()
    assert (root / "COMPLETE").is_file()
    for name in TINY_NAMES:
        files = {p.name for p in (root / name).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= files, name
    # nothing left behind from the temporary build folder
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-v1"]


def test_default_cache_is_capfilt_cache_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPFILT_CACHE", str(tmp_path / "c"))
    assert tiny.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CAPFILT_CACHE")
    assert tiny.default_cache_dir() == Path.home() / ".cache" / "capfilt"


def test_weights_are_deterministic_and_global_rng_untouched(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = ensure_tiny_checkpoints(tmp_path / "a")
    assert torch.equal(torch.rand(3), expected_next)  # the build forks the RNG
    b = ensure_tiny_checkpoints(tmp_path / "b")
    for name in TINY_NAMES:
        wa, wb = load_file(a / name / "model.safetensors"), load_file(b / name / "model.safetensors")
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_concurrent_builds_race_safely(tmp_path):
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.map(_build_in, [str(tmp_path)] * 2)
    assert results == [str((tmp_path / "tiny-v1").resolve())] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-v1"]
    assert sorted(p.name for p in (tmp_path / "tiny-v1").iterdir()) == ["COMPLETE", *sorted(TINY_NAMES)]


def test_blip_tokenizer_has_full_shipped_vocab_and_blip_specials():
    tok = tiny.blip_tokenizer()
    lines = [t for t in (Path(tiny.__file__).parent / "assets" / "tiny_wordpiece_vocab.txt").read_text().splitlines() if t]
    assert len(tok) == len(lines) > 500  # vocab_file= would silently give 5 tokens
    cfg = tiny.blip_config("tiny")
    assert tok.convert_tokens_to_ids("[DEC]") == cfg.text_config.bos_token_id
    assert tok.convert_tokens_to_ids("[SEP]") == cfg.text_config.sep_token_id
    ids = tok("A man riding a Horse.").input_ids  # lowercased; "horse" is not in the vocab: word-pieces
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "a", "man", "riding", "a", "h", "##o", "##r", "##s", "##e",
                                              ".", "[SEP]"]


def test_clip_and_opt_tokenizers_round_trip():
    clip = tiny.clip_tokenizer()
    assert clip.decode(clip("a dog on the beach").input_ids, skip_special_tokens=True).strip() == "a dog on the beach"
    opt = tiny.opt_tokenizer()
    ids = opt("a dog on the beach").input_ids
    assert ids[0] == opt.bos_token_id
    assert opt.decode(ids, skip_special_tokens=True) == "a dog on the beach"


def test_configs_use_real_initializer_range():
    for size in ("tiny", "base"):
        cfg = tiny.blip_config(size)
        assert cfg.vision_config.initializer_range == 0.02
        assert cfg.text_config.initializer_range == 0.02
    base = tiny.blip_config("base")
    assert (base.vision_config.image_size, base.vision_config.patch_size, base.vision_config.hidden_size) == (384, 16, 768)
    assert (base.text_config.num_hidden_layers, base.text_config.hidden_size) == (12, 768)
    with pytest.raises(ValueError, match="size"):
        tiny.blip_config("huge")  # type: ignore[arg-type]


def test_checkpoints_load_with_from_pretrained():
    from transformers import (Blip2ForConditionalGeneration, Blip2Processor, BlipForConditionalGeneration,
                              BlipForImageTextRetrieval, BlipProcessor, CLIPModel, CLIPProcessor)

    root = ensure_tiny_checkpoints()
    pairs = {"tiny-blip-captioner": (BlipForConditionalGeneration, BlipProcessor),
             "tiny-blip-itm": (BlipForImageTextRetrieval, BlipProcessor),
             "tiny-clip": (CLIPModel, CLIPProcessor),
             "tiny-blip2-captioner": (Blip2ForConditionalGeneration, Blip2Processor)}
    for name, (model_cls, proc_cls) in pairs.items():
        model = model_cls.from_pretrained(root / name)
        proc = proc_cls.from_pretrained(root / name)
        assert sum(p.numel() for p in model.parameters()) < 1_000_000, name
        assert proc.image_processor.size.get("height", proc.image_processor.size.get("shortest_edge")) == 64
