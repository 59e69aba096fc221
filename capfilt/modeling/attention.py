"""Fused attention for BLIP's eager-only attention modules (an inference speed-up, same weights).

transformers ships BLIP with eager attention only (``BlipAttention`` in the ViT,
``BlipTextSelfAttention`` in the BERT text encoder/decoder): ``softmax(Q K^T * scale) V`` as two
``bmm`` calls, a scale multiply, a softmax and two layout copies, which on CPU take as long as the
ViT's linear layers (measured on ViT-B/16 at 384 px: ~40 % of the forward). This module switches
those modules, in one loaded model, to ``torch.nn.functional.scaled_dot_product_attention`` (one
fused kernel: flash attention on CPU and CUDA), keeping the modules' parameters, cache handling
and masks exactly as transformers' code uses them. Outputs agree with eager attention to float
rounding (max abs difference ~4e-6 on ViT-B hidden states in fp32; see
``tests/modeling/test_attention.py``).

The swap is per module instance (its class becomes a subclass defined here), so other models in
the same process keep eager attention; no global state. In training mode (dropout active) the
subclasses call transformers' original eager ``forward``.
"""

from __future__ import annotations

import math
from typing import Any

from transformers.cache_utils import EncoderDecoderCache
from transformers.models.blip.modeling_blip import BlipAttention
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention


class SdpaBlipAttention(BlipAttention):
    """``BlipAttention`` (ViT self-attention) computed with ``scaled_dot_product_attention``.

    Call: ``hidden_states`` float ``(B, N, D)`` -> ``(output (B, N, D), None)`` (no attention
    probabilities: the fused kernel never materialises them; BLIP's encoder layer discards them).
    """

    def forward(self, hidden_states: Any, **kwargs: Any) -> tuple[Any, None]:
        """Fused self-attention over the ``N`` patch tokens (eager ``forward`` while training)."""
        import torch.nn.functional as F

        if self.training:
            return BlipAttention.forward(self, hidden_states, **kwargs)
        b, n, d = hidden_states.shape
        qkv = self.qkv(hidden_states).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)  # (B, H, N, Dh)
        return self.projection(ctx.transpose(1, 2).reshape(b, n, d)), None


class SdpaBlipTextSelfAttention(BlipTextSelfAttention):
    """``BlipTextSelfAttention`` (BERT self- and cross-attention) with ``scaled_dot_product_attention``.

    Same inputs as transformers' module: ``hidden_states`` float ``(B, L, D)``; ``attention_mask``
    additive float ``(B, 1, 1|L, L_k)`` as ``BlipTextModel`` builds it (causal for the decoder);
    ``encoder_hidden_states`` float ``(B, N, D_vision)`` for cross-attention; ``cache`` a
    ``Cache``/``EncoderDecoderCache`` updated exactly as the eager module does (cross-attention
    keys/values projected once, then reused). Returns ``(context (B, L, D), None)``.
    """

    def forward(self, hidden_states: Any, attention_mask: Any = None, encoder_hidden_states: Any = None,
                encoder_attention_mask: Any = None, cache: Any = None, **kwargs: Any) -> tuple[Any, None]:
        """Fused attention; the cache and mask logic mirrors transformers 5's eager ``forward``."""
        import torch.nn.functional as F

        if cache is None and "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        if self.training:
            return BlipTextSelfAttention.forward(self, hidden_states, attention_mask, encoder_hidden_states,
                                                 encoder_attention_mask, cache=cache, **kwargs)
        shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        query = self.query(hidden_states).view(shape).transpose(1, 2)
        cross = encoder_hidden_states is not None
        mask = encoder_attention_mask if cross else attention_mask
        layer_cache, reuse = cache, False
        if isinstance(cache, EncoderDecoderCache):
            reuse = bool(cache.is_updated.get(self.layer_idx))
            layer_cache = cache.cross_attention_cache if cross else cache.self_attention_cache
        if cross and cache is not None and reuse:
            key = layer_cache.layers[self.layer_idx].keys
            value = layer_cache.layers[self.layer_idx].values
        else:
            source = encoder_hidden_states if cross else hidden_states
            kv_shape = (*source.shape[:-1], -1, self.attention_head_size)
            key = self.key(source).view(kv_shape).transpose(1, 2)
            value = self.value(source).view(kv_shape).transpose(1, 2)
            if cache is not None:
                key, value = layer_cache.update(key, value, self.layer_idx, kwargs=kwargs)
                if cross and isinstance(cache, EncoderDecoderCache):
                    cache.is_updated[self.layer_idx] = True
        if mask is not None:
            mask = mask.to(query.dtype)
        ctx = F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                             scale=1.0 / math.sqrt(self.attention_head_size))
        ctx = ctx.transpose(1, 2)
        return ctx.reshape(*ctx.shape[:-2], self.all_head_size), None


_SWAPS = ((BlipTextSelfAttention, SdpaBlipTextSelfAttention), (BlipAttention, SdpaBlipAttention))


def use_fused_attention(model: Any) -> int:
    """Switch every BLIP eager attention module inside ``model`` to its fused subclass, in place.

    Args:
        model: any ``torch.nn.Module`` (a ``BlipForConditionalGeneration``, ``BlipForImageTextRetrieval``,
            ...); modules that are not BLIP attention are left alone.

    Returns:
        How many modules were switched (0 for a model without BLIP attention, e.g. CLIP).
    """
    switched = 0
    for module in model.modules():
        for eager, fused in _SWAPS:
            if type(module) is eager:
                module.__class__ = fused
                switched += 1
                break
    return switched
