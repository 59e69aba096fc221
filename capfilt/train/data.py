"""Streaming training data: a PyTorch ``IterableDataset`` over capfilt output shards (or COCO).

The dataset reads *sources* made of **units** (a Parquet row group of a committed capfilt shard,
or a chunk of COCO annotations) and yields one sample per usable row: the decoded, processed
image and one text.

Every kept row is seen exactly once per epoch across all ranks and DataLoader workers:

1. At construction the source records, per unit, which rows are usable (capfilt: ``keep`` is true
   and ``captions`` is non-empty; a bitmap per unit, read from the ``keep``/``captions`` columns
   only). ``K`` = number of usable rows.
2. Each epoch ``e`` orders the units by a permutation seeded with ``(seed, e)`` (the same on every
   process) and concatenates their usable rows. Consumer ``c`` of ``n = world_size x workers``
   (``c = rank x workers + worker_id``) takes the contiguous block ``[c K // n, (c+1) K // n)``
   of that sequence, so it only reads the units its block overlaps.
3. A shuffle buffer (``shuffle_buffer`` samples, seeded with ``(seed, e, c)``) mixes each block.

The stream of one consumer is a pure function of ``(source, seed, n, c)`` and crosses epochs
without a gap. A sample's ``position`` counts the rows a consumer has emitted since epoch 0, so a
training checkpoint stores ``{consumer: next position}`` and :class:`StreamingDataset` resumes
there: whole epochs are skipped arithmetically, the rest of an epoch by replaying the shuffle over
row indices only (no image is read or decoded for skipped rows).

Texts: one text per visit, sampled uniformly among the first ``text_top_k`` kept captions (best
first) with a generator seeded by ``(seed, epoch, key)`` (BLIP-2 §3.4 samples one of the top two
per step). Images are decoded with Pillow (JPEG draft mode: decoded at the smallest scale not
below the model's input size) and transformed by the model's image processor; rows whose image
cannot be decoded are skipped and counted (``skipped`` in :attr:`StreamingDataset.stats`).
"""

from __future__ import annotations

import io
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from capfilt.errors import InputError
from capfilt.io.filesystem import locate
from capfilt.train.records import Record, RowSource, read_json  # noqa: F401 - Record, read_json re-exported

log = logging.getLogger(__name__)

#: Columns of the output contract the trainer reads (DESIGN.md "The output contract").
REQUIRED_COLUMNS = ("key", "image", "captions", "keep")


class SampleError(Exception):
    """A row's image could not be decoded or transformed (the row is skipped)."""


