"""Metrics of the bootstrap experiment, graded against the shapes world's ground truth.

- :func:`filter_report`: the filter's decision on each web caption against its ``noise_type``
  label: recall (share removed) per noise type, the share of clean captions kept, precision.
- :func:`caption_report`: synthetic-caption correctness: :func:`~capfilt.synthetic.world.parse_caption`
  turns a generated caption back into objects; exact match and per-attribute accuracy.
- :func:`retrieval`: image-text retrieval TR@1 / IR@1 on the test split, BLIP's protocol (BLIP
  §5.1: ITC similarities pick the top ``k`` candidates, ITM re-ranks them). A retrieved text (image)
  counts as correct when it names exactly the query image's (text's) objects, since in this world
  different images can share a description.

All models are used through capfilt's own wrappers (:class:`~capfilt.modeling.blip_scorer.BlipScorer`,
:class:`~capfilt.modeling.captioner.BlipCaptioner`), the code ``capfilt run`` uses.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from capfilt.synthetic.world import NOISE_TYPES, attribute_scores, parse_caption


def decode(images: Sequence[bytes]) -> list[Image.Image]:
    """JPEG/PNG bytes -> RGB PIL images."""
    return [Image.open(io.BytesIO(b)).convert("RGB") for b in images]


def filter_report(kept: Sequence[bool], noise_types: Sequence[str]) -> dict[str, Any]:
    """Score the filter's keep/drop decisions on web captions against their labels.

    Args:
        kept: per row, whether the web caption was kept (ITM >= threshold).
        noise_types: per row, the label (``clean`` or a noise type).

    Returns:
        ``{"recall": {type: share of that type removed}, "clean_keep_rate": share of clean kept,
        "precision": share of removed captions that were noisy, "counts": {type: rows},
        "noise_ratio": share of web captions removed}``. Types with no rows are left out.
    """
    kept_a, types = np.asarray(kept, bool), np.asarray(noise_types)
    recall, counts = {}, {}
    for t in NOISE_TYPES:
        m = types == t
        counts[t] = int(m.sum())
        if t != "clean" and m.any():
            recall[t] = float((~kept_a[m]).mean())
    clean = types == "clean"
    removed = ~kept_a
    return {"recall": recall,
            "clean_keep_rate": float(kept_a[clean].mean()) if clean.any() else float("nan"),
            "precision": float((~clean[removed]).mean()) if removed.any() else float("nan"),
            "noise_ratio": float(removed.mean()) if len(kept_a) else float("nan"),
            "counts": counts}


def caption_report(captions: Sequence[str], contents: Sequence[Counter]) -> dict[str, float]:
    """Share of ``captions`` that are exactly right, and per attribute (colours, shapes, count)."""
    scores = [attribute_scores(c, t) for c, t in zip(captions, contents)]
    n = max(len(scores), 1)
    return {k: sum(s[k] for s in scores) / n for k in ("exact", "colors", "shapes", "count")} | {"n": len(scores)}


def generate_captions(captioner: Any, images: Sequence[Image.Image], decoding: Any, seed: int = 0) -> list[str]:
    """One caption per image with ``captioner`` (:class:`capfilt.modeling.captioner.Decoding`, per-row seeds)."""
    seeds = [seed * 1_000_003 + i for i in range(len(images))]
    return [c[0] for c in captioner.generate(list(images), seeds, decoding)]


def retrieval(scorer: Any, images: Sequence[Image.Image], texts: Sequence[str], contents: Sequence[Counter],
              k: int = 16, batch: int = 64) -> dict[str, float]:
    """TR@1 and IR@1 (in [0, 1]) with ITC top-``k`` candidates re-ranked by ITM (BLIP §5.1).

    Args:
        scorer: a :class:`~capfilt.modeling.blip_scorer.BlipScorer`.
        images: ``N`` test images; ``texts``: ``N`` captions, ``texts[i]`` written for ``images[i]``;
        contents: ``N`` true contents of the images.
        k: ITC candidates re-ranked by ITM (``0``: ITC only).

    Returns:
        ``{"tr1", "ir1", "tr1_itc", "ir1_itc"}``.
    """
    import torch
    import torch.nn.functional as F

    model = scorer.model
    text_sets = [parse_caption(t) for t in texts]
    with torch.inference_mode():
        feats_i, embeds = [], []
        for s in range(0, len(images), batch):
            e = scorer.encode_images(images[s:s + batch])
            embeds.append(e)
            feats_i.append(F.normalize(model.vision_proj(e[:, 0, :]).float(), dim=-1))
        img_feat = torch.cat(feats_i)
        image_embeds = torch.cat(embeds)
        feats_t = []
        for s in range(0, len(texts), batch):
            ids, mask = scorer.tokenize(texts[s:s + batch])
            out = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            feats_t.append(F.normalize(model.text_proj(out[:, 0, :]).float(), dim=-1))
        txt_feat = torch.cat(feats_t)
        sim = img_feat @ txt_feat.t()  # (N images, N texts)

        def itm(img_idx: list[int], txt_idx: list[int]) -> np.ndarray:
            """ITM match probabilities, float32 ``(P,)``, of the ``P`` pairs (image_idx[p], txt_idx[p])."""
            ids, mask = scorer.tokenize([texts[j] for j in txt_idx])
            enc = image_embeds[img_idx]
            out = model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=enc,
                                     encoder_attention_mask=torch.ones(enc.shape[:-1], dtype=torch.long)).last_hidden_state
            return torch.softmax(model.itm_head(out[:, 0, :]).float(), dim=-1)[:, 1].numpy()

        def best(row: torch.Tensor, query: int, image_query: bool) -> tuple[int, int]:
            """``(ITM-reranked top-1, ITC top-1)`` candidate index for one query; ``row``: float ``(N,)``
            ITC similarities of the query to every candidate."""
            top_itc = int(row.argmax())
            if k <= 0:
                return top_itc, top_itc
            cand = row.topk(min(k, row.numel())).indices.tolist()
            s = itm([query] * len(cand), cand) if image_query else itm(cand, [query] * len(cand))
            return cand[int(np.argmax(s))], top_itc

        tr = tr_itc = ir = ir_itc = 0
        for i in range(len(images)):
            j, j0 = best(sim[i], i, True)
            tr += text_sets[j] == contents[i]
            tr_itc += text_sets[j0] == contents[i]
        for t in range(len(texts)):
            j, j0 = best(sim[:, t], t, False)
            ir += contents[j] == text_sets[t]
            ir_itc += contents[j0] == text_sets[t]
    n = max(len(images), 1)
    return {"tr1": tr / n, "ir1": ir / n, "tr1_itc": tr_itc / n, "ir1_itc": ir_itc / n}


def output_report(output: str, threshold: float) -> dict[str, Any]:
    """Grade a ``capfilt run`` output of a shapes-world split against its labels.

    Reads the committed shards' ``status``, ``noise_type``, ``objects``, ``web_itm``,
    ``synthetic_captions`` and ``synthetic_itm`` columns.

    Args:
        output: the run's output folder.
        threshold: the ITM threshold the run's filter used.

    Returns:
        ``{"rows", "downloaded", "filter": filter_report(...) + threshold, "synthetic": caption_report
        of the first synthetic caption of every image, "synthetic_kept": the same over the synthetic
        captions the filter kept}``.
    """
    import json

    import pyarrow.dataset as ds

    cols = ["status", "noise_type", "objects", "web_itm", "synthetic_captions", "synthetic_itm"]
    rows = ds.dataset(str(output), format="parquet").to_table(columns=cols).to_pylist()
    ok = [r for r in rows if r["status"] == "success"]
    kept = [r["web_itm"] is not None and r["web_itm"] >= threshold for r in ok]
    contents = [Counter((o["color"], o["shape"]) for o in json.loads(r["objects"])) for r in ok]
    syn = [(r["synthetic_captions"] or [""])[0] for r in ok]
    syn_ok = [bool(r["synthetic_itm"]) and r["synthetic_itm"][0] >= threshold for r in ok]
    return {"rows": len(rows), "downloaded": len(ok),
            "filter": {**filter_report(kept, [r["noise_type"] for r in ok]), "threshold": threshold},
            "synthetic": caption_report(syn, contents),
            "synthetic_kept": caption_report([s for s, k in zip(syn, syn_ok) if k],
                                             [c for c, k in zip(contents, syn_ok) if k])}
