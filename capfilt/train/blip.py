"""BLIP objectives (BLIP §3.2) on ``transformers``' BLIP modules: ITC, ITM with hard negatives, LM.

One :class:`BlipTask` covers three recipes:

- ``blip`` pre-training: captioner (``BlipForConditionalGeneration``: vision encoder + image-grounded
  text decoder) and filter (``BlipForImageTextRetrieval``: image-grounded text encoder, ITC
  projections, ITM head) joined into BLIP's multimodal mixture of encoder-decoder:

  * one image encoder: the filter uses the captioner's ``vision_model`` (the same module);
  * with ``share_text_layers`` (BLIP §3.1, "all parameters except for the SA layers"; the official
    ``tie_encoder_decoder_weights(..., skip_key="/attention")``), the filter's text encoder
    uses the decoder's modules for: the embeddings (word + position embeddings and their
    LayerNorm), and in every layer the cross-attention block (query/key/value, output dense,
    LayerNorm) and the feed-forward block (``intermediate.dense``, ``output.dense``,
    ``output.LayerNorm``). Not shared: each layer's self-attention block (``attention.self``
    query/key/value and ``attention.output`` dense + LayerNorm: bidirectional in the encoder,
    causal in the decoder), the decoder's LM head transform and bias (its output matrix is
    tied to the shared word embeddings), and the filter's ``vision_proj``, ``text_proj`` and
    ``itm_head``.
  Where training starts: the shared modules hold *one* checkpoint's weights,
  ``model.shared_weights_from`` (default ``captioner``). Starting from two different finetuned
  checkpoints (``blip-base-pretrain``: the COCO captioner and the COCO ITM filter), the filter
  keeps its own self-attention, ``vision_proj``, ``text_proj`` and ``itm_head`` but its image
  encoder, text embeddings, cross-attention and feed-forward blocks become the captioner's; a
  warning lists what was discarded, and the saved components' ``capfilt.json`` records
  ``shared_weights_from``.
- ``caption`` (COCO finetuning of the captioner, LM only) and ``itm`` (COCO finetuning of the
  filter, ITC + ITM): the same code with one component.

Losses (names in logs: ``itc``, ``itm``, ``lm``):

- ITC: in-batch image-text contrastive loss on ``normalize(vision_proj(image [CLS]))`` and
  ``normalize(text_proj(text [CLS]))`` (text encoder without cross-attention), learnable
  temperature clamped to [0.001, 0.5]; targets spread uniformly over the in-batch pairs of the same
  ``group`` (the same image, e.g. five COCO captions), as BLIP's retrieval finetuning does. This is
  the momentum-free variant: no momentum encoder, no queue, no momentum distillation.
- ITM: binary match/no-match on the text encoder with cross-attention to the image; for every
  image one negative text and for every text one negative image, sampled from the detached
  in-batch ITC softmax (hard negative mining, BLIP §3.2), never from the same group. The ITM
  text's first token is ``[ENC]`` as in BLIP (``encoder_input_ids[:, 0] = enc_token_id``) or
  ``[CLS]``, per ``model.itm_text_prefix`` (:mod:`capfilt.modeling.itm_prefix`); the choice is
  recorded in the saved filter's ``capfilt.json`` so that ``capfilt run`` scores the same way.
  ITC reads the text with ``[CLS]`` (BLIP's unimodal text encoder).
- LM: image-grounded decoder, first token replaced by ``[DEC]`` (``bos_token_id``), optional
  prompt excluded from the loss (BLIP COCO captioning: ``"a picture of "``), cross-entropy with
  label smoothing 0.1 (BLIP) over the non-pad tokens.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from capfilt.config import ConfigError
from capfilt.modeling.itm_prefix import with_prefix
from capfilt.train.data import collate_common
from capfilt.train.task import TrainTask, apply_config_overrides, load_hf

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# objective functions shared with BLIP-2
# ------------------------------------------------------------------------------------------------
def itc_loss(sim_i2t: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Symmetric in-batch contrastive loss.

    Args:
        sim_i2t: float ``(B, B)`` image-to-text similarities already divided by the temperature.
        groups: int64 ``(B,)``; pairs with equal group are positives (targets spread evenly).

    Returns:
        Scalar ``(CE(i2t) + CE(t2i)) / 2`` with soft targets.
    """
    pos = (groups[:, None] == groups[None, :]).to(sim_i2t.dtype)
    targets = pos / pos.sum(1, keepdim=True)
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_i2t.t(), dim=1) * targets).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