# ------------------------------------------------------------------------------------------------
# capfilt output shards
# ------------------------------------------------------------------------------------------------
class CapfiltShards:
    """The committed shards of a ``capfilt run`` output (local path or ``s3://`` / ``gs://`` URI).

    Committed parts are ``NAME.parquet`` files with their ``NAME.stats.json`` (the writer's commit
    marker, :func:`capfilt.io.writer.scan_output`); uncommitted leftovers are ignored with a
    warning. A path to a single ``.parquet`` file is read as one part. Units are Parquet row groups.

    Args:
        uri: the output folder (``OUT``) or one ``.parquet`` file.
        threads: parallel footer / ``keep``-column reads at construction.

    Raises:
        InputError: the folder has no committed shard, a shard lacks a contract column
            (``key``, ``image``, ``captions``, ``keep``), or a file cannot be read.
    """

    def __init__(self, uri: str, threads: int = 8) -> None:
        from capfilt.io.writer import scan_output

        self.uri = uri
        loc = locate(uri)
        self._fs = loc.fs
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.File:
            files = [loc.path]
        elif info.type == pafs.FileType.Directory:
            parts, leftovers = scan_output(loc)
            files = [p.parquet for p in parts]
            if leftovers:
                log.warning("%s: ignoring %d uncommitted file(s) (no .stats.json), e.g. %s", uri, len(leftovers),
                            leftovers[0])
            if not files:
                raise InputError(f"{uri}: no committed capfilt shards (NAME.parquet with NAME.stats.json); "
                                 f"point --data at the OUTPUT folder of a finished `capfilt run`")
        else:
            raise InputError(f"training data {uri} does not exist")
        with ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
            scanned = list(pool.map(self._scan_file, files))
        self._units: list[tuple[str, int]] = []   # (file, row group)
        self._bits: list[np.ndarray] = []          # packed usable-row bitmaps
        self._sizes: list[int] = []                # rows per unit (all rows)
        for path, groups in zip(files, scanned):
            for rg, bitmap in enumerate(groups):
                self._units.append((path, rg))
                self._bits.append(np.packbits(bitmap))
                self._sizes.append(len(bitmap))
        self._offsets = np.concatenate([[0], np.cumsum(self._sizes)]).astype(np.int64)
        self._files = files

    def _scan_file(self, path: str) -> list[np.ndarray]:
        try:
            with self._fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                names = set(pf.schema_arrow.names)
                missing = [c for c in REQUIRED_COLUMNS if c not in names]
                if missing:
                    raise InputError(f"{path}: not a capfilt output shard, missing column(s) {missing} "
                                     f"(the trainer reads {list(REQUIRED_COLUMNS)})")
                out = []
                for rg in range(pf.num_row_groups):
                    t = pf.read_row_group(rg, columns=["keep", "captions"])
                    keep = pc.fill_null(t.column("keep"), False)
                    n_texts = pc.fill_null(pc.list_value_length(t.column("captions")), 0)
                    usable = pc.and_(keep, pc.greater(n_texts, 0))
                    out.append(usable.to_numpy(zero_copy_only=False).astype(bool))
                return out
        except InputError:
            raise
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"cannot read training shard {path}: {e}") from None

    def num_units(self) -> int:
        """Number of Parquet row groups over all committed shards."""
        return len(self._units)

    def kept_rows(self, unit: int) -> np.ndarray:
        """Rows of the row group with ``keep`` true and at least one kept caption."""
        bits = np.unpackbits(self._bits[unit], count=self._sizes[unit]).astype(bool)
        return np.flatnonzero(bits).astype(np.int64)

    def read(self, unit: int, rows: Sequence[int]) -> dict[int, Record]:
        """Read ``key``, ``image`` and ``captions`` of ``rows`` from one row group."""
        path, rg = self._units[unit]
        with self._fs.open_input_file(path) as f:
            t = pq.ParquetFile(f).read_row_group(rg, columns=["key", "image", "captions"])
        t = t.take(pa.array(list(rows), pa.int64()))
        keys, images, caps = (t.column(c).to_pylist() for c in ("key", "image", "captions"))
        base = int(self._offsets[unit])
        return {int(r): Record(key=k, image=im, texts=[c for c in (cs or []) if c], group=base + int(r))
                for r, k, im, cs in zip(rows, keys, images, caps)}

    def describe(self) -> str:
        """``capfilt shards OUT: F files, U row groups, K kept rows of N``."""
        kept = sum(int(np.unpackbits(b, count=s).sum()) for b, s in zip(self._bits, self._sizes))
        return (f"capfilt shards {self.uri}: {len(self._files)} files, {len(self._units)} row groups, "
                f"{kept} kept rows of {int(self._offsets[-1])}")


