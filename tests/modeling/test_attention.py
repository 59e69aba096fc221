"""Fused (SDPA) attention for BLIP: same numbers as transformers' eager modules, per model instance."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval
from transformers.models.blip.modeling_blip import BlipAttention
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

from capfilt.modeling.attention import SdpaBlipAttention, SdpaBlipTextSelfAttention, use_fused_attention
from capfilt.modeling.captioner import BlipCaptioner, Decoding
from capfilt.modeling.tiny import random_blip

COCO = Path(__file__).resolve().parents[1] / "fixtures" / "coco" / "images"


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [Image.open(f).convert("RGB") for f in sorted(COCO.glob("*.jpg"))[:4]]


def _pair(cls: type) -> tuple[object, object, object]:
    eager, proc = random_blip(cls, "tiny", seed=3)
    fused = copy.deepcopy(eager)
    return eager, fused, proc


def test_switch_is_per_instance_and_counts_every_attention_module():
    eager, fused, _ = _pair(BlipForImageTextRetrieval)
    n = use_fused_attention(fused)
    cfg = eager.config
    # ViT self-attention per vision layer; text encoder: self + cross per layer
    assert n == cfg.vision_config.num_hidden_layers + 2 * cfg.text_config.num_hidden_layers
    assert all(type(m) is BlipAttention for m in eager.modules() if isinstance(m, BlipAttention))
    assert sum(isinstance(m, SdpaBlipAttention) for m in fused.modules()) == cfg.vision_config.num_hidden_layers
    assert sum(isinstance(m, SdpaBlipTextSelfAttention) for m in fused.modules()) == 2 * cfg.text_config.num_hidden_layers
    assert use_fused_attention(fused) == 0  # already switched
    assert use_fused_attention(torch.nn.Linear(2, 2)) == 0


def test_vision_and_itm_outputs_equal_eager_and_depend_on_the_image(images):
    eager, fused, proc = _pair(BlipForImageTextRetrieval)
    use_fused_attention(fused)
    texts = ["a man riding a motorcycle", "a pizza on a plate with a fork", "two dogs", "a clock"]
    inputs = proc(images=images, text=texts, return_tensors="pt", padding=True)  # padded: masks matter
    assert (inputs["attention_mask"] == 0).any()
    with torch.inference_mode():
        v_e = eager.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        v_f = fused.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        itm_e = eager(**inputs).itm_score
        itm_f = fused(**inputs).itm_score
        itc_e = eager(**inputs, use_itm_head=False).itm_score
        itc_f = fused(**inputs, use_itm_head=False).itm_score
        swapped = dict(inputs, pixel_values=inputs["pixel_values"].flip(0))
        itm_wrong = fused(**swapped).itm_score
    torch.testing.assert_close(v_f, v_e, atol=1e-5, rtol=0)
    torch.testing.assert_close(itm_f, itm_e, atol=1e-5, rtol=0)
    torch.testing.assert_close(itc_f, itc_e, atol=1e-5, rtol=0)
    assert (itm_wrong - itm_f).abs().max() > 1e-3  # a wrong image changes the score


def test_captions_token_identical_to_eager_and_image_dependent(images):
    eager, fused, proc = _pair(BlipForConditionalGeneration)
    use_fused_attention(fused)
    dec = Decoding(num_captions=3, max_length=12, min_length=5, batch_size=4)
    seeds = [11, 12, 13, 14]
    a = BlipCaptioner(eager, proc).generate(images, seeds, dec)
    b = BlipCaptioner(fused, proc).generate(images, seeds, dec)
    assert a == b
    beams = Decoding(num_captions=2, num_beams=3, max_length=12, batch_size=4)
    assert BlipCaptioner(eager, proc).generate(images, seeds, beams) == BlipCaptioner(fused, proc).generate(images, seeds, beams)
    # the decoder attends to the image: other pixels, other logits
    with torch.inference_mode():
        pv = proc(images=images[:2], return_tensors="pt").pixel_values
        ids = torch.tensor([[eager.config.text_config.bos_token_id, 5, 6, 7]] * 2)
        out = fused(pixel_values=pv, input_ids=ids).logits
        out_e = eager(pixel_values=pv, input_ids=ids).logits
        out_wrong = fused(pixel_values=pv.flip(0), input_ids=ids).logits
    torch.testing.assert_close(out, out_e, atol=1e-5, rtol=0)
    assert (out - out_wrong).abs().max() > 1e-3


def test_training_mode_uses_eager_attention(images):
    _, fused, proc = _pair(BlipForImageTextRetrieval)
    use_fused_attention(fused)
    fused.train()
    layer = fused.vision_model.encoder.layers[0].self_attn
    x = torch.randn(2, 5, fused.config.vision_config.hidden_size)
    out, probs = layer(x)
    assert probs is not None and probs.shape == (2, layer.num_heads, 5, 5)  # eager path: probabilities exist
    fused.eval()
    out2, probs2 = layer(x)
    assert probs2 is None
    torch.testing.assert_close(out2, out, atol=1e-5, rtol=0)  # attention dropout is 0 in the tiny config