def sample_negatives(sim: torch.Tensor, groups: torch.Tensor, hard: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One in-batch negative per anchor (row of ``sim``), never of the anchor's group.

    Args:
        sim: ``(B, B)`` anchor-to-candidate similarities / temperature (detached inside).
        groups: int64 ``(B,)`` group of each anchor = candidate index.
        hard: sample with probability ``softmax(sim) + 1e-4`` (BLIP §3.2 hard negative mining,
            the official code's smoothing); false: uniform over valid candidates.

    Returns:
        ``(index, valid)``: int64 ``(B,)`` candidate index and bool ``(B,)``, false where the
        batch holds no candidate of another group (that anchor gets no negative).
    """
    with torch.no_grad():
        same = groups[:, None] == groups[None, :]
        w = F.softmax(sim.float(), dim=1) + 1e-4 if hard else torch.ones_like(sim, dtype=torch.float32)
        w = w.masked_fill(same, 0.0)
        valid = w.sum(1) > 0
        idx = torch.zeros(sim.size(0), dtype=torch.long, device=sim.device)
        if bool(valid.any()):
            idx[valid] = torch.multinomial(w[valid], 1).squeeze(1)
    return idx, valid


def itm_pairs(sim_i2t: torch.Tensor, groups: torch.Tensor, hard: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image and text indices of the ITM batch: ``B`` positives, then negatives.

    Negatives: for each image ``i`` (with a valid negative) the pair (image ``i``, sampled text);
    for each text ``t`` the pair (sampled image, text ``t``).

    Returns:
        ``(image_idx, text_idx, labels)``: int64 ``(M,)`` each, ``labels`` 1 = match, 0 = no match,
        ``B <= M <= 3B``.
    """
    b = sim_i2t.size(0)
    ar = torch.arange(b, device=sim_i2t.device)
    neg_text, ok_i = sample_negatives(sim_i2t, groups, hard)
    neg_image, ok_t = sample_negatives(sim_i2t.t(), groups, hard)
    image_idx = torch.cat([ar, ar[ok_i], neg_image[ok_t]])
    text_idx = torch.cat([ar, neg_text[ok_i], ar[ok_t]])
    labels = torch.cat([torch.ones(b, dtype=torch.long, device=ar.device),
                        torch.zeros(int(ok_i.sum()) + int(ok_t.sum()), dtype=torch.long, device=ar.device)])
    return image_idx, text_idx, labels


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Next-token cross-entropy: ``logits[:, :-1]`` against ``labels[:, 1:]`` (``-100`` ignored).

    Args:
        logits: float ``(B, L, V)``.
        labels: int64 ``(B, L)`` aligned with the inputs.
    """
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100, label_smoothing=label_smoothing)


# ------------------------------------------------------------------------------------------------
# batches
# ------------------------------------------------------------------------------------------------
class BlipCollator:
    """Samples -> BLIP batch (runs in DataLoader workers; picklable).

    Output keys (besides :func:`~capfilt.train.data.collate_common`'s): with ``plain``:
    ``input_ids`` / ``attention_mask`` int64 ``(B, L)`` = ``[CLS] text [SEP]`` (BlipProcessor's
    tokenization, truncated to ``max_tokens``); with ``lm``: ``lm_input_ids`` (``[DEC] prompt text
    [SEP]``), ``lm_attention_mask`` and ``lm_labels`` (``-100`` on padding and on ``[DEC]`` +
    prompt tokens, BLIP's ``decoder_targets[:, :prompt_length] = -100``).

    Args:
        tokenizer: the BLIP (BERT WordPiece) tokenizer.
        max_tokens: truncation length in tokens.
        prompt: LM prompt (``""`` for pre-training).
        plain / lm: which encodings to build.
        bos_token_id: the decoder's BOS (``[DEC]``); default ``tokenizer.bos_token_id``.
    """

    def __init__(self, tokenizer: Any, max_tokens: int, prompt: str = "", plain: bool = True, lm: bool = False,
                 bos_token_id: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.prompt = prompt
        self.plain = plain
        self.lm = lm
        self.bos = bos_token_id if bos_token_id is not None else tokenizer.bos_token_id
        if lm and self.bos is None:
            raise ConfigError("the tokenizer has no bos_token ([DEC]) for the decoder")
        self.prompt_len = len(tokenizer(prompt).input_ids) - 1  # [CLS] + prompt tokens, without [SEP]

    def _tok(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_common(samples)
        if self.plain:
            batch["input_ids"], batch["attention_mask"] = self._tok(batch["texts"])
        if self.lm:
            ids, mask = self._tok([self.prompt + t for t in batch["texts"]])
            ids = ids.clone()
            ids[:, 0] = self.bos
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, : self.prompt_len] = -100
            batch["lm_input_ids"], batch["lm_attention_mask"], batch["lm_labels"] = ids, mask, labels
        return batch


# ------------------------------------------------------------------------------------------------
# the task
# ------------------------------------------------------------------------------------------------
def _shared_pairs(filter: Any, captioner: Any, share_text: bool) -> list[tuple[str, nn.Module, nn.Module]]:
    """``(name, filter module, captioner module)`` of every module BLIP pre-training shares."""
    pairs = [("vision_model", filter.vision_model, captioner.vision_model)]
    if share_text:
        enc, dec = filter.text_encoder, captioner.text_decoder.bert
        pairs.append(("text_encoder.embeddings", enc.embeddings, dec.embeddings))
        for i, (le, ld) in enumerate(zip(enc.encoder.layer, dec.encoder.layer)):
            for name in ("crossattention", "intermediate", "output"):
                if hasattr(le, name) and hasattr(ld, name):
                    pairs.append((f"text_encoder.encoder.layer.{i}.{name}", getattr(le, name), getattr(ld, name)))
    return pairs


def take_shared_weights(filter: Any, captioner: Any, share_text: bool, source: str) -> dict[str, Any]:
    """Before sharing, make both components' shared modules hold ``source``'s weights.

    Args:
        filter / captioner: the two BLIP components (before :func:`share_text_layers`).
        share_text: whether the text layers are shared too (else only the image encoder).
        source: ``captioner`` (keep the captioner's weights: sharing then simply drops the
            filter's copies) or ``filter`` (copy the filter's into the captioner's modules).

    Returns:
        ``{"modules": [names whose weights differed and were replaced], "tensors": count,
        "parameters": count}`` describing what the other component lost.

    Raises:
        ConfigError: the modules' shapes differ (as :func:`share_text_layers`).
    """
    lost: list[str] = []
    tensors = params = 0
    for name, fm, cm in _shared_pairs(filter, captioner, share_text):
        keep, drop = (cm, fm) if source == "captioner" else (fm, cm)
        ksd, dsd = keep.state_dict(), drop.state_dict()
        if ksd.keys() != dsd.keys() or any(ksd[k].shape != dsd[k].shape for k in ksd):
            raise ConfigError(f"cannot share {name}: the captioner's and the filter's differ in shape")
        differ = [k for k in ksd if not torch.equal(ksd[k], dsd[k])]
        if differ:
            lost.append(name)
            tensors += len(differ)
            params += sum(dsd[k].numel() for k in differ)
        if source == "filter":
            with torch.no_grad():
                for k in ksd:
                    dsd[k].copy_(ksd[k])
    return {"modules": lost, "tensors": tensors, "parameters": params}


def share_text_layers(encoder: nn.Module, decoder: nn.Module) -> list[str]:
    """Make a ``BlipTextModel`` encoder use a decoder's modules for everything but self-attention.

    Args:
        encoder: the filter's ``text_encoder``.
        decoder: the captioner's ``text_decoder.bert``.

    Returns:
        Names (relative to the encoder) of the modules now shared.

    Raises:
        ConfigError: different layer counts or shapes.
    """
    if len(encoder.encoder.layer) != len(decoder.encoder.layer) or any(
            p.shape != q.shape for p, q in zip(encoder.embeddings.parameters(), decoder.embeddings.parameters())):
        raise ConfigError("share_text_layers needs a text encoder and decoder of the same shape "
                          "(same vocabulary, hidden size and layer count)")
    shared = ["embeddings"]
    encoder.embeddings = decoder.embeddings
    for i, (le, ld) in enumerate(zip(encoder.encoder.layer, decoder.encoder.layer)):
        for name in ("crossattention", "intermediate", "output"):
            if not hasattr(le, name) or not hasattr(ld, name):
                raise ConfigError(f"text layer {i} has no {name} module (config.is_decoder must be true)")
            setattr(le, name, getattr(ld, name))
            shared.append(f"encoder.layer.{i}.{name}")
    return shared


class BlipTask(TrainTask):
    """BLIP ITC / ITM / LM training over a captioner and/or a filter (module docstring).

    Args:
        captioner: ``BlipForConditionalGeneration`` or ``None`` (needed for ``lm``).
        captioner_processor: its ``BlipProcessor``.
        filter: ``BlipForImageTextRetrieval`` or ``None`` (needed for ``itc`` / ``itm``).
        filter_processor: its ``BlipProcessor``.
        objectives: subset of ``("itc", "itm", "lm")``.
        loss: :class:`~capfilt.train.config.LossConfig`.
        data: :class:`~capfilt.train.config.TrainDataConfig` (prompt, token limit).
        share_text: tie the text encoder to the decoder (BLIP §3.1) when both exist.
        shared_weights_from: ``captioner`` / ``filter``: whose weights the shared modules start
            from when both components exist (:func:`take_shared_weights`); the other's are
            discarded, with a warning naming them when they differ.
        sources: ``{"captioner": id, "filter": id}`` for that warning.
        itm_text_prefix: ``auto`` / ``enc`` / ``cls``: the ITM text's first token
            (:func:`capfilt.modeling.itm_prefix.resolve_itm_prefix`).
        recorded_prefix: the prefix the starting filter checkpoint was trained with (its ``capfilt.json``).
        recipe_name: written into the saved components' ``capfilt.json``.

    Attributes:
        itm_text_prefix / itm_prefix_id: the resolved prefix (``enc`` | ``cls``) and its token id
            (``None`` without a filter).

    Raises:
        ConfigError: missing component for an objective, components that cannot be shared, or
            ``enc`` for a tokenizer without ``[ENC]``.
    """

    def __init__(self, captioner: Any, captioner_processor: Any, filter: Any, filter_processor: Any,
                 objectives: tuple[str, ...], loss: Any, data: Any, share_text: bool = True,
                 itm_text_prefix: str = "auto", recorded_prefix: str | None = None, recipe_name: str | None = None,
                 shared_weights_from: str = "captioner", sources: dict[str, str] | None = None) -> None:
        super().__init__()
        self.shared_weights_from: str | None = None
        self.discarded: dict[str, Any] = {}
        self.recipe_name = recipe_name
        self.itm_text_prefix: str | None = None
        self.itm_prefix_id: int | None = None
        self.objectives = tuple(objectives)
        if "lm" in objectives and captioner is None:
            raise ConfigError("objective lm needs a captioner")
        if {"itc", "itm"} & set(objectives) and filter is None:
            raise ConfigError("objectives itc/itm need a filter")
        self.captioner = captioner if "lm" in objectives else None
        self.filter = filter if {"itc", "itm"} & set(objectives) else None
        self.loss_cfg = loss
        self.data_cfg = data
        self.loss_weights = dict(loss.weights)
        self.shared: list[str] = []
        if self.captioner is not None:
            self.components["captioner"] = (self.captioner, captioner_processor)
        if self.filter is not None:
            self.components["filter"] = (self.filter, filter_processor)
        if self.captioner is not None and self.filter is not None:
            cs = captioner_processor.image_processor.size
            fs = filter_processor.image_processor.size
            if dict(cs) != dict(fs):
                raise ConfigError(f"captioner and filter image processors differ ({dict(cs)} vs {dict(fs)}); "
                                  f"BLIP pre-training uses one image encoder")
            if shared_weights_from not in ("captioner", "filter"):
                raise ConfigError(f"model.shared_weights_from must be captioner or filter, not {shared_weights_from!r}")
            self.shared_weights_from = shared_weights_from
            self.discarded = take_shared_weights(self.filter, self.captioner, share_text, shared_weights_from)
            if self.discarded["modules"]:
                other = "filter" if shared_weights_from == "captioner" else "captioner"
                src = sources or {}
                mods = self.discarded["modules"]
                log.warning(
                    "BLIP pre-training shares the image encoder%s between captioner and filter: the %s's own weights "
                    "for %d module(s) (%s; %d tensors, %s parameters) are discarded and training starts from the "
                    "%s's (%s). Set model.shared_weights_from=%s to start these modules from the %s instead.",
                    " and text layers (all but self-attention)" if share_text else "", other, len(mods),
                    ", ".join(mods[:4]) + (f", ... {len(mods) - 4} more" if len(mods) > 4 else ""),
                    self.discarded["tensors"], f"{self.discarded['parameters']:,}", shared_weights_from,
                    src.get(shared_weights_from, "?"), other, other)
            self.filter.vision_model = self.captioner.vision_model  # one image encoder (BLIP §3.1)
            self.shared.append("vision_model")
            if share_text:
                self.shared += [f"text_encoder.{n}" for n in
                                share_text_layers(self.filter.text_encoder, self.captioner.text_decoder.bert)]
        self._processor = captioner_processor if self.captioner is not None else filter_processor
        if self.filter is not None:
            if "itm" not in objectives:  # the text encoder's cross-attention is used by ITM only
                self.exclude(self.filter.itm_head)
                self.exclude(*(layer.crossattention for i, layer in enumerate(self.filter.text_encoder.encoder.layer)
                               if f"text_encoder.encoder.layer.{i}.crossattention" not in self.shared))
            if "itc" not in objectives:  # similarities then only pick ITM negatives (no gradient)
                self.exclude(self.filter.vision_proj, self.filter.text_proj)
        if self.filter is not None:
            from capfilt.modeling.itm_prefix import resolve_itm_prefix

            try:
                self.itm_text_prefix, self.itm_prefix_id = resolve_itm_prefix(
                    itm_text_prefix, filter_processor.tokenizer, recorded_prefix,
                    getattr(self.filter.config, "text_config", None))
            except ValueError as e:
                raise ConfigError(f"model.itm_text_prefix: {e}") from None
        if {"itc", "itm"} & set(objectives):
            self.temp = nn.Parameter(torch.tensor(float(loss.temp)),
                                     requires_grad=bool(loss.learn_temp and "itc" in objectives))

    def model_record(self, name: str) -> dict[str, Any]:
        """The filter records its ITM text prefix (``capfilt run`` scores with the same one)."""
        rec: dict[str, Any] = {"recipe": self.recipe_name} if self.recipe_name else {}
        if name == "filter" and self.itm_text_prefix is not None:
            rec["itm_text_prefix"] = self.itm_text_prefix
        if self.shared_weights_from is not None:
            rec["shared_weights_from"] = self.shared_weights_from
        return rec

    @property
    def image_processor(self) -> Any:
        """The captioner's (or filter's) image processor."""
        return self._processor.image_processor

    def collator(self) -> BlipCollator:
        """:class:`BlipCollator` with plain tokens for ITC/ITM and decoder tokens for LM."""
        return BlipCollator(self._processor.tokenizer, self.data_cfg.max_text_tokens, prompt=self.data_cfg.prompt,
                            plain=self.filter is not None, lm=self.captioner is not None,
                            bos_token_id=(self.captioner.config.text_config.bos_token_id
                                          if self.captioner is not None else None))

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Losses of one micro-batch.

        Args:
            batch: :class:`BlipCollator` output on this module's device.

        Returns:
            ``{"itc", "itm", "lm"}`` (those in :attr:`objectives`) and ``"loss"``, float32 scalars.
        """
        pix = batch["pixel_values"]
        losses: dict[str, torch.Tensor] = {}
        image_embeds = None
        if self.filter is not None:
            f = self.filter
            image_embeds = f.vision_model(pixel_values=pix).last_hidden_state  # (B, N, Dv)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            text = f.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, Dt)
            image_feat = F.normalize(f.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)  # (B, P)
            text_feat = F.normalize(f.text_proj(text[:, 0, :]).float(), dim=-1)  # (B, P)
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
            sim_i2t = image_feat @ text_feat.t() / self.temp  # (B, B)
            groups = batch["group"]
            if "itc" in self.objectives:
                losses["itc"] = itc_loss(sim_i2t, groups)
            if "itm" in self.objectives:
                img_idx, txt_idx, labels = itm_pairs(sim_i2t.detach(), groups, self.loss_cfg.hard_negatives)
                enc = image_embeds.index_select(0, img_idx)
                itm_ids = with_prefix(ids.index_select(0, txt_idx), self.itm_prefix_id)  # [ENC] or [CLS] first
                out = f.text_encoder(input_ids=itm_ids,
                                     attention_mask=mask.index_select(0, txt_idx),
                                     encoder_hidden_states=enc,
                                     encoder_attention_mask=torch.ones(enc.shape[:-1], dtype=torch.long,
                                                                       device=enc.device)).last_hidden_state
                losses["itm"] = F.cross_entropy(f.itm_head(out[:, 0, :]).float(), labels)
        if self.captioner is not None:
            c = self.captioner
            if image_embeds is None or "vision_model" not in self.shared:
                image_embeds = c.vision_model(pixel_values=pix).last_hidden_state
            logits = c.text_decoder(input_ids=batch["lm_input_ids"], attention_mask=batch["lm_attention_mask"],
                                    encoder_hidden_states=image_embeds).logits  # (B, L, V)
            losses["lm"] = lm_loss(logits, batch["lm_labels"], self.loss_cfg.label_smoothing)
        return self.total(losses)


def build_blip_task(recipe: Any) -> BlipTask:
    """Load the recipe's captioner / filter (pretrained or fresh from their configs) into a :class:`BlipTask`.

    Raises:
        ModelLoadError: a checkpoint cannot be loaded.
        ConfigError: components that cannot be combined.
    """
    from transformers import (AutoConfig, AutoProcessor, BlipForConditionalGeneration,
                              BlipForImageTextRetrieval)

    m, objectives = recipe.model, tuple(recipe.objectives)

    def load(cls: Any, model_id: str) -> tuple[Any, Any]:
        """Load (or randomly initialise) ``cls`` for ``model_id``; returns ``(model, processor)``."""
        proc = load_hf(AutoProcessor, model_id, m.builder, m.revision)
        cfg = apply_config_overrides(load_hf(AutoConfig, model_id, m.builder, m.revision), m.config_overrides)
        if m.init == "pretrained":
            model = load_hf(cls, model_id, m.builder, m.revision, config=cfg)
        else:
            model = cls(cfg)
        return model, proc

    captioner = cap_proc = filt = filt_proc = None
    recorded = None
    if "lm" in objectives:
        captioner, cap_proc = load(BlipForConditionalGeneration, m.captioner)
    if {"itc", "itm"} & set(objectives):
        filt, filt_proc = load(BlipForImageTextRetrieval, m.filter)
        recorded = _recorded_prefix(m.filter, m.builder, m.revision) if m.init == "pretrained" else None
    return BlipTask(captioner, cap_proc, filt, filt_proc, objectives, recipe.loss, recipe.data,
                    share_text=m.share_text_layers, itm_text_prefix=m.itm_text_prefix, recorded_prefix=recorded,
                    recipe_name=recipe.name, shared_weights_from=m.shared_weights_from,
                    sources={"captioner": str(m.captioner), "filter": str(m.filter)})


def _recorded_prefix(model_id: str, builder: str | None, revision: str | None) -> str | None:
    """The ITM prefix a local starting checkpoint recorded in its ``capfilt.json`` (``None``: no record)."""
    from pathlib import Path

    from capfilt.modeling.loading import resolve_checkpoint
    from capfilt.modeling.record import read_model_record

    folder = Path(resolve_checkpoint(model_id, builder, revision).path)
    try:
        return read_model_record(folder).get("itm_text_prefix") if folder.is_dir() else None
    except ValueError as e:
        raise ConfigError(str(e)) from None
