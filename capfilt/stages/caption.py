"""Caption: synthetic captions from the captioner (BLIP §3.3 CapFilt "Cap"; BLIP-2 §3.4 with 10 per image)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, ClassVar

import pyarrow as pa

from capfilt.config import CaptionConfig, ModelPreset
from capfilt.schema import FAILED_TO_CAPTION
from capfilt.stages._model_rows import (add_seconds, column, decode_image, mark_failed, row_seed, run_rows,
                                        success_rows)
from capfilt.stages.base import Stage, set_column


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
    uses_model: ClassVar[bool] = True

    def __init__(self, cfg: CaptionConfig, preset: ModelPreset):
        self.cfg = cfg
        self.preset = preset
        self.captioner: Any = None

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
        keys = column(batch, "key")
        images = column(batch, "image")

        def caption(rows: Sequence[int]) -> list[list[str]]:
            """Captions for the given row indices (decoding included, so a bad image fails its row only)."""
            ims = [decode_image(images[r]) for r in rows]
            seeds = [row_seed(self.cfg.seed, str(keys[r])) for r in rows]
            return self.captioner.generate(ims, seeds, self.cfg)

        results, errors = run_rows(success_rows(batch), self.cfg.batch_size, caption, self.name)
        captions = [results.get(i) for i in range(batch.num_rows)]
        out = set_column(batch, "synthetic_captions", pa.array(captions, pa.list_(pa.string())))
        out = mark_failed(out, errors, FAILED_TO_CAPTION)
        return add_seconds(out, "_seconds_caption", time.perf_counter() - start)
