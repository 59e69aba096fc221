"""BLIP trainers on the tiny models: pre-training (ITC + ITM + LM), COCO captioner and filter finetuning."""

from __future__ import annotations

import json

import pytest
import torch

from capfilt.config import load_preset
from capfilt.train.blip import BlipCollator, itc_loss, itm_pairs
from capfilt.train.config import load_recipe
from capfilt.train.loop import train
from capfilt.train.builders import build_task
from tests.helpers.train import COCO, frequent_word_rate, loss_trend, make_shards, one_torch_thread  # noqa: F401 (autouse fixture)

COCO_JSON = str(COCO / "captions_val2017.json")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    make_shards(out)
    return out


@pytest.fixture(scope="module")
def pretrain_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("blip-pretrain")
    return train(load_recipe("tiny-blip-pretrain"), str(shards), out), out


@pytest.fixture(scope="module")
def caption_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("caption-coco")
    return train(load_recipe("tiny-caption-coco"), COCO_JSON, out), out


def test_pretrain_50_steps_lowers_itc_itm_lm(pretrain_run):
    res, out = pretrain_run
    assert res.step == 50 and [r["step"] for r in res.history] == list(range(1, 51))
    trend = loss_trend(res.history, ("itc", "itm", "lm"))
    for o, (start, end) in trend.items():
        assert end < start, (o, start, end)
    for row in res.history:
        assert row["loss"] == pytest.approx(row["itc"] + row["itm"] + row["lm"], abs=1e-4)
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 51)) and logged[-1]["lm"] == res.history[-1]["lm"]
    # cosine after 5 warm-up steps: peak at step 5, zero at the end
    lrs = [r["lr"] for r in res.history]
    assert lrs[4] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_pretrain_checkpoints_are_hf_models_and_a_preset(pretrain_run):
    from transformers import (BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor)

    res, out = pretrain_run
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000025", "step-00000050"]
    cap = BlipForConditionalGeneration.from_pretrained(out / "final" / "captioner").eval()
    flt = BlipForImageTextRetrieval.from_pretrained(out / "final" / "filter").eval()
    proc = BlipProcessor.from_pretrained(out / "final" / "captioner")
    # the shared parts were saved identically in both folders
    assert torch.equal(cap.vision_model.embeddings.patch_embedding.weight,
                       flt.vision_model.embeddings.patch_embedding.weight)
    assert torch.equal(cap.text_decoder.bert.encoder.layer[1].intermediate.dense.weight,
                       flt.text_encoder.encoder.layer[1].intermediate.dense.weight)
    assert not torch.equal(cap.text_decoder.bert.encoder.layer[1].attention.self.query.weight,
                           flt.text_encoder.encoder.layer[1].attention.self.query.weight)
    from PIL import Image

    image = Image.open(COCO / "images" / "000000000139.jpg")
    inputs = proc(images=image, text="a picture of ", return_tensors="pt")
    ids = cap.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert ids.shape[0] == 1 and ids.shape[1] > inputs["input_ids"].shape[1] - 1
    itm = flt(**proc(images=image, text="a person in a kitchen", return_tensors="pt")).itm_score
    assert itm.shape == (1, 2) and torch.isfinite(itm).all()
    preset = load_preset(str(out / "final" / "preset.yaml"))
    assert preset.captioner.id == str((out / "final" / "captioner").resolve())
    assert preset.filter.id == str((out / "final" / "filter").resolve()) and preset.clip is not None


