"""Caption: synthetic captions from the captioner (BLIP §3.3 CapFilt "Cap"; BLIP-2 §3.4 with 10 per image)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

from capfilt.config import CaptionConfig, ModelPreset
from capfilt.schema import CAPTION_FIELDS, FAILED_TO_CAPTION
from capfilt.modeling.batching import FitLimit
from capfilt.stages._model_rows import add_seconds, decode_image, mark_failed, row_seed, run_rows, success_rows
from capfilt.stages.base import RunContext, Stage, column_or_nulls, set_field

if TYPE_CHECKING:
    from capfilt.config import PipelineConfig


def decoding_of(cfg: CaptionConfig) -> Any:
    """The recipe's ``caption`` section unpacked into the captioner's plain decoding settings.

    Returns:
        :class:`capfilt.modeling.captioner.Decoding` with the section's values of its fields.
    """
    from dataclasses import fields

    from capfilt.modeling.captioner import Decoding

    return Decoding(**{f.name: getattr(cfg, f.name) for f in fields(Decoding)})


class CaptionStage(Stage):
    """Add ``synthetic_captions: list<string>`` (``cfg.num_captions`` per successful row, generation order).

    Input columns: ``key`` (string), ``status`` (only ``success`` rows are captioned), ``image``
    (encoded bytes from the download stage). Rows that are not ``success`` get a null list.
    Each row samples with its own seed, :func:`row_seed` ``(cfg.seed, key)``, so its captions do
    not depend on the batch it lands in. ``cfg.batch_size`` images go through the model at a
    time; if a micro-batch raises it is retried row by row and a row that still fails gets status
    ``failed_to_caption`` with a short ``error_message``.

    Also adds the internal column ``_seconds_caption`` (float64: this call's wall seconds divided
    by its row count) for the writer's throughput stats.

    Args:
        cfg: decoding settings (:class:`capfilt.config.CaptionConfig`).
        preset: model preset; ``preset.captioner`` is loaded in :meth:`setup`.
    """

    name: ClassVar[str] = "caption"
    section: ClassVar[str] = "caption"
    shape: ClassVar[str] = "actor_pool"
    fields: ClassVar[tuple[pa.Field, ...]] = tuple(CAPTION_FIELDS)
    #: Image bytes -> RGB ``PIL.Image``; the fused stage (:mod:`capfilt.stages.fused`) shares one decode.
    decode = staticmethod(decode_image)

    def __init__(self, cfg: CaptionConfig, preset: ModelPreset):
        self.cfg = cfg
        self.preset = preset
        self.captioner: Any = None
        self._fit = FitLimit()  # the largest micro-batch that fits on the device (learnt on OOM)

    @classmethod
    def model_roles(cls, cfg: PipelineConfig) -> set[str]:
        """The preset's ``captioner``."""
        return {"captioner"}

    @classmethod
    def build(cls, cfg: PipelineConfig, ctx: RunContext) -> CaptionStage:
        """The caption stage with the run's model preset."""
        return cls(cfg.caption, ctx.preset)

    @staticmethod
    def stats(table: pa.Table) -> dict[str, Any]:
        """``images_captioned`` (rows with a caption list) and ``captions_generated`` (captions in them)."""
        n_imgs = n_caps = 0
        for lst in column_or_nulls(table, CAPTION_FIELDS[0].name):
            if lst is not None:
                n_imgs += 1
                n_caps += len(lst)
        return {"images_captioned": n_imgs, "captions_generated": n_caps}

    @classmethod
    def throughput(cls, totals: dict[str, Any], seconds: float) -> dict[str, float] | None:
        """``images_per_s`` and ``captions_per_s`` per worker-second (``None`` if nothing was captioned)."""
        if not totals["images_captioned"]:
            return None
        return {"images_per_s": totals["images_captioned"] / seconds,
                "captions_per_s": totals["captions_generated"] / seconds, "seconds": seconds}


    @classmethod
    def enabled(cls, cfg: PipelineConfig) -> bool:
        """``caption.enabled``, unless ``resources.fused`` runs it inside the caption_score stage."""
        return bool(cfg.caption.enabled and not (cfg.resources.fused and cfg.score.enabled))

    def setup(self) -> None:
        """Load the captioner (``kind: blip`` or ``blip2``) on its device.

        Raises:
            ModelLoadError: the checkpoint cannot be loaded.
        """
        if self.captioner is None:
            from capfilt.modeling.captioner import load_captioner

            self.captioner = load_captioner(self.preset.captioner, self.preset)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Caption the ``success`` rows of ``batch``; same rows, same order, plus the stage's columns."""
        start = time.perf_counter()
        self.setup()
        keys = column_or_nulls(batch, "key")
        images = column_or_nulls(batch, "image")
        decoding = decoding_of(self.cfg)

        def caption(rows: Sequence[int]) -> list[list[str]]:
            """Captions for the given row indices (decoding included, so a bad image fails its row only)."""
            ims = [self.decode(images[r]) for r in rows]
            seeds = [row_seed(self.cfg.seed, str(keys[r])) for r in rows]
            return self.captioner.generate(ims, seeds, decoding)

        results, errors = run_rows(success_rows(batch), self.cfg.batch_size, caption, self.name, self._fit)
        captions = [results.get(i) for i in range(batch.num_rows)]
        out = set_field(batch, CAPTION_FIELDS[0], captions)
        out = mark_failed(out, errors, FAILED_TO_CAPTION)
        return add_seconds(out, "_seconds_caption", time.perf_counter() - start)
