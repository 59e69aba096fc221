"""Dedup: mark exact and near-duplicate images of a run before any model sees them.

Web crawls repeat the same picture under many URLs (LAION-400M has millions of exact copies).
Captioning and scoring each copy wastes GPU time and over-weights it in training, so this optional
stage (``dedup.enabled: true``) runs after download and gives every later copy the status
``duplicate`` (its ``error_message`` names the key of the row it repeats):

- **exact**: the same stored image bytes (``sha256``), i.e. the same picture after resize+encode;
- **near** (``dedup.near: true``): cosine similarity >= ``dedup.near_threshold`` between
  perceptual embeddings, searched with faiss (``IndexFlatIP``, exact inner-product search).
  The embedding is the image as a 32x32 grey thumbnail, mean-centred and L2-normalised
  (1,024 float32): it catches re-encodes, resizes and small colour changes of one picture, not
  crops or different photos of one scene.

The stage keeps run-wide state, so it runs as one actor. On resume it first loads the images of
the shards already committed, so a copy of an image written by an earlier attempt is still a
duplicate. Which copy is kept depends on arrival order (the first one seen).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import pyarrow as pa

from capfilt.config import DedupConfig
from capfilt.schema import DUPLICATE, SUCCESS
from capfilt.stages.base import RunContext, Stage, set_column

if TYPE_CHECKING:
    from capfilt.config import PipelineConfig

THUMB = 32


def perceptual_embedding(image_bytes: bytes) -> np.ndarray:
    """The near-duplicate embedding of an encoded image.

    Returns:
        float32 ``(1024,)``: the 32x32 greyscale thumbnail (bilinear), minus its mean, L2-normalised
        (all zeros for a flat image).

    Raises:
        OSError / PIL.UnidentifiedImageError: the bytes are not a decodable image.
    """
    from PIL import Image

    with Image.open(io.BytesIO(image_bytes)) as im:
        thumb = im.convert("L").resize((THUMB, THUMB), Image.Resampling.BILINEAR)
    v = np.asarray(thumb, dtype=np.float32).reshape(-1)
    v = v - v.mean()
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


class DedupStage(Stage):
    """Set ``status = duplicate`` on rows whose image repeats an earlier row's (see module docs).

    Input columns: ``key``, ``status``, ``image``, ``sha256``. Only ``success`` rows are looked
    at; other rows pass unchanged. It keeps run-wide state, so it runs as a ``single_actor``.

    Args:
        cfg: :class:`capfilt.config.DedupConfig`.
        committed: paths of shard files already committed in the output (resume), read in
            :meth:`setup` to seed the seen-set.
        output_uri: the output folder those paths are in.

    Raises:
        ImportError: ``dedup.near`` without faiss (``pip install faiss-cpu``).
    """

    name: ClassVar[str] = "dedup"
    section: ClassVar[str] = "dedup"
    shape: ClassVar[str] = "single_actor"

    def __init__(self, cfg: DedupConfig, output_uri: str | None = None, committed: tuple[str, ...] = ()):
        self.cfg = cfg
        self.output_uri = output_uri
        self.committed = tuple(committed)
        self._seen: dict[str, str] | None = None
        self._index = None
        self._index_keys: list[str] = []

    @classmethod
    def build(cls, cfg: PipelineConfig, ctx: RunContext) -> DedupStage:
        """Dedup over this run, seeded with the shards already committed in its output."""
        return cls(cfg.dedup, ctx.output_uri, ctx.committed)

    def setup(self) -> None:
        """Create the seen-set and faiss index, seeded with already committed shards."""
        if self._seen is not None:
            return
        self._seen = {}
        if self.cfg.near:
            try:
                import faiss
            except ImportError as e:  # pragma: no cover - faiss is a declared extra
                raise ImportError("dedup.near needs faiss: pip install faiss-cpu") from e
            self._index = faiss.IndexFlatIP(THUMB * THUMB)
        if self.committed and self.output_uri:
            import pyarrow.parquet as pq

            from capfilt.io.filesystem import locate

            loc = locate(self.output_uri)
            for path in self.committed:
                with loc.fs.open_input_file(path) as f:
                    t = pq.read_table(f, columns=["key", "status", "sha256", "image"])
                self._add_rows(t)

    def _add_rows(self, t: pa.Table) -> None:
        rows = [r for r in t.to_pylist() if r["status"] == SUCCESS]
        for r in rows:
            self._seen.setdefault(r["sha256"], r["key"])
        if self._index is not None and rows:
            self._index.add(np.stack([perceptual_embedding(r["image"]) for r in rows]))
            self._index_keys += [r["key"] for r in rows]

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.setup()
        status = batch.column("status").to_pylist()
        messages = batch.column("error_message").to_pylist()
        keys = batch.column("key").to_pylist()
        shas = batch.column("sha256").to_pylist()
        images = batch.column("image")
        for i in range(batch.num_rows):
            if status[i] != SUCCESS:
                continue
            if self.cfg.exact and shas[i] in self._seen:
                status[i], messages[i] = DUPLICATE, f"same image as row {self._seen[shas[i]]} (sha256)"
                continue
            if self._index is not None:
                emb = perceptual_embedding(images[i].as_py())[None, :]
                if self._index.ntotal:
                    sim, idx = self._index.search(emb, 1)
                    if sim[0, 0] >= self.cfg.near_threshold:
                        status[i] = DUPLICATE
                        messages[i] = (f"near-duplicate of row {self._index_keys[idx[0, 0]]} "
                                       f"(cosine {sim[0, 0]:.3f})")
                        continue
                self._index.add(emb)
                self._index_keys.append(keys[i])
            self._seen.setdefault(shas[i], keys[i])
        batch = set_column(batch, "status", pa.array(status, pa.string()))
        return set_column(batch, "error_message", pa.array(messages, pa.string()))
