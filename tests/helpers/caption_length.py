"""A toy filter stage, written the way a new stage is: one module with its stage and config section.

Marks rows whose web caption has fewer than ``min_words`` words as ``caption_too_short`` (they skip
the model stages) and records each caption's word count. Nothing in ``capfilt/`` knows about it:
:mod:`tests.stages.test_add_stage` adds it to a recipe.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from capfilt.config import PipelineConfig
from capfilt.schema import SUCCESS
from capfilt.stages.base import Stage, column_or_nulls, set_column, set_field

CAPTION_TOO_SHORT = "caption_too_short"
LENGTH_FIELDS = (pa.field("caption_words", pa.int32()),)


class CaptionLengthConfig(BaseModel):
    """The stage's recipe section: ``caption_length``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = True
    min_words: int = Field(2, ge=0)


class CaptionLengthPipeline(PipelineConfig):
    """A recipe with the ``caption_length`` section."""

    caption_length: CaptionLengthConfig = CaptionLengthConfig()


class CaptionLengthStage(Stage):
    """Add ``caption_words: int32`` (words of the web caption); too short: status ``caption_too_short``."""

    name: ClassVar[str] = "caption_length"
    section: ClassVar[str] = "caption_length"
    fields: ClassVar[tuple[pa.Field, ...]] = LENGTH_FIELDS

    def __init__(self, cfg: CaptionLengthConfig):
        self.cfg = cfg

    @staticmethod
    def stats(table: pa.Table) -> dict[str, Any]:
        """``captions_too_short``: rows this stage dropped."""
        return {"captions_too_short": column_or_nulls(table, "status").count(CAPTION_TOO_SHORT)}

    def __call__(self, batch: pa.Table) -> pa.Table:
        words = [len((c or "").split()) for c in column_or_nulls(batch, "caption")]
        status = column_or_nulls(batch, "status")
        status = [CAPTION_TOO_SHORT if s == SUCCESS and w < self.cfg.min_words else s for s, w in zip(status, words)]
        batch = set_column(batch, "status", pa.array(status, pa.string()))
        return set_field(batch, LENGTH_FIELDS[0], words)