def test_text_encoder_and_decoder_share_all_but_self_attention():
    task = build_task(load_recipe("tiny-blip-pretrain"))
    enc, dec = task.filter.text_encoder, task.captioner.text_decoder.bert
    assert task.filter.vision_model is task.captioner.vision_model
    assert enc.embeddings is dec.embeddings
    for le, ld in zip(enc.encoder.layer, dec.encoder.layer):
        assert le.crossattention is ld.crossattention and le.intermediate is ld.intermediate
        assert le.output is ld.output and le.attention is not ld.attention
    n_unique = sum(p.numel() for p in task.parameters())
    n_both = sum(p.numel() for p in task.captioner.parameters()) + sum(p.numel() for p in task.filter.parameters())
    shared = n_both - (n_unique - 1)  # the ITC temperature (1 value) belongs to neither model
    expect = (sum(p.numel() for p in task.captioner.vision_model.parameters())
              + sum(p.numel() for p in dec.embeddings.parameters())
              + sum(p.numel() for ld in dec.encoder.layer for m in (ld.crossattention, ld.intermediate, ld.output)
                    for p in m.parameters()))
    assert shared == expect
    assert sorted(task.components) == ["captioner", "filter"]


def test_caption_coco_50_steps_lowers_lm(caption_run):
    res, out = caption_run
    trend = loss_trend(res.history, ("lm",))
    assert trend["lm"][1] < trend["lm"][0] - 0.3
    assert sorted(p.name for p in (out / "final").iterdir()) == ["captioner", "preset.yaml"]


