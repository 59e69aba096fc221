"""Eval-set decontamination: flag input images that are copies of evaluation images.

A model pre-trained on web data that contains the COCO or Flickr30k test images is evaluated on
pictures it has seen (DataComp removes near-duplicates of its evaluation sets for this reason).
This optional stage (``decontam.enabled: true``, or ``capfilt run --decontaminate PATH``) loads
the evaluation images once, embeds each with the perceptual embedding dedup uses (32x32 grey
thumbnail, mean-centred, L2-normalised: it survives resizing, re-encoding and small colour
changes), and searches every downloaded image against them with faiss (exact inner product).
A row at cosine >= ``decontam.threshold`` ends with status ``contaminated`` and
``error_message`` naming the evaluation image it repeats; it skips the models.

An evaluation set is a folder of images (searched recursively; the id is the path relative to
the folder) or a Parquet file with an ``image`` column of encoded bytes and an ``id`` (or
``key``) column.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa

from capfilt.errors import InputError
from capfilt.schema import CONTAMINATED, SUCCESS
from capfilt.stages.base import Stage, column_or_nulls, package_version, set_column
from capfilt.stages.dedup import THUMB, perceptual_embedding

if TYPE_CHECKING:
    from capfilt.config import DecontamConfig, PipelineConfig
    from capfilt.stages.base import RunContext

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_eval_images(paths: list[str]) -> tuple[list[str], np.ndarray]:
    """Ids and perceptual embeddings of every evaluation image.

    Returns:
        ``(ids, embeddings)``: ids like ``coco/000000000139.jpg`` (folder name, then the path
        inside it) or the Parquet's ``id``; embeddings float32 ``(N, 1024)``.

    Raises:
        InputError: a path is missing, holds no image, or an image cannot be decoded (named).
    """
    ids: list[str] = []
    embs: list[np.ndarray] = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not files:
                raise InputError(f"evaluation set {p} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            for f in files:
                try:
                    embs.append(perceptual_embedding(f.read_bytes()))
                except OSError as e:
                    raise InputError(f"evaluation image {f} cannot be decoded ({e}); remove it from {p}") from None
                ids.append(f"{path.name}/{f.relative_to(path).as_posix()}")
        elif path.is_file() and path.suffix == ".parquet":
            import pyarrow.parquet as pq

            t = pq.read_table(path)
            id_col = next((c for c in ("id", "key") if c in t.column_names), None)
            if "image" not in t.column_names or id_col is None:
                raise InputError(f"evaluation set {p} needs an 'image' column (encoded bytes) and an 'id' or 'key' "
                                 f"column; it has {t.column_names}")
            for i, (k, b) in enumerate(zip(t.column(id_col).to_pylist(), t.column("image").to_pylist())):
                try:
                    embs.append(perceptual_embedding(b))
                except (OSError, TypeError) as e:
                    raise InputError(f"evaluation set {p} row {i} (id {k}): image cannot be decoded ({e})") from None
                ids.append(str(k))
        else:
            raise InputError(f"evaluation set {p} is neither a folder of images nor a .parquet file "
                             f"(decontam.eval_sets / --decontaminate)")
    return ids, np.stack(embs).astype(np.float32)


class DecontamStage(Stage):
    """Set ``status = contaminated`` on rows whose image is a copy of an evaluation image.

    Input columns: ``status``, ``error_message``, ``image``. Only ``success`` rows are searched.

    Args:
        cfg: :class:`capfilt.config.DecontamConfig`.

    Raises:
        ImportError: faiss is not installed (``pip install faiss-cpu``).
    """

    name: ClassVar[str] = "decontam"
    section: ClassVar[str] = "decontam"

    def __init__(self, cfg: DecontamConfig):
        self.cfg = cfg
        self._index = None
        self._ids: list[str] = []

    @classmethod
    def build(cls, cfg: PipelineConfig, ctx: RunContext | None) -> DecontamStage:
        """The stage of this run; the evaluation sets are checked now (before any work).

        Raises:
            InputError: an evaluation set is missing or unreadable.
        """
        for p in cfg.decontam.eval_sets:
            if not Path(p).expanduser().exists():
                raise InputError(f"evaluation set {p} does not exist (decontam.eval_sets / --decontaminate)")
        return cls(cfg.decontam)

    def setup(self) -> None:
        """Embed the evaluation images and build the faiss index (once per worker)."""
        if self._index is not None:
            return
        import faiss

        self._ids, embs = load_eval_images(list(self.cfg.eval_sets))
        self._index = faiss.IndexFlatIP(THUMB * THUMB)
        self._index.add(embs)

    @classmethod
    def model_info(cls, cfg: PipelineConfig) -> dict[str, Any]:
        """Perceptual 32x32 embedding + faiss exact search; the evaluation sets searched."""
        return {"model": "perceptual embedding (32x32 grey) + faiss IndexFlatIP", "version": package_version("faiss-cpu"),
                "eval_sets": list(cfg.decontam.eval_sets)}

    @staticmethod
    def stats(table: pa.Table) -> dict[str, Any]:
        """``contaminated``: rows that repeat an evaluation image."""
        return {"contaminated": column_or_nulls(table, "status").count(CONTAMINATED)}

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.setup()
        status = column_or_nulls(batch, "status")
        messages = column_or_nulls(batch, "error_message")
        rows = [i for i, s in enumerate(status) if s == SUCCESS]
        if not rows:
            return batch
        images = batch.column("image")
        embs = np.stack([perceptual_embedding(images[i].as_py()) for i in rows]).astype(np.float32)
        sims, idx = self._index.search(embs, 1)
        for r, sim, j in zip(rows, sims[:, 0], idx[:, 0]):
            if j >= 0 and sim >= self.cfg.threshold:
                status[r] = CONTAMINATED
                messages[r] = f"copy of evaluation image {self._ids[j]} (cosine {sim:.3f})"
        out = set_column(batch, "status", pa.array(status, pa.string()))
        return set_column(out, "error_message", pa.array(messages, pa.string()))
