"""Score: every candidate text (web and synthetic) of a row against its image (BLIP §3.3 "Filt", BLIP-2 §3.4).

Only scores are added here; the keep/drop decision is :mod:`capfilt.stages.select` (so
thresholds can be re-tuned without a GPU).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from capfilt.config import ModelPreset, ScoreConfig
from capfilt.modeling.scores import ScoreResult, token_counts
from capfilt.schema import (CAPTION_FIELDS, FAILED_TO_SCORE, SEMDEDUP_FIELDS, SUCCESS, TEXT_LENGTH_FIELDS,
                            score_fields)
from capfilt.modeling.batching import FitLimit
from capfilt.stages._model_rows import add_seconds, decode_image, mark_failed, run_rows, success_rows
from capfilt.stages.base import RunContext, Stage, column_or_nulls, set_column, set_field

if TYPE_CHECKING:
    from capfilt.config import PipelineConfig

#: Key of the image embedding in a row's merged results (not a scorer name).
EMBEDDING = "image_embedding"
#: The preset role whose model computes each scorer.
SCORER_ROLES = {"itm": "filter", "itc": "filter", "clip": "clip"}


def _has_web(text: Any) -> bool:
    return isinstance(text, str) and bool(text.strip())


class ScoreStage(Stage):
    """Add, for each scorer ``s`` in ``cfg.scorers``, ``synthetic_<s>: list<float32>`` and ``web_<s>: float32``.

    Input columns: ``status`` (only ``success`` rows are scored), ``image`` (encoded bytes),
    ``caption`` (the web text; null or blank means none, as does ``web_lang_ok = false``) and ``synthetic_captions`` (may be absent
    or null). ``synthetic_<s>`` is aligned with ``synthetic_captions`` (null where that is null);
    ``web_<s>`` is null without a web caption. Non-``success`` rows get nulls.

    ``itm`` / ``itc`` come from the filter (``preset.filter``, :class:`BlipScorer`), ``clip`` from
    ``preset.clip`` (:class:`ClipScorer`). Each image is encoded once per model; texts are
    truncated to ``cfg.max_text_tokens`` (CLIP: its 77-token context). Truncation is recorded:
    ``web_text_tokens`` (int32, the web caption's token count for the filter's tokenizer, special
    tokens included) and ``web_text_truncated`` (bool, more than the filter reads), null where the
    row was not scored or has no web caption. ``cfg.batch_size`` images
    (with all their texts) per model call; a failing micro-batch is retried row by row and a row
    that still fails gets status ``failed_to_score`` and a short ``error_message``.

    Internal columns for the writer's stats: ``_seconds_score`` (float64, this call's wall seconds
    divided by its row count) and ``_texts_score`` (int32, texts scored in the row).

    With ``embed`` (``semdedup.enabled``) it also writes ``image_embedding`` (float32 ``(D,)`` list,
    :data:`capfilt.schema.SEMDEDUP_FIELDS`): the L2-normalised image embedding of the first scorer
    model (BLIP ITC ``vision_proj`` when ``itm``/``itc`` are scored, else CLIP), from the same vision pass.

    Args:
        cfg: :class:`capfilt.config.ScoreConfig`.
        preset: model preset (``filter`` and, when ``clip`` is a scorer, ``clip``).
        embed: also write ``image_embedding``.
    """

    name: ClassVar[str] = "score"
    section: ClassVar[str] = "score"
    shape: ClassVar[str] = "actor_pool"
    #: Image bytes -> RGB ``PIL.Image``; the fused stage (:mod:`capfilt.stages.fused`) shares one decode.
    decode = staticmethod(decode_image)

    def __init__(self, cfg: ScoreConfig, preset: ModelPreset, embed: bool = False):
        self.cfg = cfg
        self.preset = preset
        self.embed = embed
        self.scorers: list[Any] = []
        self._fit = FitLimit()  # the largest micro-batch that fits on the device (learnt on OOM)

    @classmethod
    def model_roles(cls, cfg: PipelineConfig) -> set[str]:
        """``filter`` for ``itm``/``itc``, ``clip`` for ``clip`` (see :data:`SCORER_ROLES`)."""
        return {SCORER_ROLES[s] for s in cfg.score.scorers}

    @classmethod
    def output_fields(cls, scorers: Sequence[str] = ()) -> list[pa.Field]:
        """:func:`capfilt.schema.score_fields` of each scorer the run's shards hold, then
        :data:`capfilt.schema.TEXT_LENGTH_FIELDS` (when there are scorers)."""
        return [f for s in scorers for f in score_fields(s)] + (list(TEXT_LENGTH_FIELDS) if scorers else [])

    @classmethod
    def build(cls, cfg: PipelineConfig, ctx: RunContext) -> ScoreStage:
        """The score stage with the run's model preset (embedding images when ``semdedup.enabled``)."""
        return cls(cfg.score, ctx.preset, embed=cfg.semdedup.enabled)

    @staticmethod
    def stats(table: pa.Table) -> dict[str, Any]:
        """``texts_scored``: candidate texts scored in the shard; ``web_texts_truncated``: web
        captions longer than the filter reads (judged on their first ``max_text_tokens``)."""
        out = {"texts_scored": 0, "web_texts_truncated": 0}
        if "_texts_score" in table.column_names:
            out["texts_scored"] = int(pc.sum(table.column("_texts_score")).as_py() or 0)
        if "web_text_truncated" in table.column_names:
            out["web_texts_truncated"] = int(pc.sum(table.column("web_text_truncated").cast(pa.int64())).as_py() or 0)
        return out

    @classmethod
    def throughput(cls, totals: dict[str, Any], seconds: float) -> dict[str, float] | None:
        """``texts_per_s`` and ``images_per_s`` per worker-second (``None`` if nothing was scored)."""
        if not totals["texts_scored"]:
            return None
        return {"texts_per_s": totals["texts_scored"] / seconds,
                "images_per_s": totals["status"].get(SUCCESS, 0) / seconds, "seconds": seconds}

    @classmethod
    def enabled(cls, cfg: PipelineConfig) -> bool:
        """``score.enabled``, unless ``resources.fused`` runs it inside the caption_score stage."""
        return bool(cfg.score.enabled and not (cfg.resources.fused and cfg.caption.enabled))

    def setup(self) -> None:
        """Load the scoring models ``cfg.scorers`` needs.

        Raises:
            ModelLoadError: a checkpoint cannot be loaded, or ``clip`` is a scorer but the preset
                has no ``clip`` model.
        """
        if self.scorers:
            return
        from capfilt.modeling.loading import require_role

        blip_kinds = [s for s in self.cfg.scorers if SCORER_ROLES[s] == "filter"]
        scorers: list[Any] = []
        if blip_kinds:
            from capfilt.modeling.blip_scorer import BlipScorer

            spec = require_role(self.preset, "filter")
            scorers.append(BlipScorer.from_spec(spec, self.preset, blip_kinds, self.cfg.max_text_tokens,
                                                self.cfg.itm_text_prefix))
        if "clip" in self.cfg.scorers:
            from capfilt.modeling.clip_scorer import ClipScorer

            scorers.append(ClipScorer.from_spec(require_role(self.preset, "clip"), self.preset))
        self.scorers = scorers

    def _score(self, images: Sequence[Any], texts: Sequence[Sequence[str]]) -> list[dict[str, np.ndarray]]:
        merged: list[dict[str, np.ndarray]] = [{} for _ in images]
        for n, scorer in enumerate(self.scorers):
            res: list[ScoreResult] = scorer.score(images, texts, embed=self.embed and n == 0)
            for m, r in zip(merged, res):
                for s in self.cfg.scorers:
                    value = getattr(r, s)
                    if value is not None:
                        m[s] = value
                if r.image_embedding is not None:
                    m[EMBEDDING] = r.image_embedding
        return merged

    def _web_lengths(self, web: list[Any], scored: dict[int, Any], n: int) -> tuple[list[int | None], list[bool | None]]:
        """``web_text_tokens`` and ``web_text_truncated`` of every row (null unless scored with a web caption),
        for the first scorer's tokenizer and limit (the BLIP filter's when it scores, else CLIP's)."""
        tokens: list[int | None] = [None] * n
        truncated: list[bool | None] = [None] * n
        rows = [r for r in sorted(scored) if _has_web(web[r])]
        if rows and self.scorers:
            scorer = self.scorers[0]
            counts = token_counts(scorer.processor.tokenizer, [web[r] for r in rows])
            for r, c in zip(rows, counts):
                tokens[r], truncated[r] = c, c > scorer.max_text_tokens
        return tokens, truncated

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Score the ``success`` rows of ``batch``; same rows, same order, plus the score columns
        and ``web_text_tokens`` / ``web_text_truncated``."""
        start = time.perf_counter()
        self.setup()
        images = column_or_nulls(batch, "image")
        usable = column_or_nulls(batch, "web_lang_ok")  # false: langid says the filter cannot read it
        web = [None if ok is False else w for w, ok in zip(column_or_nulls(batch, "caption"), usable)]
        synth = column_or_nulls(batch, CAPTION_FIELDS[0].name)

        def texts_of(r: int) -> list[str]:
            """Candidate texts of row ``r``: the web caption (if any), then its synthetic captions."""
            return list(synth[r] or []) + ([web[r]] if _has_web(web[r]) else [])

        def score(rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
            """Scores for the given row indices, one dict of per-scorer arrays per row."""
            ims = [self.decode(images[r]) for r in rows]
            return self._score(ims, [texts_of(r) for r in rows])

        results, errors = run_rows(success_rows(batch), self.cfg.batch_size, score, self.name, self._fit)
        n = batch.num_rows
        out = batch
        for s in self.cfg.scorers:
            syn_col: list[list[float] | None] = [None] * n
            web_col: list[float | None] = [None] * n
            for r, scores in results.items():
                values = scores[s].tolist()
                n_syn = len(synth[r]) if synth[r] is not None else 0
                syn_col[r] = values[:n_syn] if synth[r] is not None else None
                web_col[r] = values[n_syn] if _has_web(web[r]) else None
            syn_field, web_field = score_fields(s)
            out = set_field(out, syn_field, syn_col)
            out = set_field(out, web_field, web_col)
        if self.embed:
            emb_col = [results[r][EMBEDDING].tolist() if r in results else None for r in range(n)]
            out = set_field(out, SEMDEDUP_FIELDS[0], emb_col)
        tokens, truncated = self._web_lengths(web, results, n)
        length_fields = dict(zip((f.name for f in TEXT_LENGTH_FIELDS), TEXT_LENGTH_FIELDS))
        out = set_field(out, length_fields["web_text_tokens"], tokens)
        out = set_field(out, length_fields["web_text_truncated"], truncated)
        texts_count = [len(texts_of(r)) if r in results else 0 for r in range(n)]
        out = set_column(out, "_texts_score", pa.array(texts_count, pa.int32()))
        out = mark_failed(out, errors, FAILED_TO_SCORE)
        return add_seconds(out, "_seconds_score", time.perf_counter() - start)
