"""CLIP image-text similarity for BLIP-2-style caption ranking (BLIP-2 §3.4, ``openai/clip-vit-large-patch14``).

Each image is embedded once (``vision_model`` + ``visual_projection``), every candidate text once
(``text_model`` + ``text_projection``); the score is the cosine of the L2-normalised embeddings,
``CLIPModel``'s ``logits_per_image`` divided by ``logit_scale.exp()``. Texts are padded to the
longest text of the call and truncated to CLIP's context length (77 tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from capfilt.config import ModelPreset, ModelSpec
from capfilt.modeling.batching import chunks
from capfilt.modeling.scores import ScoreResult

#: Texts per text-tower call.
TEXT_CHUNK = 512


class ClipScorer:
    """CLIP cosine between each image and each of its candidate texts.

    Args:
        model: ``CLIPModel`` in eval mode, on its device.
        processor: its ``CLIPProcessor``.
        max_text_tokens: truncation length; default the model's context length
            (``text_config.max_position_embeddings``, 77 for OpenAI CLIP).
    """

    def __init__(self, model: Any, processor: Any, max_text_tokens: int | None = None) -> None:
        self.model = model
        self.processor = processor
        ctx = model.config.text_config.max_position_embeddings
        self.max_text_tokens = min(max_text_tokens or ctx, ctx)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    @classmethod
    def from_spec(cls, spec: ModelSpec, preset: ModelPreset) -> "ClipScorer":
        """Load the CLIP checkpoint named by ``spec`` (SDPA attention).

        Raises:
            ModelLoadError: the checkpoint or its processor cannot be loaded.
        """
        from transformers import CLIPModel, CLIPProcessor

        from capfilt.modeling.loading import load_pretrained, load_processor

        model = load_pretrained(CLIPModel, spec, preset, attn_implementation="sdpa")
        return cls(model, load_processor(CLIPProcessor, spec, preset))

    def image_features(self, images: Sequence[Any]) -> Any:
        """L2-normalised image embeddings, float32 ``(B, projection_dim)``."""
        from torch.nn.functional import normalize

        pv = self.processor.image_processor(images=list(images), return_tensors="pt").pixel_values
        pooled = self.model.vision_model(pixel_values=pv.to(self.device, self.dtype)).pooler_output
        return normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def text_features(self, texts: Sequence[str]) -> Any:
        """L2-normalised text embeddings, float32 ``(T, projection_dim)``, truncated to ``max_text_tokens``."""
        import torch
        from torch.nn.functional import normalize

        feats = []
        for part in chunks(list(texts), TEXT_CHUNK):
            enc = self.processor.tokenizer(list(part), padding="longest", truncation=True,
                                           max_length=self.max_text_tokens, return_tensors="pt")
            pooled = self.model.text_model(input_ids=enc.input_ids.to(self.device),
                                           attention_mask=enc.attention_mask.to(self.device)).pooler_output
            feats.append(normalize(self.model.text_projection(pooled).float(), dim=-1))
        return torch.cat(feats)

    def score(self, images: Sequence[Any], texts: Sequence[Sequence[str]], embed: bool = False) -> list[ScoreResult]:
        """CLIP cosine of every text in ``texts[i]`` with ``images[i]``.

        Args:
            images: ``B`` PIL RGB images.
            texts: ``B`` lists of candidate texts (``T_i`` each, may be empty).
            embed: also return each image's embedding (:meth:`image_features`).

        Returns:
            ``B`` :class:`ScoreResult` with ``clip``: float32 ``(T_i,)`` in [-1, 1] (and
            ``image_embedding`` float32 ``(projection_dim,)`` with ``embed``).

        Raises:
            ValueError: ``len(images) != len(texts)``.
        """
        import torch

        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} text lists")
        flat = [t for ts in texts for t in ts]
        sims = np.zeros(len(flat), np.float32)
        emb = None
        if flat or (embed and images):
            with torch.inference_mode():
                img = self.image_features(images)  # (B, P)
                if embed:
                    emb = img.cpu().numpy().astype(np.float32)
                if flat:
                    owner = torch.tensor([i for i, ts in enumerate(texts) for _ in ts], dtype=torch.long,
                                         device=self.device)
                    txt = self.text_features(flat)  # (T, P)
                    sims = (img.index_select(0, owner) * txt).sum(-1).cpu().numpy().astype(np.float32)
        out, start = [], 0
        for i, ts in enumerate(texts):
            out.append(ScoreResult(clip=sims[start:start + len(ts)].copy(),
                                   image_embedding=emb[i].copy() if emb is not None else None))
            start += len(ts)
        return out