# ------------------------------------------------------------------------------------------------
# text and image processing
# ------------------------------------------------------------------------------------------------
_PUNCT = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def clean_caption(text: str, max_words: int = 30) -> str:
    """BLIP's ``pre_caption`` (``data/utils.py`` of salesforce/BLIP, also LAVIS' caption processor).

    Lowercases, replaces ``. ! " ( ) * # : ; ~`` with spaces, turns ``-`` and ``/`` into spaces,
    collapses whitespace, strips a trailing newline/space and keeps the first ``max_words`` words.

    Args:
        text: a caption.
        max_words: words kept.

    Returns:
        The cleaned caption (possibly empty).
    """
    text = _PUNCT.sub(" ", text.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = _SPACES.sub(" ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


class ImageTransform:
    """Encoded image bytes -> ``pixel_values`` float32 ``(3, H, W)`` via a transformers image processor.

    JPEGs are decoded in Pillow's draft mode at the smallest DCT scale whose size is still at least
    the processor's output size (the same pixels as a full decode followed by the processor's
    resize up to resampling differences), when the photo is at least twice the input size
    (otherwise there is no smaller scale to use): 640x480 COCO photos for a 64 px input decode
    1.4-1.7x faster, 384 px inputs are unchanged (``benchmarks/bench_train.py``).

    Args:
        image_processor: e.g. ``BlipImageProcessor`` (resize to ``size``, rescale, normalize).

    Raises (on call):
        SampleError: the bytes are not a decodable image.
    """

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor
        size = getattr(image_processor, "size", None)
        if isinstance(size, (int, float)):
            h = w = int(size)
        else:  # dict or transformers' SizeDict
            get = (lambda k: size.get(k)) if isinstance(size, Mapping) else (lambda k: getattr(size, k, None))
            h = get("height") or get("shortest_edge") or 224
            w = get("width") or get("shortest_edge") or h
        self.size = (int(w), int(h))

    def __call__(self, data: bytes) -> torch.Tensor:
        from PIL import Image

        try:
            img = Image.open(io.BytesIO(data))
            if img.format == "JPEG" and img.size[0] >= 2 * self.size[0] and img.size[1] >= 2 * self.size[1]:
                img.draft("RGB", self.size)
            img = img.convert("RGB")
            pix = self.image_processor(images=img, return_tensors="pt")["pixel_values"][0]
        except Exception as e:  # noqa: BLE001 - any decode/transform failure makes this one row unusable
            raise SampleError(f"{type(e).__name__}: {e}") from None
        return pix.to(torch.float32)


# ------------------------------------------------------------------------------------------------
# the dataset
# ------------------------------------------------------------------------------------------------
def _shuffled(refs: Iterator[tuple[int, int]], size: int, rng: random.Random) -> Iterator[tuple[int, int]]:
    """Shuffle buffer of ``size`` items: fill, then emit a random item for each new one, then drain."""
    if size <= 1:
        yield from refs
        return
    buf: list[tuple[int, int]] = []
    for ref in refs:
        buf.append(ref)
        if len(buf) >= size:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    while buf:
        j = rng.randrange(len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        yield buf.pop()


class StreamingDataset(IterableDataset):
    """Samples ``{pixel_values, text, group, key, consumer, position, epoch}`` from a :class:`RowSource`.

    Works with ``torch.utils.data.DataLoader(num_workers >= 0)``; each worker is one consumer
    (module docstring). With ``epochs=None`` the stream never ends (step-based training: every
    rank runs the same number of steps whatever the data size).

    Args:
        source: where rows come from (:class:`CapfiltShards`, :class:`capfilt.train.coco.CocoCaptions`).
        transform: encoded image bytes -> ``pixel_values`` ``(3, H, W)`` (:class:`ImageTransform`).
        seed: seeds unit order, shuffle buffers and text sampling.
        shuffle_buffer: samples per consumer's shuffle buffer (0: rows in block order).
        shuffle_units: permute units each epoch (false: source order, same every epoch).
        text_top_k: sample the text among the first ``k`` texts of a row (``None``: all).
        max_words: texts are cleaned with :func:`clean_caption` (``None``: passed unchanged).
        rank / world_size: this process among the training processes (DDP / Ray Train).
        epochs: stop after this many epochs (``None``: never).
        start_positions: ``{consumer: position}`` to resume from (missing consumers start at 0).
        worker_offset: DataLoader worker ``w`` acts as consumer ``rank x workers + (w + offset) %
            workers``. A DataLoader takes batches from its workers round-robin starting at worker
            0; a resumed run sets this to ``batches consumed % workers`` so the next batch comes
            from the consumer an uninterrupted run would have used.

    Raises:
        InputError: the source has no usable row (on construction).
    """

    def __init__(self, source: RowSource, transform: Callable[[bytes], torch.Tensor], *, seed: int = 0,
                 shuffle_buffer: int = 1000, shuffle_units: bool = True, text_top_k: int | None = None,
                 max_words: int | None = 30, rank: int = 0, world_size: int = 1, epochs: int | None = None,
                 start_positions: Mapping[int, int] | None = None, worker_offset: int = 0) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.source = source
        self.transform = transform
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_units = shuffle_units
        self.text_top_k = text_top_k
        self.max_words = max_words
        self.rank = rank
        self.world_size = world_size
        self.epochs = epochs
        self.start_positions = dict(start_positions or {})
        self.worker_offset = worker_offset
        self._counts = np.array([len(source.kept_rows(u)) for u in range(source.num_units())], dtype=np.int64)
        self.num_rows = int(self._counts.sum())
        if self.num_rows == 0:
            raise InputError(f"no usable training rows in {source.describe()} (rows need keep=true and a caption)")
        self.stats: Counter[str] = Counter()

    # -- planning (pure functions of the arguments) -------------------------------------------
    def block_size(self, consumer: int, num_consumers: int) -> int:
        """Rows consumer ``consumer`` of ``num_consumers`` reads per epoch (same every epoch)."""
        k = self.num_rows
        return (consumer + 1) * k // num_consumers - consumer * k // num_consumers

    def _unit_order(self, epoch: int) -> np.ndarray:
        n = len(self._counts)
        if not self.shuffle_units:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def _block(self, epoch: int, consumer: int, num_consumers: int) -> list[tuple[int, np.ndarray]]:
        """``[(unit, rows)]`` of the consumer's block this epoch, in stream order."""
        k = self.num_rows
        lo, hi = consumer * k // num_consumers, (consumer + 1) * k // num_consumers
        order = self._unit_order(epoch)
        cum = np.concatenate([[0], np.cumsum(self._counts[order])])
        out = []
        for p, u in enumerate(order):
            if cum[p + 1] <= lo or self._counts[u] == 0:
                continue
            if cum[p] >= hi:
                break
            a, b = max(lo - cum[p], 0), min(hi - cum[p], self._counts[u])
            out.append((int(u), self.source.kept_rows(int(u))[a:b]))
        return out

    # -- iteration --------------------------------------------------------------------------------
    def consumer_info(self) -> tuple[int, int]:
        """``(consumer, num_consumers)`` of the calling process/worker."""
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + (wid + self.worker_offset) % workers, self.world_size * workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        consumer, n = self.consumer_info()
        return self.iter_consumer(consumer, n)

    def iter_consumer(self, consumer: int, num_consumers: int) -> Iterator[dict[str, Any]]:
        """The sample stream of one consumer (what a DataLoader worker yields), from its start position."""
        per_epoch = self.block_size(consumer, num_consumers)
        if per_epoch == 0:
            return
        start = int(self.start_positions.get(consumer, 0))
        epoch = start // per_epoch
        while self.epochs is None or epoch < self.epochs:
            yield from self._iter_epoch(epoch, consumer, num_consumers, per_epoch, start)
            epoch += 1

    def _iter_epoch(self, epoch: int, consumer: int, n: int, per_epoch: int, start: int) -> Iterator[dict[str, Any]]:
        block = self._block(epoch, consumer, n)
        rows_of = dict(block)
        pending: Counter[int] = Counter()
        cache: dict[int, dict[int, Record]] = {}
        state = {"pushing": None}

        def refs() -> Iterator[tuple[int, int]]:
            """Yield ``(unit, row)`` references of this block in shuffle-buffer order."""
            for u, rows in block:
                prev = state["pushing"]
                if prev is not None and pending[prev] == 0:
                    cache.pop(prev, None)
                state["pushing"] = u
                for r in rows:
                    pending[u] += 1
                    yield u, int(r)
            state["pushing"] = None

        rng = random.Random(f"{self.seed}:{epoch}:{consumer}")
        position = epoch * per_epoch
        for u, r in _shuffled(refs(), self.shuffle_buffer, rng):
            pending[u] -= 1
            pos, position = position, position + 1
            if pos >= start:
                if u not in cache:
                    cache[u] = self.source.read(u, [int(x) for x in rows_of[u]])
                sample = self._sample(cache[u][r], epoch, consumer, pos)
                if sample is not None:
                    yield sample
            if pending[u] == 0 and state["pushing"] != u:
                cache.pop(u, None)

    def _sample(self, rec: Record, epoch: int, consumer: int, position: int) -> dict[str, Any] | None:
        texts = rec.texts[: self.text_top_k] if self.text_top_k else rec.texts
        if rec.image is None or not texts:
            self.stats["skipped"] += 1
            log.warning("skipping row %s: %s", rec.key, "no image" if rec.image is None else "no text")
            return None
        text = texts[random.Random(f"{self.seed}:{epoch}:{rec.key}").randrange(len(texts))]
        if self.max_words is not None:
            text = clean_caption(text, self.max_words)
        try:
            pix = self.transform(rec.image)
        except SampleError as e:
            self.stats["skipped"] += 1
            log.warning("skipping row %s: image not decodable (%s)", rec.key, e)
            return None
        self.stats["samples"] += 1
        return {"pixel_values": pix, "text": text, "group": rec.group, "key": rec.key,
                "consumer": consumer, "position": position, "epoch": epoch}


def match_groups(groups: Sequence[int], texts: Sequence[str]) -> list[int]:
    """Merge the samples of a batch that are the same image *or* carry the same text.

    ITC treats pairs of one group as positives and ITM never samples a negative from the anchor's
    group (BLIP §3.2; COCO: the image id). Two different images with the same caption (a duplicate
    alt text such as ``"image"``, or two pictures of the same thing described the same way) would
    otherwise be a *false* negative, and ITC's hard-negative sampling picks exactly those first,
    teaching ITM to reject true matches. Texts are compared after lowercasing and whitespace
    normalisation.

    Args:
        groups: ``B`` group ids (image ids).
        texts: ``B`` texts.

    Returns:
        ``B`` ints: equal for samples connected by a shared group or a shared text (the smallest
        batch index of the component).
    """
    parent = list(range(len(groups)))

    def find(i: int) -> int:
        """Union-find root of sample ``i`` (with path halving)."""
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, Any], int] = {}
    for i, (g, t) in enumerate(zip(groups, texts)):
        for key in (("g", int(g)), ("t", " ".join(str(t).lower().split()))):
            j = first.setdefault(key, i)
            a, b = find(i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return [find(i) for i in range(len(groups))]


def collate_common(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the task-independent fields of a list of samples.

    Returns:
        ``pixel_values`` float32 ``(B, 3, H, W)``, ``group`` int64 ``(B,)`` (the samples' group
        ids merged by :func:`match_groups`: same image or same text), ``consumer``/``position``/
        ``epoch`` int64 ``(B,)``, ``texts`` and ``keys`` lists of ``B`` strings.
    """
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "group": torch.tensor(match_groups([s["group"] for s in samples], [s["text"] for s in samples]),
                              dtype=torch.int64),
        "consumer": torch.tensor([s["consumer"] for s in samples], dtype=torch.int64),
        "position": torch.tensor([s["position"] for s in samples], dtype=torch.int64),
        "epoch": torch.tensor([s["epoch"] for s in samples], dtype=torch.int64),
        "texts": [s["text"] for s in samples],
        "keys": [s["key"] for s in samples],
    }


class ConcatSource:
    """Several sources read as one (``--data A --data B``: e.g. curated web shards plus a human-captioned set).

    Units are the sources' units in order. Groups are made unique across sources (source ``s``'s
    group ``g`` becomes ``s * 2**40 + g``), so rows of different sources are never ITC positives
    of each other by accident (COCO image ids and capfilt row indices overlap).

    Args:
        sources: the sources, at least one.
    """

    GROUP_STRIDE = 1 << 40

    def __init__(self, sources: Sequence[RowSource]) -> None:
        if not sources:
            raise InputError("no training data given")
        self.sources = list(sources)
        self._starts = np.cumsum([0] + [s.num_units() for s in self.sources]).astype(np.int64)

    def _locate(self, unit: int) -> tuple[int, int]:
        s = int(np.searchsorted(self._starts, unit, side="right") - 1)
        return s, unit - int(self._starts[s])

    def num_units(self) -> int:
        """Sum of the sources' units."""
        return int(self._starts[-1])

    def kept_rows(self, unit: int) -> np.ndarray:
        """The usable rows of ``unit`` (in its source's numbering)."""
        s, u = self._locate(unit)
        return self.sources[s].kept_rows(u)

    def read(self, unit: int, rows: Sequence[int]) -> dict[int, Record]:
        """The source's records with their group offset by ``s * GROUP_STRIDE``."""
        s, u = self._locate(unit)
        recs = self.sources[s].read(u, rows)
        return {r: Record(rec.key, rec.image, rec.texts, s * self.GROUP_STRIDE + rec.group) for r, rec in recs.items()}

    def describe(self) -> str:
        """The sources' descriptions joined with ``" + "``."""
        return " + ".join(s.describe() for s in self.sources)


def open_source(data: str | Sequence[str], fmt: str = "auto", images: str | None = None,
                rows_per_unit: int = 256) -> RowSource:
    """The :class:`RowSource` for ``--data``.

    Args:
        data: a capfilt output folder / shard, or a COCO ``captions_*.json`` (local or URI); a list
            of them is read as one :class:`ConcatSource` (``images`` and ``fmt`` apply to each).
        fmt: ``capfilt``, ``coco`` or ``auto`` (``.json`` means COCO).
        images: COCO image folder (see :class:`capfilt.train.coco.CocoCaptions`).
        rows_per_unit: COCO annotations per unit.

    Raises:
        InputError: the data cannot be read (message names the path and what is wrong).
    """
    if not isinstance(data, str):
        items = list(data)
        if len(items) != 1:
            return ConcatSource([open_source(d, fmt, images, rows_per_unit) for d in items])
        data = items[0]
    if fmt == "coco" or (fmt == "auto" and data.rstrip("/").endswith(".json")):
        from capfilt.train.coco import CocoCaptions

        return CocoCaptions(data, images=images, rows_per_unit=rows_per_unit)
    return CapfiltShards(data)
