"""NSFW image detection with a real offline detector, before any model sees the image.

This optional stage (``safety.enabled: true``) runs NudeNet's detector (``nudenet``: a YOLOv8n
ONNX model, 320 px input, shipped inside the wheel; runs on onnxruntime, CPU or CUDA) on every
downloaded image. It records ``nsfw_score`` (the highest confidence among the detector classes
listed in ``safety.classes``; 0 when none is found) and ``nsfw_classes`` (every class detected at
>= ``safety.min_detection``). Rows at ``nsfw_score >= safety.threshold`` end with status ``nsfw``;
their image bytes are dropped, so they are never written to a shard nor captioned.

The default ``safety.classes`` are the detector's exposed-nudity classes; the detector also finds
faces, feet and covered body parts, which are recorded in ``nsfw_classes`` but do not count.

``safety.detector: clip_head`` (with ``safety.clip_head.weights``: a local file the user supplies)
uses instead a LAION-style NSFW head on the preset's CLIP image embeddings
(:class:`capfilt.modeling.nsfw_head.NsfwHead`): its probability is ``nsfw_score`` and it reports
the one class :data:`HEAD_CLASS`. Both detectors answer the same call, :meth:`SafetyStage.detect_batch`
(detections per image), so the thresholds and the columns are the same; the head loads a model, so
the stage then runs as an actor pool. NudeNet stays the default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

from capfilt.schema import NSFW, SAFETY_FIELDS, SUCCESS
from capfilt.stages.base import Stage, column_or_nulls, file_sha256, package_version, require_package, set_column, set_field

if TYPE_CHECKING:
    from capfilt.config import ModelPreset, PipelineConfig, SafetyConfig
    from capfilt.stages.base import RunContext

#: The class the CLIP-embedding NSFW head reports (always counted).
HEAD_CLASS = "NSFW_CLIP_HEAD"
#: Images per CLIP call of the head detector.
HEAD_BATCH = 16


class SafetyStage(Stage):
    """Add ``nsfw_score: float32`` and ``nsfw_classes: list<string>``; flag rows at the threshold.

    Input columns: ``status``, ``error_message``, ``image``. Non-``success`` rows get nulls.

    Args:
        cfg: :class:`capfilt.config.SafetyConfig`.
        preset: the model preset (its ``clip`` model), needed only by ``detector: clip_head``.
    """

    name: ClassVar[str] = "safety"
    section: ClassVar[str] = "safety"
    fields: ClassVar[tuple[pa.Field, ...]] = tuple(SAFETY_FIELDS)

    def __init__(self, cfg: SafetyConfig, preset: ModelPreset | None = None):
        self.cfg = cfg
        self.preset = preset
        self._detector = None
        self._head = None
        if cfg.detector == "clip_head":
            self.shape = "actor_pool"  # a CLIP model, loaded once per actor

    @classmethod
    def model_roles(cls, cfg: PipelineConfig) -> set[str]:
        """``clip`` with ``safety.detector: clip_head`` (the head reads CLIP embeddings), else none."""
        return {"clip"} if cfg.safety.detector == "clip_head" else set()

    @classmethod
    def build(cls, cfg: PipelineConfig, ctx: RunContext | None) -> SafetyStage:
        """The stage of this run; checks now that the detector (package or head weights) is there.

        Raises:
            ConfigError: ``nudenet`` is not installed.
            ModelLoadError: the head's weights are missing or not an MLP head.
        """
        if cfg.safety.detector == "clip_head":
            from capfilt.modeling.nsfw_head import NsfwHead

            NsfwHead.from_file(cfg.safety.clip_head.weights)
            return cls(cfg.safety, ctx.preset if ctx is not None else None)
        require_package("nudenet", "safety.enabled (its ONNX detector ships inside it)")
        return cls(cfg.safety)

    def setup(self) -> None:
        """Load the detector: NudeNet's ONNX model (about 12 MB; 0.15 s), or CLIP and the NSFW head.

        Raises:
            ModelLoadError: the preset has no ``clip`` model, or the head does not fit its embeddings.
        """
        if self._detector is not None:
            return
        if self.cfg.detector == "clip_head":
            from capfilt.errors import ModelLoadError
            from capfilt.modeling.clip_scorer import ClipScorer
            from capfilt.modeling.loading import require_role
            from capfilt.modeling.nsfw_head import NsfwHead

            head = NsfwHead.from_file(self.cfg.clip_head.weights)
            clip = ClipScorer.from_spec(require_role(self.preset, "clip"), self.preset)
            dim = clip.model.config.projection_dim
            if dim != head.input_dim:
                raise ModelLoadError(f"NSFW head {self.cfg.clip_head.weights} reads {head.input_dim}-d embeddings "
                                     f"but the preset's CLIP model gives {dim}-d ones; use the head made for it")
            self._head, self._detector = head, clip
            return
        from nudenet import NudeDetector

        self._detector = NudeDetector()

    @classmethod
    def model_info(cls, cfg: PipelineConfig) -> dict[str, Any]:
        """NudeNet's ``320n.onnx`` (its wheel version), or the CLIP head's weights file and sha256."""
        if cfg.safety.detector == "clip_head":
            w = cfg.safety.clip_head.weights
            return {"model": f"NSFW head on CLIP embeddings ({w})", "version": file_sha256(w), "clip": "preset clip"}
        return {"model": "NudeNet 320n.onnx (YOLOv8n)", "version": package_version("nudenet"),
                "runtime": f"onnxruntime {package_version('onnxruntime')}"}

    @staticmethod
    def stats(table: pa.Table) -> dict[str, Any]:
        """``nsfw``: rows flagged by this stage."""
        return {"nsfw": column_or_nulls(table, "status").count(NSFW)}

    def detect(self, image: bytes) -> list[dict[str, Any]]:
        """Detections in an encoded image: ``[{"class": str, "score": float, "box": [x, y, w, h]}]``."""
        return self.detect_batch([image])[0]

    def detect_batch(self, images: list[bytes]) -> list[list[dict[str, Any]]]:
        """Detections per encoded image, from whichever detector the recipe names.

        NudeNet: its detections (``class``, ``score``, ``box``). CLIP head: one detection
        ``{"class": HEAD_CLASS, "score": p}`` per image, ``p`` the head's NSFW probability of the
        image's CLIP embedding (images embedded :data:`HEAD_BATCH` at a time).
        """
        self.setup()
        if self._head is None:
            return [self._detector.detect(im) for im in images]
        import torch

        from capfilt.stages._model_rows import decode_image

        out: list[list[dict[str, Any]]] = []
        for start in range(0, len(images), HEAD_BATCH):
            ims = [decode_image(b) for b in images[start:start + HEAD_BATCH]]
            with torch.inference_mode():
                emb = self._detector.image_features(ims).cpu().numpy()
            out += [[{"class": HEAD_CLASS, "score": float(p)}] for p in self._head(emb)]
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        cfg = self.cfg
        counted = set(cfg.classes) | {HEAD_CLASS}
        status = column_or_nulls(batch, "status")
        messages = column_or_nulls(batch, "error_message")
        images = column_or_nulls(batch, "image")
        scores: list[float | None] = []
        classes: list[list[str] | None] = []
        flagged = set()
        todo = [i for i in range(batch.num_rows) if status[i] == SUCCESS and images[i] is not None]
        found = dict(zip(todo, self.detect_batch([images[i] for i in todo]))) if todo else {}
        for i in range(batch.num_rows):
            if i not in found:
                scores.append(None), classes.append(None)
                continue
            # the head's probability is the score as is; detector boxes below min_detection are noise
            scored = [d for d in found[i] if d["class"] in counted
                      and (d["score"] >= cfg.min_detection or d["class"] == HEAD_CLASS)]
            score = max((float(d["score"]) for d in scored), default=0.0)
            dets = [d for d in found[i] if d["score"] >= cfg.min_detection]
            scores.append(score)
            classes.append(sorted({d["class"] for d in dets}))
            if score >= cfg.threshold:
                status[i] = NSFW
                top = max(scored, key=lambda d: d["score"])
                who = "NSFW head (CLIP embedding)" if top["class"] == HEAD_CLASS else "NSFW detector"
                messages[i] = f"{who}: {top['class']} ({score:.2f} >= safety.threshold {cfg.threshold})"
                flagged.add(i)
        out = set_field(batch, SAFETY_FIELDS[0], scores)
        out = set_field(out, SAFETY_FIELDS[1], classes)
        if flagged:
            out = set_column(out, "status", pa.array(status, pa.string()))
            out = set_column(out, "error_message", pa.array(messages, pa.string()))
            kept = [None if i in flagged else images[i] for i in range(batch.num_rows)]
            out = set_column(out, "image", pa.array(kept, batch.column("image").type))
        return out
