"""The captioner: BLIP's image-grounded text decoder (BLIP §3.3) and a BLIP-2 variant (BLIP-2 §3.4).

Decoding follows BLIP §4.3 and the official code (LAVIS ``blip_caption.generate``): nucleus
sampling with ``top_p=0.9`` (plus transformers' default ``top_k=50``, which the official code
inherited from ``generate``), repetition penalty 1.1, ``max_length`` 30 / ``min_length`` 5 counted
over the decoder sequence *including* the prompt (as in LAVIS and
``BlipForConditionalGeneration.generate``), prompt ``"a picture of "`` fed to the decoder and
stripped from the output; beam search when ``num_beams > 1``.

Efficiency: the vision transformer runs once per image, and the decoder's cross-attention keys and
values of the image tokens are computed once per image too (:meth:`BlipCaptioner.cross_attention_cache`);
the ``num_captions`` sequences of an image share both (``generate`` alone would re-project the image
tokens for every sequence). Attention in the ViT and the decoder runs through
``scaled_dot_product_attention`` (:mod:`capfilt.modeling.attention`; transformers' BLIP is eager-only).

Reproducibility: every image has its own ``torch.Generator`` seeded from its row seed, so its
captions do not depend on which other images share the batch, and for one image they equal
``torch.manual_seed(seed); model.generate(...)`` token for token (see :class:`PerRowSampler`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from capfilt.config import ModelPreset, ModelSpec
from capfilt.modeling.batching import FitLimit, run_with_oom_backoff

log = logging.getLogger(__name__)

#: transformers' default ``top_k`` for sampling (``GenerationConfig``), applied before top-p by a
#: plain ``generate(do_sample=True, top_p=0.9)`` call, hence by BLIP's and LAVIS' captioners.
HF_DEFAULT_TOP_K = 50


@dataclass(frozen=True)
class Decoding:
    """How :meth:`BlipCaptioner.generate` decodes (defaults: BLIP §4.3 nucleus sampling).

    Attributes:
        num_captions: captions per image.
        top_p: nucleus-sampling probability mass in (0, 1].
        temperature: softmax temperature (> 0).
        repetition_penalty: CTRL repetition penalty (1.0: none).
        max_length / min_length: tokens, counted over the decoder sequence including the prompt
            (BLIP); new tokens for BLIP-2's decoder-only language model.
        num_beams: ``> 1`` switches to beam search (deterministic; ``num_captions <= num_beams``).
        prompt: text fed to the decoder first and stripped from the output.
        batch_size: images per model call (halved on CUDA out-of-memory).
    """

    num_captions: int = 1
    top_p: float = 0.9
    temperature: float = 1.0
    repetition_penalty: float = 1.1
    max_length: int = 30
    min_length: int = 5
    num_beams: int = 1
    prompt: str = "a picture of "
    batch_size: int = 8


def strip_prompt(tokenizer: Any, sequences: Any, prompt_len: int) -> list[str]:
    """Decode ``sequences`` (int64 ``(R, L)``, prompt tokens first) and remove the prompt text.

    The whole sequence is decoded (so a first generated word-piece such as ``##s`` joins the
    prompt's last word the way the tokenizer would render it) and the decoded prompt prefix is cut
    off; if the decoded text does not start with it, only the tokens after the prompt are decoded.

    Returns:
        ``R`` stripped strings.
    """
    full = tokenizer.batch_decode(sequences, skip_special_tokens=True)
    prefix = tokenizer.decode(sequences[0, :prompt_len], skip_special_tokens=True).strip()
    out = []
    for i, text in enumerate(full):
        text = text.strip()
        if prefix and text.startswith(prefix):
            text = text[len(prefix):]
        elif prefix:
            text = tokenizer.decode(sequences[i, prompt_len:], skip_special_tokens=True)
        out.append(text.strip())
    return out


def _make_generator(seed: int, device: Any) -> Any:
    import torch

    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


class PerRowSampler:
    """A ``LogitsProcessor`` that samples each image's rows with that image's own RNG.

    transformers applies custom logits processors *before* its own temperature/top-k/top-p
    warpers, so the caller runs ``generate(do_sample=True, temperature=1, top_k=0, top_p=1)``
    (no HF warpers) with this as the last processor. It applies HF's own
    ``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and ``TopPLogitsWarper`` (same order, same
    arguments as a direct call), computes ``softmax`` in float32 and draws the next token of image
    ``i``'s rows with ``torch.multinomial(probs[rows_i], 1, generator=g_i)``; the returned scores
    are ``-inf`` except at the drawn token, so HF's own sampling step must pick it.

    Args:
        seeds: one seed per image (``B``), any int in ``[0, 2**63)``.
        rows_per_image: sequences per image (``num_return_sequences``); rows of image ``i`` are
            ``i*rows_per_image ... (i+1)*rows_per_image - 1`` (``generate`` repeats inputs that way).
        temperature, top_k, top_p: warper settings (``top_k=0`` / ``top_p=1`` disable them).
        device: device of the logits (the generators live there).

    Call: ``(input_ids: int64 (B*n, L), scores: float32 (B*n, V)) -> float32 (B*n, V)``.
    """

    def __init__(self, seeds: Sequence[int], rows_per_image: int, temperature: float, top_k: int, top_p: float,
                 device: Any) -> None:
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.generators = [_make_generator(s, device) for s in seeds]
        self.rows = rows_per_image
        self.warpers: list[Any] = []
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p))

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        for w in self.warpers:
            scores = w(input_ids, scores)
        probs = torch.nn.functional.softmax(scores, dim=-1)
        if probs.shape[0] != len(self.generators) * self.rows:
            raise RuntimeError(f"PerRowSampler expected {len(self.generators) * self.rows} rows, got {probs.shape[0]}")
        picks = [torch.multinomial(probs[i * self.rows:(i + 1) * self.rows], num_samples=1, generator=g)
                 for i, g in enumerate(self.generators)]
        tokens = torch.cat(picks, dim=0)  # (B*n, 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tokens, 0.0)


class BlipCaptioner:
    """Synthetic captions from ``BlipForConditionalGeneration`` (e.g. ``Salesforce/blip-image-captioning-large``).

    Args:
        model: a ``BlipForConditionalGeneration`` in eval mode, already on ``device``.
        processor: its ``BlipProcessor`` (image processor + BERT tokenizer with ``[DEC]`` BOS).
        share_cross_kv: compute the decoder's cross-attention keys/values of each image once and
            hand them to ``generate`` as a pre-filled cache (see :meth:`cross_attention_cache`);
            ``False`` lets ``generate`` project the image tokens again for every returned sequence
            (HF's behaviour; kept for the benchmark).
    """

    def __init__(self, model: Any, processor: Any, share_cross_kv: bool = True) -> None:
        self.model = model
        self.processor = processor
        self.share_cross_kv = share_cross_kv
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    @classmethod
    def from_spec(cls, spec: ModelSpec, preset: ModelPreset) -> "BlipCaptioner":
        """Load the checkpoint named by ``spec``; its attention is switched to the fused kernel
        (:mod:`capfilt.modeling.attention`: transformers has only eager attention for BLIP).

        Raises:
            ModelLoadError: the checkpoint or its processor cannot be loaded.
        """
        from transformers import BlipForConditionalGeneration, BlipProcessor

        from capfilt.modeling.attention import use_fused_attention
        from capfilt.modeling.loading import load_pretrained, load_processor

        model = load_pretrained(BlipForConditionalGeneration, spec, preset, attn_implementation="eager")
        use_fused_attention(model)
        return cls(model, load_processor(BlipProcessor, spec, preset))

    # ---------------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str, batch: int) -> Any:
        """Decoder prompt as ``BlipForConditionalGeneration.generate`` builds it.

        ``[CLS] prompt [SEP]`` from the tokenizer, first token replaced by the decoder BOS
        (``text_config.bos_token_id``, ``[DEC]``), trailing ``[SEP]`` dropped.

        Returns:
            int64 ``(batch, P)`` on the model's device.
        """
        ids = self.processor.tokenizer(prompt, return_tensors="pt").input_ids
        ids[:, 0] = self.model.config.text_config.bos_token_id
        return ids[:, :-1].repeat(batch, 1).to(self.device)

    def pixel_values(self, images: Sequence[Any]) -> Any:
        """``float (B, 3, H, W)`` in the model's dtype and device from PIL RGB images."""
        pv = self.processor.image_processor(images=list(images), return_tensors="pt").pixel_values
        return pv.to(self.device, self.dtype)

    def cross_attention_cache(self, image_embeds: Any, expand: int) -> Any:
        """A generation cache whose cross-attention part already holds every image's keys/values.

        ``BlipTextSelfAttention`` projects the ``N`` image tokens to keys/values in every decoder
        layer on the first decoding step, once per *sequence*; with ``num_captions`` sequences per
        image that is ``num_captions`` identical projections. Here they are computed once per image
        and repeated (a copy, no compute) to the ``expand`` rows ``generate`` makes per image; the
        cache is marked as filled, so the decoder reuses it from the first step.

        Args:
            image_embeds: float ``(B, N, D_vision)`` from the vision model.
            expand: rows per image in ``generate`` (``num_beams`` for beam search, else ``num_captions``).

        Returns:
            ``transformers.EncoderDecoderCache`` (empty self-attention part).
        """
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        b, n, _ = image_embeds.shape
        cross = DynamicCache()
        for i, layer in enumerate(self.model.text_decoder.bert.encoder.layer):
            att = layer.crossattention.self
            shape = (b, n, att.num_attention_heads, att.attention_head_size)
            keys = att.key(image_embeds).view(shape).transpose(1, 2).repeat_interleave(expand, dim=0)
            values = att.value(image_embeds).view(shape).transpose(1, 2).repeat_interleave(expand, dim=0)
            cross.update(keys, values, i)
        return EncoderDecoderCache(DynamicCache(), cross)

    def _generate_kwargs(self, cfg: Decoding, seeds: Sequence[int]) -> dict[str, Any]:
        kw: dict[str, Any] = dict(max_length=cfg.max_length, min_length=cfg.min_length,
                                  repetition_penalty=cfg.repetition_penalty, num_return_sequences=cfg.num_captions)
        if cfg.num_beams > 1:
            kw.update(num_beams=cfg.num_beams, do_sample=False)
        else:
            # the generation config a direct call reads: the text decoder's (BLIP) or the LM's (BLIP-2)
            decoder = getattr(self.model, "text_decoder", None) or getattr(self.model, "language_model", self.model)
            gc = decoder.generation_config
            top_k = gc.top_k if getattr(gc, "top_k", None) is not None else HF_DEFAULT_TOP_K
            sampler = PerRowSampler(seeds, cfg.num_captions, cfg.temperature, top_k, cfg.top_p, self.device)
            from transformers import LogitsProcessorList

            kw.update(do_sample=True, num_beams=1, temperature=1.0, top_k=0, top_p=1.0,
                      logits_processor=LogitsProcessorList([sampler]))
        return kw

    def _generate_chunk(self, items: Sequence[tuple[Any, int]], cfg: Decoding) -> list[list[str]]:
        import torch

        images = [im for im, _ in items]
        seeds = [s for _, s in items]
        with torch.inference_mode():
            pixel_values = self.pixel_values(images)
            image_embeds = self.model.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, N, D)
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
            prompt = self.prompt_ids(cfg.prompt, len(images))
            tc = self.model.config.text_config
            kw = self._generate_kwargs(cfg, seeds)
            if self.share_cross_kv:
                kw["cache"] = self.cross_attention_cache(image_embeds, cfg.num_beams if cfg.num_beams > 1
                                                         else cfg.num_captions)
            out = self.model.text_decoder.generate(
                input_ids=prompt, eos_token_id=tc.sep_token_id, pad_token_id=tc.pad_token_id,
                encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask, **kw)
        texts = strip_prompt(self.processor.tokenizer, out, prompt.shape[1])
        n = cfg.num_captions
        return [texts[i * n:(i + 1) * n] for i in range(len(images))]

    def generate(self, images: Sequence[Any], seeds: Sequence[int], decoding: Decoding = Decoding()
                 ) -> list[list[str]]:
        """Write ``decoding.num_captions`` captions for each image.

        Args:
            images: PIL images, RGB (``B``).
            seeds: one sampling seed per image (``B`` ints in ``[0, 2**63)``); captions of an image
                depend only on the image, its seed and ``decoding``, never on the other images.
            decoding: decoding settings; ``decoding.batch_size`` images go through the model at a
                time, halved (and logged) on CUDA out-of-memory.

        Returns:
            ``B`` lists of ``decoding.num_captions`` strings, prompt stripped, in generation order
            (beam search: best beam first).

        Raises:
            ValueError: ``len(images) != len(seeds)``.
            torch.OutOfMemoryError: a single image does not fit.
        """
        if len(images) != len(seeds):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        items = list(zip(images, seeds))
        if getattr(self, "_fit", None) is None:
            self._fit = FitLimit()  # what fits on the device, kept across calls
        return run_with_oom_backoff(lambda part: self._generate_chunk(part, decoding), items, decoding.batch_size,
                                    what="captioner", limit=self._fit)


class Blip2Captioner(BlipCaptioner):
    """Synthetic captions from ``Blip2ForConditionalGeneration`` (e.g. ``Salesforce/blip2-opt-2.7b``).

    The image goes through ViT + Q-Former once per image inside ``Blip2ForConditionalGeneration.generate``;
    its query embeddings are repeated for the ``num_captions`` sequences. The prompt (right-stripped:
    BPE tokenizers would make the trailing space a token of its own) follows the query tokens; only
    the newly generated tokens are decoded. For a decoder-only language model ``max_length`` /
    ``min_length`` count new tokens (``max_new_tokens`` / ``min_new_tokens``): the prefix length
    depends on the number of query tokens.
    """

    @classmethod
    def from_spec(cls, spec: ModelSpec, preset: ModelPreset) -> "Blip2Captioner":
        """Load the BLIP-2 checkpoint named by ``spec``.

        Raises:
            ModelLoadError: the checkpoint or its processor cannot be loaded.
        """
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        from capfilt.modeling.loading import load_pretrained, load_processor

        model = load_pretrained(Blip2ForConditionalGeneration, spec, preset)
        return cls(model, load_processor(Blip2Processor, spec, preset))

    def _generate_chunk(self, items: Sequence[tuple[Any, int]], cfg: Decoding) -> list[list[str]]:
        import torch

        images = [im for im, _ in items]
        seeds = [s for _, s in items]
        prompt = cfg.prompt.rstrip()
        inputs = self.processor(images=list(images), text=[prompt] * len(images), return_tensors="pt")
        kw = self._generate_kwargs(cfg, seeds)
        kw["max_new_tokens"] = kw.pop("max_length")
        kw["min_new_tokens"] = kw.pop("min_length")
        with torch.inference_mode():
            out = self.model.generate(pixel_values=inputs.pixel_values.to(self.device, self.dtype),
                                      input_ids=inputs.input_ids.to(self.device),
                                      attention_mask=inputs.attention_mask.to(self.device), **kw)
        texts = self.processor.tokenizer.batch_decode(out[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)
        n = cfg.num_captions
        return [[t.strip() for t in texts[i * n:(i + 1) * n]] for i in range(len(images))]


def load_captioner(spec: ModelSpec, preset: ModelPreset) -> BlipCaptioner:
    """The captioner wrapper for ``spec.kind`` (``blip`` or ``blip2``).

    Raises:
        ModelLoadError: the checkpoint cannot be loaded, or ``kind`` is not a captioner kind.
    """
    from capfilt.errors import ModelLoadError

    if spec.kind == "blip":
        return BlipCaptioner.from_spec(spec, preset)
    if spec.kind == "blip2":
        return Blip2Captioner.from_spec(spec, preset)
    raise ModelLoadError(f"captioner {spec.id!r} has kind {spec.kind!r}; a captioner must be kind blip or blip2")
