"""BLIP-2 stage 1 (Q-Former ITC / ITM / ITG) and stage 2 (frozen LM) on the tiny BLIP-2 config."""

from __future__ import annotations

import pytest
import torch

from capfilt.train.blip2 import Blip2LmCollator, itg_allowed, self_attention_mask
from capfilt.train.config import load_recipe
from capfilt.train.loop import train
from capfilt.train.builders import build_task
from tests.helpers.train import loss_trend, make_shards, one_torch_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    make_shards(out)
    return out


def _frozen_snapshot(task, names):
    return {n: {k: v.detach().clone() for k, v in task.frozen[n].state_dict().items()} for n in names}


def _assert_unchanged(task, snap):
    for n, sd in snap.items():
        assert all(not p.requires_grad for p in task.frozen[n].parameters()), n
        now = task.frozen[n].state_dict()
        for k, v in sd.items():
            assert torch.equal(now[k], v), f"{n}.{k} changed"


@pytest.fixture(scope="module")
def stage1(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("blip2-stage1")
    recipe = load_recipe("tiny-blip2-stage1")
    res = train(recipe, str(shards), out)
    return recipe, res, out


def test_stage1_50_steps_lowers_itc_itm_itg(stage1):
    _, res, out = stage1
    trend = loss_trend(res.history, ("itc", "itm", "itg"))
    for o, (start, end) in trend.items():
        assert end < start, (o, start, end)
    assert trend["itc"][1] < 1.95  # below log(8) = 2.079: the queries tell the images apart
    from transformers import Blip2ForImageTextRetrieval, BlipProcessor

    model = Blip2ForImageTextRetrieval.from_pretrained(out / "final" / "filter").eval()
    assert model.query_tokens.shape == (1, 32, 32) and model.config.qformer_config.use_qformer_text_input
    proc = BlipProcessor.from_pretrained(out / "final" / "filter")
    from PIL import Image

    from tests.helpers.train import COCO

    inputs = proc(images=Image.open(COCO / "images" / "000000000139.jpg"), text=["a kitchen", "a dog"],
                  return_tensors="pt", padding=True)
    inputs["pixel_values"] = inputs["pixel_values"].repeat(2, 1, 1, 1)
    itm = model(**inputs, use_image_text_matching_head=True).logits_per_image
    assert itm.shape == (2, 2) and torch.isfinite(itm).all()
    assert not (out / "final" / "preset.yaml").exists()  # capfilt's filter stage scores with BLIP filters


def test_stage1_frozen_vision_encoder_stays_frozen(shards, tmp_path):
    recipe = load_recipe("tiny-blip2-stage1", ["train.max_steps=4", "data.num_workers=0"])
    task = build_task(recipe)
    snap = _frozen_snapshot(task, ["vision_model"])
    assert sorted(task.frozen) == ["vision_model"]
    from capfilt.train.data import CapfiltShards, ImageTransform, StreamingDataset

    ds = StreamingDataset(CapfiltShards(str(shards)), ImageTransform(task.image_processor), text_top_k=2)
    it = ds.iter_consumer(0, 1)
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05)
    trained = {k: v.detach().clone() for k, v in task.model.qformer.state_dict().items()}
    task.train()
    assert not task.model.vision_model.training and task.model.qformer.training
    for _ in range(4):
        batch = task.collator()([next(it) for _ in range(8)])
        task(batch)["loss"].backward()
        assert all(p.grad is None for p in task.model.vision_model.parameters())
        opt.step()
        opt.zero_grad()
    _assert_unchanged(task, snap)
    assert any(not torch.equal(v, task.model.qformer.state_dict()[k]) for k, v in trained.items())
    # the ITG head's output matrix is the Q-Former word embedding matrix (tied)
    assert task.itg_head.word_embeddings.weight is task.model.embeddings.word_embeddings.weight


def test_stage2_from_stage1_lowers_lm_with_frozen_vision_and_lm(stage1, shards, tmp_path):
    _, _, s1 = stage1
    recipe = load_recipe("tiny-blip2-stage2", [f"model.qformer_from={s1 / 'final' / 'filter'}"])
    task = build_task(recipe)
    from transformers import Blip2ForImageTextRetrieval

    src = Blip2ForImageTextRetrieval.from_pretrained(s1 / "final" / "filter")
    assert torch.equal(task.model.query_tokens, src.query_tokens)
    for k, v in task.model.qformer.state_dict().items():
        assert torch.equal(v, src.qformer.state_dict()[k]), k
    assert sorted(task.frozen) == ["language_model", "vision_model"]
    snap = _frozen_snapshot(task, ["language_model", "vision_model"])
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[1] in ("query_tokens", "qformer", "language_projection") for n in trainable)

    res = train(recipe, str(shards), tmp_path)
    trend = loss_trend(res.history, ("lm",))
    assert trend["lm"][1] < trend["lm"][0]
    after = build_task(recipe)
    after.load(tmp_path / "final")
    _assert_unchanged(after, snap)
    assert not torch.equal(after.model.language_projection.weight, task.model.language_projection.weight)
    from capfilt.config import load_preset

    preset = load_preset(str(tmp_path / "final" / "preset.yaml"))
    assert preset.captioner.kind == "blip2" and preset.captioner.id.endswith("final/captioner")


