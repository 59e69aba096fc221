"""NSFW image detection with a real offline detector, before any model sees the image.

This optional stage (``safety.enabled: true``) runs NudeNet's detector (``nudenet``: a YOLOv8n
ONNX model, 320 px input, shipped inside the wheel; runs on onnxruntime, CPU or CUDA) on every
downloaded image. It records ``nsfw_score`` (the highest confidence among the detector classes
listed in ``safety.classes``; 0 when none is found) and ``nsfw_classes`` (every class detected at
>= ``safety.min_detection``). Rows at ``nsfw_score >= safety.threshold`` end with status ``nsfw``;
their image bytes are dropped, so they are never written to a shard nor captioned.

The default ``safety.classes`` are the detector's exposed-nudity classes; the detector also finds
faces, feet and covered body parts, which are recorded in ``nsfw_classes`` but do not count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

from capfilt.schema import NSFW, SAFETY_FIELDS, SUCCESS
from capfilt.stages.base import Stage, column_or_nulls, require_package, set_column, set_field

if TYPE_CHECKING:
    from capfilt.config import PipelineConfig, SafetyConfig
    from capfilt.stages.base import RunContext

class SafetyStage(Stage):
    """Add ``nsfw_score: float32`` and ``nsfw_classes: list<string>``; flag rows at the threshold.

    Input columns: ``status``, ``error_message``, ``image``. Non-``success`` rows get nulls.

    Args:
        cfg: :class:`capfilt.config.SafetyConfig`.
    """

    name: ClassVar[str] = "safety"
    section: ClassVar[str] = "safety"
    fields: ClassVar[tuple[pa.Field, ...]] = tuple(SAFETY_FIELDS)

    def __init__(self, cfg: SafetyConfig):
        self.cfg = cfg
        self._detector = None

    @classmethod
    def build(cls, cfg: PipelineConfig, ctx: RunContext | None) -> SafetyStage:
        """The stage of this run; checks now that the detector package is installed.

        Raises:
            ConfigError: ``nudenet`` is not installed.
        """
        require_package("nudenet", "safety.enabled (its ONNX detector ships inside it)")
        return cls(cfg.safety)

    def setup(self) -> None:
        """Load the ONNX detector (about 12 MB; 0.15 s)."""
        if self._detector is None:
            from nudenet import NudeDetector

            self._detector = NudeDetector()

    @staticmethod
    def stats(table: pa.Table) -> dict[str, Any]:
        """``nsfw``: rows flagged by this stage."""
        return {"nsfw": column_or_nulls(table, "status").count(NSFW)}

    def detect(self, image: bytes) -> list[dict[str, Any]]:
        """Detections in an encoded image: ``[{"class": str, "score": float, "box": [x, y, w, h]}]``."""
        self.setup()
        return self._detector.detect(image)

    def __call__(self, batch: pa.Table) -> pa.Table:
        cfg = self.cfg
        counted = set(cfg.classes)
        status = column_or_nulls(batch, "status")
        messages = column_or_nulls(batch, "error_message")
        images = column_or_nulls(batch, "image")
        scores: list[float | None] = []
        classes: list[list[str] | None] = []
        flagged = set()
        for i in range(batch.num_rows):
            if status[i] != SUCCESS or images[i] is None:
                scores.append(None), classes.append(None)
                continue
            dets = [d for d in self.detect(images[i]) if d["score"] >= cfg.min_detection]
            score = max((float(d["score"]) for d in dets if d["class"] in counted), default=0.0)
            scores.append(score)
            classes.append(sorted({d["class"] for d in dets}))
            if score >= cfg.threshold:
                status[i] = NSFW
                top = max((d for d in dets if d["class"] in counted), key=lambda d: d["score"])
                messages[i] = f"NSFW detector: {top['class']} ({score:.2f} >= safety.threshold {cfg.threshold})"
                flagged.add(i)
        out = set_field(batch, SAFETY_FIELDS[0], scores)
        out = set_field(out, SAFETY_FIELDS[1], classes)
        if flagged:
            out = set_column(out, "status", pa.array(status, pa.string()))
            out = set_column(out, "error_message", pa.array(messages, pa.string()))
            kept = [None if i in flagged else images[i] for i in range(batch.num_rows)]
            out = set_column(out, "image", pa.array(kept, batch.column("image").type))
        return out
