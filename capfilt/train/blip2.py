"""BLIP-2 two-stage pre-training (BLIP-2 §3.2, §3.3) on ``transformers``' Blip2 modules.

Stage 1, vision-language representation learning (:class:`Blip2Stage1Task`): a Q-Former with
``num_query_tokens`` (32) learned queries reads a **frozen** image encoder through cross-attention
(``Blip2ForImageTextRetrieval``: ``query_tokens``, ``embeddings``, ``qformer`` with text-path
feed-forward layers, ``vision_projection``, ``text_projection``, ``itm_head``; plus an ITG head of
our own whose output matrix is tied to the Q-Former word embeddings, as LAVIS' ``BertLMHeadModel``).
Three objectives with the paper's self-attention masks (BLIP-2 Fig. 2):

- ITC, *uni-modal* mask: queries and text never see each other (two separate Q-Former passes).
  Image-text similarity = max over the 32 query embeddings of their cosine with the text
  ``[CLS]`` embedding, divided by a learnable temperature; in-batch negatives.
- ITM, *bi-directional* mask: queries and text attend to each other; the ITM head is applied to
  every query output and the logits are averaged; hard negatives from the ITC similarities.
- ITG, *multi-modal causal* mask: queries attend to queries only; text tokens attend to all
  queries and to earlier text tokens; the first text token is ``[DEC]`` (the tokenizer's BOS);
  next-token cross-entropy with label smoothing 0.1 (LAVIS).

Stage 2, generative learning (:class:`Blip2Stage2Task`): ``Blip2ForConditionalGeneration``: the
query outputs go through ``language_projection`` (a linear layer) into a **frozen** decoder-only
LM (OPT) as soft visual prompts in front of the text; LM loss on the text tokens (the LM's own
cross-entropy, no smoothing, as LAVIS). Each text ends with the token generation stops on
(:func:`generation_stop_id`: ``"\n"`` for HF's OPT checkpoints, as LAVIS appends ``"\n"``), not
blindly the tokenizer's ``</s>``, so a trained checkpoint stops instead of running to
``max_new_tokens``; the saved captioner's ``capfilt.json`` records that token. Trained: ``query_tokens``, ``qformer``,
``language_projection``. The Q-Former can start from a stage-1 output (``model.qformer_from``).

Frozen modules have ``requires_grad=False`` and stay in eval mode (no dropout) while training.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from capfilt.config import ConfigError
from capfilt.train.blip import BlipCollator, itc_loss, itm_pairs, lm_loss
from capfilt.train.data import collate_common
from capfilt.train.task import TrainTask, apply_config_overrides, init_query_tokens, load_hf

log = logging.getLogger(__name__)


def self_attention_mask(allowed: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """A 4-D self-attention mask in the form ``transformers``' attention backends expect.

    Args:
        allowed: bool ``(B, L, L)``; ``[b, i, j]`` true when position ``i`` may attend to ``j``.
        impl: ``config._attn_implementation`` (``sdpa``: boolean mask; ``eager``: additive).
        dtype: additive masks' dtype (the attention scores' dtype).

    Returns:
        ``(B, 1, L, L)`` bool (sdpa) or float with 0 / dtype-min (eager).

    Raises:
        ConfigError: other attention implementations (flash/flex) are not supported here.
    """
    allowed = allowed[:, None]
    if impl == "sdpa":
        return allowed
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    raise ConfigError(f"Q-Former attention implementation {impl!r} is not supported by the ITG mask; "
                      f"load it with attn_implementation='sdpa' or 'eager'")


def itg_allowed(num_query: int, text_mask: torch.Tensor) -> torch.Tensor:
    """BLIP-2's multi-modal causal mask.

    Args:
        num_query: ``Q`` query positions first.
        text_mask: int/bool ``(B, T)`` text padding mask (1 = token).

    Returns:
        bool ``(B, Q+T, Q+T)``: queries see queries; text sees all queries and text tokens up to
        itself that are not padding.
    """
    b, t = text_mask.shape
    n = num_query + t
    dev = text_mask.device
    allowed = torch.zeros(b, n, n, dtype=torch.bool, device=dev)
    allowed[:, :num_query, :num_query] = True
    allowed[:, num_query:, :num_query] = True
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=dev))
    allowed[:, num_query:, num_query:] = causal[None] & text_mask.bool()[:, None, :]
    return allowed


class ItgHead(nn.Module):
    """Q-Former text-generation head: BERT's prediction transform, then logits over the vocabulary.

    ``logits = LayerNorm(gelu(dense(h))) @ word_embeddings.T + bias`` (BERT / LAVIS ``cls.predictions``
    with the decoder matrix tied to the input embeddings).

    Args:
        config: the Q-Former config (``hidden_size``, ``hidden_act``, ``layer_norm_eps``,
            ``initializer_range``, ``vocab_size``).
        word_embeddings: the Q-Former's ``nn.Embedding`` (tied output matrix).
    """

    def __init__(self, config: Any, word_embeddings: nn.Embedding) -> None:
        from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        nn.init.normal_(self.transform.dense.weight, std=config.initializer_range)
        nn.init.zeros_(self.transform.dense.bias)
        self.word_embeddings = word_embeddings
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """float ``(B, T, H)`` -> logits ``(B, T, V)``."""
        return F.linear(self.transform(hidden), self.word_embeddings.weight, self.bias)


class Blip2Stage1Task(TrainTask):
    """BLIP-2 stage 1: ITC / ITM / ITG of a Q-Former over a frozen image encoder (module docstring).

    Args:
        model: ``Blip2ForImageTextRetrieval`` (``qformer_config.use_qformer_text_input`` true).
        processor: ``BlipProcessor`` (image processor + the Q-Former's BERT tokenizer), saved with it.
        objectives: subset of ``("itc", "itm", "itg")``.
        loss / data: :class:`~capfilt.train.config.LossConfig` / ``TrainDataConfig``.
    """

    def __init__(self, model: Any, processor: Any, objectives: tuple[str, ...], loss: Any, data: Any) -> None:
        super().__init__()
        self.objectives = tuple(objectives)
        self.model = model
        self.processor = processor
        self.loss_cfg = loss
        self.data_cfg = data
        self.loss_weights = dict(loss.weights)
        self.components["filter"] = (model, processor)
        self.freeze("vision_model", model.vision_model)
        qcfg = model.config.qformer_config
        self.num_query = model.config.num_query_tokens
        tok = processor.tokenizer
        self.bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
        self.temp = nn.Parameter(torch.tensor(float(loss.temp)),
                                 requires_grad=bool(loss.learn_temp and "itc" in objectives))
        if "itg" in objectives:
            self.itg_head = ItgHead(qcfg, model.embeddings.word_embeddings)
        if "itm" not in objectives:
            self.exclude(model.itm_head)
        if "itc" not in objectives:  # similarities then only pick ITM negatives (no gradient)
            self.exclude(model.vision_projection, model.text_projection)

    @property
    def image_processor(self) -> Any:
        """The frozen image encoder's image processor."""
        return self.processor.image_processor

    def collator(self) -> BlipCollator:
        """``[CLS] text [SEP]`` BERT tokens (BLIP-2 stage 1 truncates texts to 32 tokens in LAVIS)."""
        return BlipCollator(self.processor.tokenizer, self.data_cfg.max_text_tokens, plain=True, lm=False)

    def _qformer(self, embeds: torch.Tensor, query_length: int, mask: torch.Tensor | None,
                 image_embeds: torch.Tensor | None) -> torch.Tensor:
        return self.model.qformer(query_embeds=embeds, query_length=query_length, attention_mask=mask,
                                  encoder_hidden_states=image_embeds).last_hidden_state

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Losses of one micro-batch: ``{"itc", "itm", "itg"}`` (those in :attr:`objectives`) and ``"loss"``."""
        m = self.model
        with torch.no_grad():
            image_embeds = m.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state  # (B, N, Dv)
        ids, mask, groups = batch["input_ids"], batch["attention_mask"], batch["group"]
        b, q = ids.size(0), self.num_query
        queries = m.query_tokens.expand(b, -1, -1)  # (B, Q, H)
        losses: dict[str, torch.Tensor] = {}
        if {"itc", "itm"} & set(self.objectives):
            # uni-modal mask: two separate passes
            q_out = self._qformer(queries, q, None, image_embeds)  # (B, Q, H)
            image_feats = F.normalize(m.vision_projection(q_out).float(), dim=-1)  # (B, Q, P)
            t_out = self._qformer(m.embeddings(input_ids=ids), 0, mask, None)  # (B, T, H)
            text_feat = F.normalize(m.text_projection(t_out[:, 0, :]).float(), dim=-1)  # (B, P)
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
            sim_i2t = torch.einsum("iqp,tp->itq", image_feats, text_feat).max(-1).values / self.temp  # (B, B)
            if "itc" in self.objectives:
                losses["itc"] = itc_loss(sim_i2t, groups)
            if "itm" in self.objectives:
                img_idx, txt_idx, labels = itm_pairs(sim_i2t.detach(), groups, self.loss_cfg.hard_negatives)
                n = img_idx.numel()
                emb = m.embeddings(input_ids=ids.index_select(0, txt_idx), query_embeds=m.query_tokens.expand(n, -1, -1))
                att = torch.cat([torch.ones(n, q, dtype=mask.dtype, device=mask.device),
                                 mask.index_select(0, txt_idx)], dim=1)  # bi-directional mask
                out = self._qformer(emb, q, att, image_embeds.index_select(0, img_idx))
                logits = m.itm_head(out[:, :q, :]).float().mean(dim=1)  # (n, 2)
                losses["itm"] = F.cross_entropy(logits, labels)
        if "itg" in self.objectives:
            dec = ids.clone()
            dec[:, 0] = self.bos
            emb = m.embeddings(input_ids=dec, query_embeds=queries)  # (B, Q+T, H)
            att = self_attention_mask(itg_allowed(q, mask), m.qformer.config._attn_implementation, emb.dtype)
            out = self._qformer(emb, q, att, image_embeds)
            logits = self.itg_head(out[:, q:, :])  # (B, T, V)
            labels = dec.masked_fill(mask == 0, -100)
            losses["itg"] = lm_loss(logits, labels, self.loss_cfg.label_smoothing)
        return self.total(losses)


class Blip2LmCollator:
    """Samples -> BLIP-2 stage-2 batch for a decoder-only LM (picklable).

    ``input_ids`` = ``Q`` image placeholder tokens (replaced by the projected queries inside
    ``Blip2ForConditionalGeneration``), then the LM tokenizer's encoding of ``prompt + text``
    (with its BOS), then the stop token; right padding. ``labels`` = ``input_ids`` with ``-100``
    on the placeholders, BOS + prompt tokens and padding.

    Args:
        tokenizer: the LM tokenizer (OPT: BOS = EOS = ``</s>``).
        num_query: placeholder count (``config.num_query_tokens``).
        image_token_id: ``config.image_token_id``.
        max_tokens: text tokens kept (BOS and the stop token included).
        prompt: text prefix excluded from the loss.
        eos_token_id: the token appended to every text: the one generation stops on
            (:func:`generation_stop_id`; for HF's OPT BLIP-2 checkpoints ``"\n"``, as LAVIS trains);
            default the tokenizer's EOS.
    """

    def __init__(self, tokenizer: Any, num_query: int, image_token_id: int, max_tokens: int, prompt: str = "",
                 eos_token_id: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.eos = int(eos_token_id if eos_token_id is not None else tokenizer.eos_token_id)
        self.num_query = num_query
        self.image_token_id = image_token_id
        self.max_tokens = max_tokens
        self.prompt = prompt
        self.prompt_len = len(tokenizer(prompt).input_ids)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_common(samples)
        enc = self.tokenizer([self.prompt + t for t in batch["texts"]], truncation=True,
                             max_length=self.max_tokens - 1)["input_ids"]
        seqs = [[self.image_token_id] * self.num_query + e + [self.eos] for e in enc]
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        labels = torch.full((len(seqs), n), -100, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            start = self.num_query + self.prompt_len
            labels[i, start: len(s)] = ids[i, start: len(s)]
        batch["input_ids"], batch["attention_mask"], batch["labels"] = ids, mask, labels
        return batch


def generation_stop_id(model: Any, tokenizer: Any) -> int:
    """The token ``model.generate`` stops on: the model's ``generation_config.eos_token_id`` (the first
    when it is a list), else its LM config's ``eos_token_id``, else the tokenizer's EOS.

    HF's OPT BLIP-2 checkpoints stop on ``"\n"`` (id 50118; their conversion sets it, as LAVIS trains
    with a ``"\n"`` suffix) while the OPT tokenizer's EOS is ``</s>``: the stage-2 trainer appends
    this token so a trained checkpoint stops where generation looks for the end.
    """
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(model.config, "text_config", None), "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return int(eos) if eos is not None else int(tokenizer.eos_token_id)


class Blip2Stage2Task(TrainTask):
    """BLIP-2 stage 2: Q-Former + linear projection into a frozen decoder-only LM, LM loss.

    Args:
        model: ``Blip2ForConditionalGeneration`` with a decoder-only LM.
        processor: its ``Blip2Processor`` (``num_query_tokens`` matching the model), saved with it.
        data: :class:`~capfilt.train.config.TrainDataConfig` (prompt, token limit).

    Raises:
        ConfigError: an encoder-decoder LM (FlanT5) - only decoder-only LMs are supported.
    """

    objectives = ("lm",)

    def __init__(self, model: Any, processor: Any, data: Any, loss: Any) -> None:
        super().__init__()
        if not model.config.use_decoder_only_language_model:
            raise ConfigError("BLIP-2 stage 2 here supports decoder-only LMs (OPT); this checkpoint's LM "
                              "is an encoder-decoder")
        self.model = model
        self.processor = processor
        self.data_cfg = data
        self.loss_weights = dict(loss.weights)
        self.eos_token_id = generation_stop_id(model, processor.tokenizer)
        self.components["captioner"] = (model, processor)
        self.freeze("vision_model", model.vision_model)
        self.freeze("language_model", model.language_model)
        # no text goes through the Q-Former here: its text-path feed-forward layers (present when
        # the config has use_qformer_text_input) stay as they are (LAVIS deletes them for stage 2)
        for layer in model.qformer.encoder.layer:
            self.exclude(getattr(layer, "intermediate", None), getattr(layer, "output", None))

    @property
    def image_processor(self) -> Any:
        """The frozen image encoder's image processor."""
        return self.processor.image_processor

    def collator(self) -> Blip2LmCollator:
        """:class:`Blip2LmCollator` for this model's query count and image token."""
        cfg = self.model.config
        return Blip2LmCollator(self.processor.tokenizer, cfg.num_query_tokens, cfg.image_token_id,
                               self.data_cfg.max_text_tokens, self.data_cfg.prompt, eos_token_id=self.eos_token_id)

    def model_record(self, name: str) -> dict[str, Any]:
        """The captioner records the stop token its captions were trained to end with."""
        tok = self.processor.tokenizer
        return {"eos_token_id": self.eos_token_id, "eos_token": tok.convert_ids_to_tokens(self.eos_token_id)}

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{"lm", "loss"}`` of one micro-batch (the LM's own shifted cross-entropy)."""
        out = self.model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"], labels=batch["labels"])
        return self.total({"lm": out.loss.float()})


def build_blip2_task(recipe: Any) -> TrainTask:
    """Build stage 1 or 2 of a ``blip2`` recipe.

    Stage 1 loads ``model.blip2`` as ``Blip2ForImageTextRetrieval`` with ``num_query_tokens``
    queries, Q-Former text input on and no image placeholder tokens; weights the checkpoint lacks
    (e.g. starting from a ``Blip2ForConditionalGeneration``: text embeddings, text feed-forward
    layers, projections, ITM head, query tokens of another count) are freshly initialised and listed
    by transformers' load report. Stage 2 loads ``model.blip2`` as ``Blip2ForConditionalGeneration``
    and, with ``model.qformer_from``, copies ``query_tokens`` and every ``qformer.*`` tensor of the
    same name and shape from that stage-1 folder.

    Raises:
        ModelLoadError: a checkpoint cannot be loaded.
        ConfigError: tokenizer larger than the Q-Former vocabulary, or a stage-1 Q-Former of another shape.
    """
    from transformers import (AutoImageProcessor, AutoProcessor, AutoTokenizer, Blip2Config,
                              Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, BlipProcessor)

    m = recipe.model
    cfg = load_hf(Blip2Config, m.blip2, m.builder, m.revision)
    cfg.num_query_tokens = m.num_query_tokens
    apply_config_overrides(cfg, m.config_overrides)
    std = cfg.qformer_config.initializer_range
    if recipe.stage == 1:
        cfg.qformer_config.use_qformer_text_input = True
        cfg.image_token_index = None  # texts carry no image placeholders here
        tokenizer = load_hf(AutoTokenizer, m.tokenizer or m.blip2, m.builder, m.revision)
        if len(tokenizer) > cfg.qformer_config.vocab_size:
            raise ConfigError(f"the Q-Former tokenizer has {len(tokenizer)} tokens but the Q-Former vocabulary "
                              f"{cfg.qformer_config.vocab_size}; set model.tokenizer to its BERT tokenizer")
        if m.init == "pretrained":
            model = load_hf(Blip2ForImageTextRetrieval, m.blip2, m.builder, m.revision, config=cfg,
                            ignore_mismatched_sizes=True)
        else:
            model = Blip2ForImageTextRetrieval(cfg)
        if init_query_tokens(model.query_tokens, std):
            log.info("query tokens initialised N(0, %g)", std)
        image_processor = load_hf(AutoImageProcessor, m.blip2, m.builder, m.revision)
        processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
        return Blip2Stage1Task(model, processor, tuple(recipe.objectives), recipe.loss, recipe.data)

    if m.init == "pretrained":
        model = load_hf(Blip2ForConditionalGeneration, m.blip2, m.builder, m.revision, config=cfg,
                        ignore_mismatched_sizes=True)
    else:
        model = Blip2ForConditionalGeneration(cfg)
    if m.qformer_from:
        src = load_hf(Blip2ForImageTextRetrieval, m.qformer_from, m.builder, None)
        if src.query_tokens.shape != model.query_tokens.shape:
            raise ConfigError(f"{m.qformer_from} has query tokens {tuple(src.query_tokens.shape)}, the stage-2 "
                              f"model {tuple(model.query_tokens.shape)}; set model.num_query_tokens to match")
        own = model.state_dict()
        copied = 0
        with torch.no_grad():
            model.query_tokens.copy_(src.query_tokens)
            for k, v in src.state_dict().items():
                if k.startswith("qformer.") and k in own and own[k].shape == v.shape:
                    own[k].copy_(v)
                    copied += 1
        log.info("stage 2: query tokens + %d Q-Former tensors from %s", copied, m.qformer_from)
        del src
    if init_query_tokens(model.query_tokens, std):
        log.info("query tokens initialised N(0, %g)", std)
    processor = load_hf(AutoProcessor, m.blip2, m.builder, m.revision)
    processor.num_query_tokens = m.num_query_tokens
    return Blip2Stage2Task(model, processor, recipe.data, recipe.loss)
