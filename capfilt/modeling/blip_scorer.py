"""The filter: BLIP's image-grounded text encoder (ITM head) and unimodal encoders (ITC), BLIP §3.1/§3.3.

``BlipForImageTextRetrieval.forward`` scores one (image, text) pair per image row and recomputes
the vision transformer for every pair. :class:`BlipScorer` encodes each image once, then scores
all its candidate texts:

- ITM: the text encoder with cross-attention to the image's patch embeddings, ``itm_head`` on the
  first text token, softmax, probability of "match". The first token is ``[ENC]`` as BLIP trained
  and evaluated its ITM head, or ``[CLS]`` as ``BlipProcessor`` tokenizes
  (:mod:`capfilt.modeling.itm_prefix`; ``itm_text_prefix``). The cross-attention keys/values of the image
  tokens (the largest part of a pair's cost: ``N = 577`` tokens projected in every layer) are
  computed once per image and shared by all its texts.
- ITC: cosine of ``normalize(vision_proj(image [CLS]))`` and ``normalize(text_proj(text [CLS]))``
  from the text encoder *without* cross-attention, as one row-wise dot product.

Texts are tokenized as ``BlipProcessor`` does (``[CLS] text [SEP]``), padded to the longest text of
the call and truncated to ``max_text_tokens`` (BLIP/LAVIS ``max_txt_len`` 35), so long web captions
never crash. Results equal :func:`naive_scores` (one full model forward per pair) up to float error.
All attention (the ViT's, the text encoder's, the folded cross-attention) runs through
``scaled_dot_product_attention`` (:mod:`capfilt.modeling.attention`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from capfilt.config import ModelPreset, ModelSpec
from capfilt.modeling.batching import chunks
from capfilt.modeling.itm_prefix import with_prefix
from capfilt.modeling.scores import ScoreResult

#: Image-text pairs per text-encoder call (bounds activation memory for images with many texts).
TEXT_CHUNK = 256


class BlipScorer:
    """ITM and ITC scores from a ``BlipForImageTextRetrieval`` (e.g. ``Salesforce/blip-itm-large-coco``).

    Args:
        model: ``BlipForImageTextRetrieval`` in eval mode, on its device.
        processor: its ``BlipProcessor``.
        scorers: which of ``itm`` / ``itc`` to compute (the other stays ``None`` in results).
        max_text_tokens: texts are truncated to this many tokens, ``[CLS]``/``[SEP]`` included.
        itm_text_prefix: ``enc``, ``cls`` or ``auto`` (:func:`capfilt.modeling.itm_prefix.resolve_itm_prefix`):
            the token ITM reads first (ITC always reads ``[CLS]``).
        recorded_prefix: the prefix the checkpoint was trained with (its ``capfilt.json``), for ``auto``.

    Attributes:
        itm_text_prefix: the resolved prefix, ``enc`` or ``cls``.
        itm_prefix_id: its token id.

    Raises:
        ValueError: unknown scorers, or ``enc`` for a checkpoint without an ``[ENC]`` token.
    """

    def __init__(self, model: Any, processor: Any, scorers: Sequence[str] = ("itm", "itc"),
                 max_text_tokens: int = 35, itm_text_prefix: str = "auto", recorded_prefix: str | None = None) -> None:
        bad = set(scorers) - {"itm", "itc"}
        if bad:
            raise ValueError(f"BlipScorer computes itm and itc, not {sorted(bad)}")
        self.model = model
        self.processor = processor
        self.scorers = tuple(scorers)
        self.max_text_tokens = max_text_tokens
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        from capfilt.modeling.itm_prefix import resolve_itm_prefix

        text_config = getattr(getattr(model, "config", None), "text_config", None)
        self.itm_text_prefix, self.itm_prefix_id = resolve_itm_prefix(itm_text_prefix, processor.tokenizer,
                                                                      recorded_prefix, text_config)

    @classmethod
    def from_spec(cls, spec: ModelSpec, preset: ModelPreset, scorers: Sequence[str] = ("itm", "itc"),
                  max_text_tokens: int = 35, itm_text_prefix: str = "auto") -> "BlipScorer":
        """Load the filter checkpoint named by ``spec``; its attention is switched to the fused kernel
        (:mod:`capfilt.modeling.attention`: transformers has only eager attention for BLIP).

        ``itm_text_prefix: auto`` follows the ``capfilt.json`` a capfilt-trained checkpoint holds.

        Raises:
            ModelLoadError: the checkpoint or its processor cannot be loaded, or its ``capfilt.json``
                is unreadable, or ``enc`` is asked for a checkpoint without ``[ENC]``.
        """
        from transformers import BlipForImageTextRetrieval, BlipProcessor

        from capfilt.errors import ModelLoadError
        from capfilt.modeling.attention import use_fused_attention
        from capfilt.modeling.loading import load_pretrained, load_processor, model_record

        model = load_pretrained(BlipForImageTextRetrieval, spec, preset, attn_implementation="eager")
        use_fused_attention(model)
        processor = load_processor(BlipProcessor, spec, preset)
        record = model_record(spec, preset)
        try:
            return cls(model, processor, scorers, max_text_tokens, itm_text_prefix, record.get("itm_text_prefix"))
        except ValueError as e:
            raise ModelLoadError(f"filter model {spec.id!r}: {e}") from None

    def tokenize(self, texts: Sequence[str]) -> tuple[Any, Any]:
        """``(input_ids, attention_mask)``: int64 ``(T, L)``, padded to the longest, ``L <= max_text_tokens``."""
        enc = self.processor.tokenizer(list(texts), padding="longest", truncation=True,
                                       max_length=self.max_text_tokens, return_tensors="pt")
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    def encode_images(self, images: Sequence[Any]) -> Any:
        """Vision transformer once per image: ``float (B, 1 + patches, D_vision)`` patch embeddings."""
        pv = self.processor.image_processor(images=list(images), return_tensors="pt").pixel_values
        return self.model.vision_model(pixel_values=pv.to(self.device, self.dtype)).last_hidden_state

    def image_embeddings(self, image_embeds: Any) -> Any:
        """The ITC image embedding: ``normalize(vision_proj(image [CLS]))``, float32 ``(B, P)``.

        Args:
            image_embeds: :meth:`encode_images` output, ``(B, 1 + patches, D_vision)``.
        """
        from torch.nn.functional import normalize

        return normalize(self.model.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)

    def score(self, images: Sequence[Any], texts: Sequence[Sequence[str]], embed: bool = False) -> list[ScoreResult]:
        """Score every text of ``texts[i]`` against ``images[i]``.

        Args:
            images: ``B`` PIL RGB images.
            texts: ``B`` lists of candidate texts (``T_i`` each, may be empty).
            embed: also return each image's ITC embedding (:meth:`image_embeddings`), computed from
                the same vision pass (also for images without texts).

        Returns:
            ``B`` :class:`ScoreResult` with float32 ``(T_i,)`` arrays for the configured scorers
            (and ``image_embedding`` float32 ``(P,)`` with ``embed``).

        Raises:
            ValueError: ``len(images) != len(texts)``.
        """
        import torch

        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} text lists")
        flat = [t for ts in texts for t in ts]
        owner = torch.tensor([i for i, ts in enumerate(texts) for _ in ts], dtype=torch.long, device=self.device)
        itm = np.zeros(len(flat), np.float32)
        itc = np.zeros(len(flat), np.float32)
        emb = None
        if flat or (embed and images):
            with torch.inference_mode():
                image_embeds = self.encode_images(images)  # (B, N, Dv)
                if embed:
                    emb = self.image_embeddings(image_embeds).cpu().numpy().astype(np.float32)  # (B, P)
                if flat:
                    ids, mask = self.tokenize(flat)  # (T, L)
                    if "itm" in self.scorers:
                        itm = self._itm(image_embeds, owner, with_prefix(ids, self.itm_prefix_id), mask)
                    if "itc" in self.scorers:
                        itc = self._itc(image_embeds, owner, ids, mask)
        out, start = [], 0
        for i, ts in enumerate(texts):
            sl = slice(start, start + len(ts))
            start += len(ts)
            out.append(ScoreResult(itm=itm[sl].copy() if "itm" in self.scorers else None,
                                   itc=itc[sl].copy() if "itc" in self.scorers else None,
                                   image_embedding=emb[i].copy() if emb is not None else None))
        return out

    def _cross_kv(self, image_embeds: Any) -> list[tuple[Any, Any]]:
        """Per text-encoder layer, the cross-attention keys and values of each image: ``(B, heads, N, d)`` each.

        ``BlipTextSelfAttention`` projects the image tokens again for every (image, text) pair;
        these projections depend only on the image, so they are computed once per image here.
        """
        b, n, _ = image_embeds.shape
        out = []
        for layer in self.model.text_encoder.encoder.layer:
            att = layer.crossattention.self
            shape = (b, n, att.num_attention_heads, att.attention_head_size)
            out.append((att.key(image_embeds).view(shape).transpose(1, 2),
                        att.value(image_embeds).view(shape).transpose(1, 2)))
        return out

    def _itm(self, image_embeds: Any, owner: Any, ids: Any, mask: Any) -> np.ndarray:
        """ITM match probabilities, float32 ``(T,)``.

        The text encoder of ``BlipForImageTextRetrieval`` (``text_encoder(..., encoder_hidden_states)``)
        layer by layer with the same modules: self-attention and feed-forward through the HF
        modules; cross-attention with the per-image keys/values of :meth:`_cross_kv`, the queries
        of all texts of one image folded into one ``(heads, texts*L, d)`` fused attention call (each query token
        attends to the image independently, so this is the same computation without repeating the
        image per text). Equal to the per-pair forward up to float rounding (tests: 1e-5).
        """
        import torch
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        encoder = self.model.text_encoder
        kv = self._cross_kv(image_embeds)
        probs = []
        for idx in chunks(range(ids.shape[0]), TEXT_CHUNK):
            sel = torch.as_tensor(list(idx), device=self.device)
            own = owner[sel]
            groups, counts = torch.unique_consecutive(own, return_counts=True)
            hidden = encoder.embeddings(input_ids=ids[sel])  # (t, L, D)
            t, length, dim = hidden.shape
            # additive padding mask for eager self-attention, (t, 1, 1, L)
            pad = (1.0 - mask[sel][:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
            for layer, (keys, values) in zip(encoder.encoder.layer, kv):
                attn_out, _ = layer.attention(hidden, attention_mask=pad)
                ca = layer.crossattention
                heads, dh = ca.self.num_attention_heads, ca.self.attention_head_size
                q = ca.self.query(attn_out).view(t, length, heads, dh).transpose(1, 2)  # (t, h, L, d)
                ctx = torch.empty_like(q)
                start = 0
                for img, cnt in zip(groups.tolist(), counts.tolist()):
                    qi = q[start:start + cnt].transpose(0, 1).reshape(heads, cnt * length, dh)
                    ci = sdpa(qi, keys[img], values[img], scale=1.0 / math.sqrt(dh))  # (h, cnt*L, d)
                    ctx[start:start + cnt] = ci.view(heads, cnt, length, dh).transpose(0, 1)
                    start += cnt
                ctx = ctx.transpose(1, 2).reshape(t, length, dim)
                hidden = layer.feed_forward_chunk(ca.output(ctx, attn_out))
            logits = self.model.itm_head(hidden[:, 0, :]).float()  # (t, 2)
            probs.append(torch.softmax(logits, dim=-1)[:, 1])
        return torch.cat(probs).cpu().numpy().astype(np.float32)

    def _itc(self, image_embeds: Any, owner: Any, ids: Any, mask: Any) -> np.ndarray:
        import torch
        from torch.nn.functional import normalize

        image_feat = self.image_embeddings(image_embeds)  # (B, P)
        sims = []
        for idx in chunks(range(ids.shape[0]), TEXT_CHUNK):
            sel = torch.as_tensor(list(idx), device=self.device)
            hidden = self.model.text_encoder(input_ids=ids[sel], attention_mask=mask[sel]).last_hidden_state
            text_feat = normalize(self.model.text_proj(hidden[:, 0, :]).float(), dim=-1)  # (t, P)
            sims.append((image_feat.index_select(0, owner[sel]) * text_feat).sum(-1))
        return torch.cat(sims).cpu().numpy().astype(np.float32)


def naive_scores(model: Any, processor: Any, image: Any, text: str, max_text_tokens: int = 35,
                 itm_prefix_id: int | None = None, itc: bool = True) -> tuple[float, float]:
    """Reference: one full ``BlipForImageTextRetrieval`` forward per (image, text) and head.

    This is what the HF model card does (``model(**processor(images=image, text=text))``), run
    twice: ``use_itm_head=True`` (ITM) and ``False`` (ITC). It recomputes the vision transformer
    for every pair; used by the equivalence tests and ``benchmarks/bench_score.py``.
    ``itm_prefix_id``: the token that replaces ``[CLS]`` for ITM (``None``: ``[CLS]``, as the model card).
    ``itc=False``: the ITM forward only (what the HF/LAVIS examples run to filter); the ITC value is NaN.

    Returns:
        ``(itm_probability, itc_cosine)`` as Python floats.
    """
    import torch

    inputs = processor(images=image, text=text, return_tensors="pt", truncation=True, max_length=max_text_tokens)
    param = next(model.parameters())
    inputs = {k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device))
              for k, v in inputs.items()}
    with torch.inference_mode():
        itm_inputs = dict(inputs)
        if itm_prefix_id is not None:
            itm_inputs["input_ids"] = with_prefix(inputs["input_ids"], itm_prefix_id)
        itm_logits = model(**itm_inputs, use_itm_head=True).itm_score  # (1, 2)
        cosine = float(model(**inputs, use_itm_head=False).itm_score.float()[0, 0]) if itc else float("nan")  # (1, 1)
    return float(torch.softmax(itm_logits.float(), dim=-1)[0, 1]), cosine


def resolve_filter_itm_prefix(spec: ModelSpec, preset: ModelPreset, setting: str = "auto") -> dict[str, Any]:
    """The ITM text prefix a run with ``score.itm_text_prefix = setting`` uses for ``spec``, without
    loading the weights (tokenizer + config only): for the run record.

    Returns:
        ``{"setting": setting, "prefix": "enc" | "cls", "token_id": int}``.

    Raises:
        ModelLoadError: the tokenizer/config cannot be loaded, or ``enc`` for a checkpoint without ``[ENC]``.
    """
    from transformers import AutoConfig, BlipProcessor

    from capfilt.errors import ModelLoadError
    from capfilt.modeling.itm_prefix import resolve_itm_prefix
    from capfilt.modeling.loading import load_processor, model_record

    processor = load_processor(BlipProcessor, spec, preset)
    config = load_processor(AutoConfig, spec, preset)
    try:
        prefix, token = resolve_itm_prefix(setting, processor.tokenizer, model_record(spec, preset).get("itm_text_prefix"),
                                           getattr(config, "text_config", None))
    except ValueError as e:
        raise ModelLoadError(f"filter model {spec.id!r}: {e}") from None
    return {"setting": setting, "prefix": prefix, "token_id": token}
