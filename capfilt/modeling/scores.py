"""Typed per-image score results shared by the scorers (:mod:`.blip_scorer`, :mod:`.clip_scorer`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ScoreResult:
    """Scores of the ``T`` candidate texts of one image, in the order the texts were given.

    Attributes:
        itm: float32 ``(T,)``, BLIP ITM probability that the text matches the image,
            ``softmax(itm_head(...))[:, 1]`` in [0, 1] (BLIP §3.1, §3.3 filter); ``None`` if not computed.
        itc: float32 ``(T,)``, BLIP ITC cosine of the normalised ``vision_proj(image [CLS])`` and
            ``text_proj(text [CLS])`` in [-1, 1]; ``None`` if not computed.
        clip: float32 ``(T,)``, CLIP cosine of normalised image and text embeddings in [-1, 1]
            (BLIP-2 §3.4 ranking); ``None`` if not computed.
        image_embedding: float32 ``(D,)``, the image's L2-normalised embedding in the scorer's
            image-text space (BLIP: ``normalize(vision_proj(image [CLS]))``, ``D = 256`` for the
            released checkpoints; CLIP: ``normalize(visual_projection(pooled))``); ``None`` unless
            the scorer was asked for it (``embed=True``; semantic dedup uses it).
    """

    itm: np.ndarray | None = None
    itc: np.ndarray | None = None
    clip: np.ndarray | None = None
    image_embedding: np.ndarray | None = None

    def get(self, scorer: str) -> np.ndarray:
        """The scores of ``scorer`` (``itm``, ``itc`` or ``clip``).

        Raises:
            KeyError: that scorer was not computed for this result.
        """
        value = getattr(self, scorer, None) if scorer in ("itm", "itc", "clip") else None
        if value is None:
            raise KeyError(f"scorer {scorer!r} was not computed")
        return value


def token_counts(tokenizer, texts: list[str]) -> list[int]:
    """How many tokens each text has for ``tokenizer``, special tokens included, without truncation.

    A scorer reads only its first ``max_text_tokens`` of them; a count above that means the text
    was judged on a prefix (the ``web_text_tokens`` / ``web_text_truncated`` columns).

    Args:
        tokenizer: a transformers tokenizer (BLIP's WordPiece, CLIP's BPE).
        texts: the texts.

    Returns:
        One int per text.
    """
    if not texts:
        return []
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)
    return [len(ids) for ids in enc["input_ids"]]
