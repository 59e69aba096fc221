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

The stage keeps run-wide state, so it runs as one actor. That state survives the actor: before a
batch leaves the stage, the rows it kept as first copies are appended to a claim log in the output
(``OUT/_capfilt/dedup/<uuid>.parquet``: key, sha256 and, with ``near``, the embedding). A
restarted actor, and a resumed run, load the log and the shards already committed before looking
at new rows, so a copy of an image seen earlier in the run, or written by an earlier attempt, is
still a duplicate. The stage is idempotent: a row is never a duplicate of itself, so a block Ray
re-executes after a worker loss gets the same answer. Which copy is kept depends on arrival order
(the first one claimed).
"""

from __future__ import annotations

import io
import uuid
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa

from capfilt.config import DedupConfig
from capfilt.schema import DUPLICATE, SUCCESS
from capfilt.stages.base import RunContext, Stage, package_version, set_column

if TYPE_CHECKING:
    from capfilt.config import PipelineConfig

THUMB = 32
#: Folder of the claim logs, under the output's ``_capfilt``.
LOG_DIR = "dedup"
#: Nearest neighbours searched per row (a row may meet its own earlier claim among them).
NEAR_K = 4


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
        self._indexed: set[str] = set()

    @classmethod
    def build(cls, cfg: PipelineConfig, ctx: RunContext) -> DedupStage:
        """Dedup over this run, seeded with the shards already committed in its output."""
        return cls(cfg.dedup, ctx.output_uri, ctx.committed)

    @classmethod
    def model_info(cls, cfg: PipelineConfig) -> dict[str, Any]:
        """sha256 of the stored bytes, and with ``near`` the perceptual embedding searched with faiss."""
        near = f" + perceptual embedding (32x32 grey) / faiss IndexFlatIP >= {cfg.dedup.near_threshold}"
        return {"model": "sha256" + (near if cfg.dedup.near else ""),
                "version": package_version("faiss-cpu") if cfg.dedup.near else None}

    def setup(self) -> None:
        """Create the seen-set and faiss index, seeded with the claim log and the committed shards."""
        if self._seen is not None:
            return
        self._seen = {}
        if self.cfg.near:
            try:
                import faiss
            except ImportError as e:  # pragma: no cover - faiss is a declared extra
                raise ImportError("dedup.near needs faiss: pip install faiss-cpu") from e
            self._index = faiss.IndexFlatIP(THUMB * THUMB)
        if not self.output_uri:
            return
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq

        from capfilt.io.filesystem import locate
        from capfilt.io.writer import META_DIR

        loc = locate(self.output_uri)
        logs = loc.join(META_DIR, LOG_DIR)
        if logs.exists():
            infos = loc.fs.get_file_info(pafs.FileSelector(logs.path, recursive=False))
            for info in sorted((i for i in infos if i.path.endswith(".parquet")), key=lambda i: i.path):
                with loc.fs.open_input_file(info.path) as f:
                    t = pq.read_table(f)
                embs = (np.asarray(t.column("embedding").to_pylist(), np.float32)
                        if "embedding" in t.column_names and t.num_rows else None)
                self._claim(t.column("key").to_pylist(), t.column("sha256").to_pylist(), embs)
        for path in self.committed:
            with loc.fs.open_input_file(path) as f:
                t = pq.read_table(f, columns=["key", "status", "sha256", "image"])
            rows = [r for r in t.to_pylist() if r["status"] == SUCCESS]
            embs = (np.stack([perceptual_embedding(r["image"]) for r in rows])
                    if self._index is not None and rows else None)
            self._claim([r["key"] for r in rows], [r["sha256"] for r in rows], embs)

    def _claim(self, keys: list[str], shas: list[str], embs: np.ndarray | None) -> None:
        """Record rows as first copies (a key already claimed is not added twice)."""
        for i, (k, sha) in enumerate(zip(keys, shas)):
            self._seen.setdefault(sha, k)
            if self._index is not None and embs is not None and k not in self._indexed:
                self._index.add(embs[i: i + 1])
                self._index_keys.append(k)
                self._indexed.add(k)

    def _log(self, keys: list[str], shas: list[str], embs: list[np.ndarray]) -> None:
        """Append this batch's claims to the durable claim log (before the batch moves on)."""
        if not keys or not self.output_uri:
            return
        import pyarrow.parquet as pq

        from capfilt.io.filesystem import locate
        from capfilt.io.writer import META_DIR, write_bytes

        cols = {"key": pa.array(keys, pa.string()), "sha256": pa.array(shas, pa.string())}
        if embs:
            cols["embedding"] = pa.array([e.tolist() for e in embs], pa.list_(pa.float32(), THUMB * THUMB))
        buf = pa.BufferOutputStream()
        pq.write_table(pa.table(cols), buf)
        loc = locate(self.output_uri).join(META_DIR, LOG_DIR)
        loc.fs.create_dir(loc.path, recursive=True)
        write_bytes(loc.join(f"{uuid.uuid4().hex}.parquet"), buf.getvalue().to_pybytes())

    def _near(self, emb: np.ndarray, key: str) -> tuple[str, float] | None:
        """The nearest claimed row other than ``key`` at or above the threshold, with its cosine."""
        if not self._index.ntotal:
            return None
        sims, idx = self._index.search(emb, min(NEAR_K, self._index.ntotal))
        for sim, j in zip(sims[0], idx[0]):
            if j >= 0 and self._index_keys[j] != key and sim >= self.cfg.near_threshold:
                return self._index_keys[j], float(sim)
        return None

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.setup()
        status = batch.column("status").to_pylist()
        messages = batch.column("error_message").to_pylist()
        keys = batch.column("key").to_pylist()
        shas = batch.column("sha256").to_pylist()
        images = batch.column("image")
        new_keys, new_shas, new_embs = [], [], []
        for i in range(batch.num_rows):
            if status[i] != SUCCESS:
                continue
            first = self._seen.get(shas[i])
            if self.cfg.exact and first is not None and first != keys[i]:
                status[i], messages[i] = DUPLICATE, f"same image as row {first} (sha256)"
                continue
            emb = None
            if self._index is not None:
                emb = perceptual_embedding(images[i].as_py())[None, :]
                hit = self._near(emb, keys[i])
                if hit is not None:
                    status[i], messages[i] = DUPLICATE, f"near-duplicate of row {hit[0]} (cosine {hit[1]:.3f})"
                    continue
            if first == keys[i] and (self._index is None or keys[i] in self._indexed):
                continue  # claimed before (a re-executed block): nothing new to record
            self._claim([keys[i]], [shas[i]], emb)
            new_keys.append(keys[i]), new_shas.append(shas[i])
            if emb is not None:
                new_embs.append(emb[0])
        self._log(new_keys, new_shas, new_embs)
        batch = set_column(batch, "status", pa.array(status, pa.string()))
        return set_column(batch, "error_message", pa.array(messages, pa.string()))