def test_itg_mask_is_blip2s_multimodal_causal_mask():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    a = itg_allowed(2, mask)
    assert a.shape == (2, 5, 5)
    expect0 = torch.tensor([[1, 1, 0, 0, 0],
                            [1, 1, 0, 0, 0],
                            [1, 1, 1, 0, 0],
                            [1, 1, 1, 1, 0],
                            [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(a[0], expect0)
    assert torch.equal(a[1, :, 4], torch.zeros(5, dtype=torch.bool))  # padding is never attended to
    eager = self_attention_mask(a, "eager", torch.float32)
    assert eager.shape == (2, 1, 5, 5) and eager[0, 0, 0, 2] == torch.finfo(torch.float32).min
    assert eager[0, 0, 2, 0] == 0
    assert self_attention_mask(a, "sdpa", torch.float32).dtype == torch.bool


def test_itg_text_cannot_see_future_tokens():
    """Changing a later text token leaves the ITG logits of earlier positions unchanged (causal mask works)."""
    task = build_task(load_recipe("tiny-blip2-stage1")).eval()
    m = task.model
    torch.manual_seed(0)
    image = m.vision_model(pixel_values=torch.randn(1, 3, 64, 64)).last_hidden_state
    ids = torch.tensor([[task.bos, 40, 41, 42, 43]])
    ids2 = ids.clone()
    ids2[0, 3] = 99
    mask = torch.ones_like(ids)
    q = task.num_query
    outs = []
    for x in (ids, ids2):
        emb = m.embeddings(input_ids=x, query_embeds=m.query_tokens)
        att = self_attention_mask(itg_allowed(q, mask), m.qformer.config._attn_implementation, emb.dtype)
        outs.append(task.itg_head(task._qformer(emb, q, att, image)[:, q:]))
    assert torch.allclose(outs[0][0, :3], outs[1][0, :3], atol=1e-6)
    assert not torch.allclose(outs[0][0, 3:], outs[1][0, 3:], atol=1e-4)


def test_stage2_collator_places_queries_then_text_then_eos():
    from capfilt.modeling.tiny import opt_tokenizer

    tok = opt_tokenizer()
    coll = Blip2LmCollator(tok, num_query=4, image_token_id=600, max_tokens=16)
    samples = [{"pixel_values": torch.zeros(3, 2, 2), "text": t, "group": 0, "key": "k", "consumer": 0,
                "position": 0, "epoch": 0} for t in ["a dog", "a cat on a sofa"]]
    b = coll(samples)
    ids, labels, mask = b["input_ids"], b["labels"], b["attention_mask"]
    assert (ids[:, :4] == 600).all() and (labels[:, :4] == -100).all()
    assert ids[0, 4] == tok.bos_token_id and labels[0, 4] == -100  # BOS is input, not target
    n0 = int(mask[0].sum())
    assert ids[0, n0 - 1] == tok.eos_token_id and labels[0, n0 - 1] == tok.eos_token_id
    assert (labels[0, n0:] == -100).all() and tok.decode(ids[0, 5:n0 - 1]).strip() == "a dog"


def test_stage2_ends_texts_with_the_token_generation_stops_on_when_the_tokenizers_eos_differs(shards, tmp_path):
    """HF's OPT BLIP-2 checkpoints stop generating on "\\n" while the OPT tokenizer's EOS is </s>
    (LAVIS trains with a "\\n" suffix). A tiny BLIP-2 set up the same way: the trainer appends "\\n"
    (not </s>), the saved captioner still stops on it, and its capfilt.json says so."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from capfilt.modeling.record import read_model_record
    from capfilt.modeling.tiny import ensure_tiny_checkpoints

    src = ensure_tiny_checkpoints() / "tiny-blip2-captioner"
    model, proc = Blip2ForConditionalGeneration.from_pretrained(src), Blip2Processor.from_pretrained(src)
    tok = proc.tokenizer
    newline = tok("\n", add_special_tokens=False).input_ids[0]
    assert newline != tok.eos_token_id
    model.config.text_config.eos_token_id = newline
    model.generation_config.eos_token_id = newline
    ckpt = tmp_path / "blip2-stops-on-newline"
    model.save_pretrained(ckpt)
    proc.save_pretrained(ckpt)

    recipe = load_recipe("tiny-blip2-stage2", [f"model.blip2={ckpt}", "train.max_steps=2", "data.num_workers=0",
                                               "train.save_every=null"])
    task = build_task(recipe)
    assert task.eos_token_id == newline
    samples = [{"pixel_values": torch.zeros(3, 224, 224), "text": t, "group": 0, "key": "k", "consumer": 0,
                "position": 0, "epoch": 0} for t in ["a dog", "a cat on a sofa"]]
    b = task.collator()(samples)
    for row in range(2):
        n = int(b["attention_mask"][row].sum())
        assert b["input_ids"][row, n - 1] == newline and b["labels"][row, n - 1] == newline
        assert tok.eos_token_id not in b["labels"][row, :n].tolist()[1:]
    res = train(recipe, str(shards), tmp_path / "out", echo=None)
    saved = Blip2ForConditionalGeneration.from_pretrained(res.final / "captioner")
    assert saved.generation_config.eos_token_id == newline
    assert read_model_record(res.final / "captioner") == {"eos_token_id": newline, "eos_token": "Ċ"}
