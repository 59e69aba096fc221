"""Caption and score in one actor (``resources.fused: true``): one model process, one GPU share.

The two-pool layout (a captioner pool and a scorer pool) lets caption and score of different
blocks overlap, at the price of two worker processes that each import torch and hold a model,
two GPU shares, and two decodes of every image. The fused stage runs
:class:`capfilt.stages.caption.CaptionStage` then :class:`capfilt.stages.score.ScoreStage` on the
same block inside one actor, sharing one decode per image (a per-call memo keyed by the image
bytes). Its output is exactly the two stages' output (same columns, same per-stage seconds), so
statistics, throughput and the report do not change. Which layout is faster on a machine is
measured in ``benchmarks/bench_e2e.py`` (RESULTS.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

from capfilt.stages._model_rows import decode_image
from capfilt.stages.base import RunContext, Stage
from capfilt.stages.caption import CaptionStage
from capfilt.stages.score import ScoreStage

if TYPE_CHECKING:
    from capfilt.config import PipelineConfig


class CaptionScoreStage(Stage):
    """Caption, then score, each block in one actor (:class:`CaptionStage` + :class:`ScoreStage`).

    Input and output are those of the two stages in a row: ``image`` (bytes), ``status``, ``key``,
    ``caption`` in; ``synthetic_captions`` and the score columns (and both stages' internal
    ``_seconds_*`` columns) out. Adds no columns or counters of its own.

    Args:
        caption: the caption stage of the run.
        score: the score stage of the run.
    """

    name: ClassVar[str] = "caption_score"
    section: ClassVar[str] = "caption"
    shape: ClassVar[str] = "actor_pool"

    def __init__(self, caption: CaptionStage, score: ScoreStage):
        self.caption = caption
        self.score = score

    @classmethod
    def enabled(cls, cfg: PipelineConfig) -> bool:
        """Runs instead of caption and score when ``resources.fused`` and both are enabled."""
        return bool(cfg.resources.fused and cfg.caption.enabled and cfg.score.enabled)

    @classmethod
    def model_roles(cls, cfg: PipelineConfig) -> set[str]:
        """The captioner's and the scorers' roles."""
        return CaptionStage.model_roles(cfg) | ScoreStage.model_roles(cfg)

    @classmethod
    def build(cls, cfg: PipelineConfig, ctx: RunContext) -> CaptionScoreStage:
        """The run's caption and score stages, in one."""
        return cls(CaptionStage.build(cfg, ctx), ScoreStage.build(cfg, ctx))

    def setup(self) -> None:
        """Load the captioner and the scorers (once per actor)."""
        self.caption.setup()
        self.score.setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        memo: dict[bytes, Any] = {}

        def decode(data: bytes | None) -> Any:
            """Decode each distinct image once per block; both stages get the same ``PIL.Image``
            (or the same error: a corrupt image is not decoded again when its batch is retried)."""
            if not data:
                return decode_image(data)
            if data not in memo:
                try:
                    memo[data] = decode_image(data)
                except Exception as e:  # noqa: BLE001 - re-raised below, for this row only
                    memo[data] = e
            if isinstance(memo[data], Exception):
                raise memo[data]
            return memo[data]

        self.caption.decode = self.score.decode = decode
        try:
            return self.score(self.caption(batch))
        finally:
            del self.caption.decode, self.score.decode
            memo.clear()