def test_caption_checkpoint_loads_like_capfilts_captioner(caption_run):
    """What ``capfilt run`` does with ``captioner.id`` (BlipCaptioner loads BlipForConditionalGeneration)."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    _, out = caption_run
    preset = load_preset(str(out / "final" / "preset.yaml"))
    model = BlipForConditionalGeneration.from_pretrained(preset.captioner.id).eval()
    proc = BlipProcessor.from_pretrained(preset.captioner.id)
    task = build_task(load_recipe("tiny-caption-coco"))
    task.load(out / "final")
    for a, b in zip(model.state_dict().values(), task.captioner.state_dict().values()):
        assert torch.equal(a, b)
    from PIL import Image

    inputs = proc(images=Image.open(COCO / "images" / "000000000802.jpg"), return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=5, do_sample=False).shape[0] == 1


def test_capfilts_captioner_wrapper_uses_the_trained_checkpoint(caption_run):
    """``capfilt run``'s caption stage loads the preset's captioner with ``load_captioner``; same seeds, new words."""
    from PIL import Image

    from capfilt.modeling.captioner import Decoding
    from capfilt.modeling.captioner import load_captioner

    _, out = caption_run
    trained_preset = load_preset(str(out / "final" / "preset.yaml"))
    tiny_preset = load_preset("tiny")
    images = [Image.open(p).convert("RGB") for p in sorted((COCO / "images").glob("*.jpg"))[:6]]
    cfg = Decoding()
    trained = load_captioner(trained_preset.captioner, trained_preset).generate(images, list(range(6)), cfg)
    untrained = load_captioner(tiny_preset.captioner, tiny_preset).generate(images, list(range(6)), cfg)
    a, b = [c[0] for c in trained], [c[0] for c in untrained]
    assert all(c.strip() for c in a) and sum(x != y for x, y in zip(a, b)) >= 5
    print(f"frequent COCO words: trained {frequent_word_rate(a):.2f}, untrained {frequent_word_rate(b):.2f}")
    assert frequent_word_rate(a) > 2 * frequent_word_rate(b)


def test_itm_coco_50_steps_lowers_itc_itm(tmp_path):
    res = train(load_recipe("tiny-itm-coco"), COCO_JSON, tmp_path)
    trend = loss_trend(res.history, ("itc", "itm"))
    for o, (start, end) in trend.items():
        assert end < start, (o, start, end)
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == ["extras.safetensors", "filter", "preset.yaml"]


def test_itc_loss_groups_and_itm_negatives_never_from_the_same_image():
    groups = torch.tensor([7, 7, 3, 5, 5, 5])
    sim = torch.randn(6, 6)
    # equal similarities: uniform softmax, loss = log(6) whatever the groups
    assert float(itc_loss(torch.zeros(6, 6), groups)) == pytest.approx(float(torch.log(torch.tensor(6.0))))
    # positives within a group are rewarded: a similarity that prefers the group beats one that does not
    same = (groups[:, None] == groups[None, :]).float()
    assert float(itc_loss(10 * same, groups)) < float(itc_loss(10 * torch.eye(6), groups))
    torch.manual_seed(0)
    for _ in range(50):
        img, txt, labels = itm_pairs(sim, groups, hard=True)
        assert labels[:6].tolist() == [1] * 6 and labels[6:].eq(0).all() and len(labels) == 18
        assert (groups[img[6:]] != groups[txt[6:]]).all()
        assert img[:6].tolist() == txt[:6].tolist() == list(range(6))
    # one image only: no negative exists, only the positives remain
    img, txt, labels = itm_pairs(sim[:2, :2], torch.tensor([1, 1]), hard=True)
    assert labels.tolist() == [1, 1]
    # hard negatives follow the similarities: a very similar wrong pair is picked almost always
    sim = torch.zeros(3, 3)
    sim[0, 2] = 20.0
    picks = [int(itm_pairs(sim, torch.tensor([0, 1, 2]), hard=True)[1][3]) for _ in range(50)]
    assert picks.count(2) >= 48


def test_collator_masks_prompt_and_padding_like_blip():
    from capfilt.modeling.tiny import blip_tokenizer

    tok = blip_tokenizer()
    coll = BlipCollator(tok, max_tokens=12, prompt="a picture of ", plain=True, lm=True)
    samples = [{"pixel_values": torch.zeros(3, 4, 4), "text": t, "group": i, "key": str(i), "consumer": 0,
                "position": i, "epoch": 0} for i, t in enumerate(["a dog", "two cats on a red sofa near a window"])]
    b = coll(samples)
    assert b["input_ids"][0, 0] == tok.cls_token_id and b["lm_input_ids"][0, 0] == tok.bos_token_id
    prompt_len = len(tok("a picture of ").input_ids) - 1
    assert (b["lm_labels"][:, :prompt_len] == -100).all()
    assert b["lm_labels"][0, prompt_len] == tok("a dog").input_ids[1]  # first caption token is a target
    assert (b["lm_labels"][b["lm_attention_mask"] == 0] == -100).all()
    assert b["lm_input_ids"].shape[1] == 12  # truncated to max_tokens


@pytest.mark.parametrize("prefix", ["enc", "cls"])
def test_itm_objective_uses_the_recipes_text_prefix_and_the_saved_filter_records_it(prefix, tmp_path):
    """Train and inference agree: the ITM objective's texts start with the chosen token (ITC's with
    [CLS]), the saved filter's capfilt.json records it, and capfilt run's scorer (auto) follows it."""
    from capfilt.config import ModelPreset, ModelSpec
    from capfilt.modeling.blip_scorer import BlipScorer
    from capfilt.modeling.record import read_model_record
    from capfilt.train.data import CapfiltShards, ImageTransform, StreamingDataset

    overrides = [f"model.itm_text_prefix={prefix}", "train.max_steps=2", "data.num_workers=0", "train.save_every=null"]
    recipe = load_recipe("tiny-itm-coco", overrides)
    task = build_task(recipe).train()
    tok = task._processor.tokenizer
    want = tok.convert_tokens_to_ids("[ENC]") if prefix == "enc" else tok.cls_token_id
    assert (task.itm_text_prefix, task.itm_prefix_id) == (prefix, want)
    out = tmp_path / "shards"
    make_shards(out)
    it = StreamingDataset(CapfiltShards(str(out)), ImageTransform(task.image_processor), text_top_k=2).iter_consumer(0, 1)
    seen = []  # (with image?, first tokens) of every text-encoder call

    def hook(module, args, kwargs):
        seen.append((kwargs.get("encoder_hidden_states") is not None, set(kwargs["input_ids"][:, 0].tolist())))

    handle = task.filter.text_encoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        task(task.collator()([next(it) for _ in range(6)]))
    finally:
        handle.remove()
    assert seen == [(False, {tok.cls_token_id}), (True, {want})]  # ITC with [CLS], ITM with the prefix
    res = train(recipe, COCO_JSON, tmp_path / "run", echo=None)
    folder = res.final / "filter"
    assert read_model_record(folder) == {"itm_text_prefix": prefix, "recipe": "tiny-itm-coco"}
    spec = ModelSpec(id=str(folder), kind="blip")
    scorer = BlipScorer.from_spec(spec, ModelPreset(name="trained", captioner=spec, filter=spec))
    assert (scorer.itm_text_prefix, scorer.itm_prefix_id) == (prefix, want)


@pytest.mark.parametrize("source", ["captioner", "filter"])
def test_shared_modules_start_from_the_named_checkpoint_and_the_discarded_weights_are_announced(source, caplog):
    """blip pre-training shares the image encoder and all text layers but self-attention: they can
    hold one checkpoint's weights only. The recipe names which; the other's differing weights are
    discarded with a warning (tiny captioner and filter have different random weights)."""
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    from capfilt.modeling.tiny import ensure_tiny_checkpoints

    tiny = ensure_tiny_checkpoints()
    cap = BlipForConditionalGeneration.from_pretrained(tiny / "tiny-blip-captioner")
    filt = BlipForImageTextRetrieval.from_pretrained(tiny / "tiny-blip-itm")
    recipe = load_recipe("tiny-blip-pretrain", [f"model.shared_weights_from={source}"])
    with caplog.at_level("WARNING", logger="capfilt.train.blip"):
        task = build_task(recipe)
    kept, lost = (cap, filt) if source == "captioner" else (filt, cap)
    other = "filter" if source == "captioner" else "captioner"
    vis = task.filter.vision_model.state_dict()
    assert task.captioner.vision_model is task.filter.vision_model
    assert all(torch.equal(vis[k], v) for k, v in kept.vision_model.state_dict().items())
    assert any(not torch.equal(vis[k], v) for k, v in lost.vision_model.state_dict().items())
    kept_ca = (kept.text_decoder.bert if source == "captioner" else kept.text_encoder).encoder.layer[0].crossattention
    now_ca = task.filter.text_encoder.encoder.layer[0].crossattention
    assert now_ca is task.captioner.text_decoder.bert.encoder.layer[0].crossattention
    assert all(torch.equal(now_ca.state_dict()[k], v) for k, v in kept_ca.state_dict().items())
    # the filter's own self-attention and ITM head are never replaced
    assert torch.equal(task.filter.itm_head.weight, filt.itm_head.weight)
    msgs = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(msgs) == 1 and f"the {other}'s own weights" in msgs[0] and "vision_model" in msgs[0]
    assert f"training starts from the {source}'s (tiny-blip-" in msgs[0]
    assert task.model_record("filter")["shared_weights_from"] == source


def test_no_warning_when_the_shared_weights_already_agree(caplog):
    """A filter whose shared modules already hold the captioner's weights (e.g. saved by BLIP
    pre-training itself) loses nothing: no warning."""
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipProcessor

    from capfilt.modeling.tiny import ensure_tiny_checkpoints
    from capfilt.train.blip import BlipTask

    tiny = ensure_tiny_checkpoints()
    cap = BlipForConditionalGeneration.from_pretrained(tiny / "tiny-blip-captioner")
    filt = BlipForImageTextRetrieval.from_pretrained(tiny / "tiny-blip-itm")
    proc = BlipProcessor.from_pretrained(tiny / "tiny-blip-itm")
    recipe = load_recipe("tiny-blip-pretrain")
    with torch.no_grad():  # make the filter's shared modules equal to the captioner's
        filt.vision_model.load_state_dict(cap.vision_model.state_dict())
        filt.text_encoder.embeddings.load_state_dict(cap.text_decoder.bert.embeddings.state_dict())
        for le, ld in zip(filt.text_encoder.encoder.layer, cap.text_decoder.bert.encoder.layer):
            for name in ("crossattention", "intermediate", "output"):
                getattr(le, name).load_state_dict(getattr(ld, name).state_dict())
    with caplog.at_level("WARNING", logger="capfilt.train.blip"):
        task = BlipTask(cap, proc, filt, proc, ("itc", "itm", "lm"), recipe.loss, recipe.data)
    assert task.discarded == {"modules": [], "tensors": 0, "parameters": 0}
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
