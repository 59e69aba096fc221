"""Semantic dedup: drop kept rows whose image repeats the meaning of a better-scored kept row.

SemDeDup (Abbas et al. 2023), as NeMo Curator runs it: embed every image, cluster the embeddings
with k-means, and inside each cluster remove items whose cosine with another item is at or above a
threshold (``1 - eps``), keeping one per group. Here the embedding is the one the scorer already
computes (:data:`capfilt.schema.SEMDEDUP_FIELDS` ``image_embedding``: BLIP's ITC image embedding,
or CLIP's), and the copy kept is the one with the highest filter score (``select.rank_by``, ITM
by default: the best of its web and synthetic candidates), not the first to arrive.

**Why after the run, not per batch.** Which copy is best is known only once every copy is scored,
and copies arrive in any order: a later, better copy can arrive after the earlier one's shard was
committed. So the decision is a run-wide step (:meth:`SemDedupStage.finish`) that runs when every
input row is committed, over the committed parts, and rewrites the parts whose rows it changes with
the writer's commit protocol (:func:`capfilt.io.writer.commit_part`: Parquet written under a
temporary name, moved over the old part, then its stats). The per-batch stage only clears stale
decisions (a ``refilter`` of an output re-decides).

Steps (:func:`semantic_dedup`):

1. candidates: rows with an embedding that select kept (or that an earlier pass marked), read
   part by part (only the key, decision, score and embedding columns);
2. k-means (faiss, spherical, ``semdedup.kmeans_iterations``, ``semdedup.seed``) fitted on a
   sample of ``semdedup.sample_size`` candidates chosen by a hash of their keys; ``k`` is
   ``semdedup.n_clusters`` or fewer so that each centroid has >= 39 sample points (faiss' floor);
3. each candidate assigned to its nearest centroid (in chunks);
4. per cluster, candidates in order of score (best first; ties: smaller key) are kept unless their
   cosine with an already kept one is >= ``semdedup.threshold``; a dropped one gets ``keep =
   false``, ``drop_reason = semantic_duplicate``, ``semantic_duplicate_of`` (the most similar kept
   row's key), ``semantic_similarity`` and empty caption lists (as select leaves a dropped row);
5. parts whose rows differ from the decision are rewritten (and, with an unchanged Parquet but
   stale stats, only the stats).

**Resumable.** The pass is a pure function of the committed rows: candidates include rows marked
by an earlier pass, the sample is chosen by key hash and everything is sorted by key, so a rerun
(after a kill -9 in the middle of the pipeline or of the pass itself) reaches the same decision
and only finishes rewriting the parts that still differ. Memory: the candidates' embeddings,
``N x D x 4`` bytes (1M rows of BLIP's 256-d: 1 GB); duplicates across clusters are not found (as
in SemDeDup).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from capfilt.schema import DROP_SEMANTIC_DUPLICATE, SEMDEDUP_FIELDS
from capfilt.stages.base import Stage, column_or_nulls, package_version, require_package, set_field

if TYPE_CHECKING:
    from capfilt.config import PipelineConfig, SemDedupConfig
    from capfilt.io.filesystem import Location
    from capfilt.stages.base import RunContext

log = logging.getLogger(__name__)

#: faiss warns below 39 training points per centroid; ``k`` is capped so that there are at least this many.
MIN_POINTS_PER_CENTROID = 39
#: Candidates compared at once inside a cluster (bounds the similarity matrix to BLOCK x kept).
BLOCK = 1024
EMBEDDING, DUP_OF, SIMILARITY = (f.name for f in SEMDEDUP_FIELDS)


@dataclass(frozen=True)
class SemDedupResult:
    """What one pass did.

    Attributes:
        candidates: rows considered (kept by select, with an embedding).
        clusters: k-means clusters used.
        duplicates: rows dropped as semantic duplicates.
        parts_rewritten: committed parts whose Parquet (or only stats) was rewritten.
        seconds: wall time of the pass.
    """

    candidates: int
    clusters: int
    duplicates: int
    parts_rewritten: int
    seconds: float


class SemDedupStage(Stage):
    """Declare the semantic-dedup columns; per batch, clear stale decisions; decide after the run.

    Per batch (after select): ``image_embedding`` is kept (null when absent), ``semantic_duplicate_of``
    and ``semantic_similarity`` are set to null; select has just decided ``keep`` afresh. The
    decision itself is :meth:`finish` (module docs).

    Args:
        cfg: :class:`capfilt.config.SemDedupConfig`.
    """

    name: ClassVar[str] = "semdedup"
    section: ClassVar[str] = "semdedup"
    fields: ClassVar[tuple[pa.Field, ...]] = tuple(SEMDEDUP_FIELDS)

    def __init__(self, cfg: SemDedupConfig):
        self.cfg = cfg

    @classmethod
    def build(cls, cfg: PipelineConfig, ctx: RunContext | None) -> SemDedupStage:
        """The stage of this run; checks now that faiss is installed.

        Raises:
            ConfigError: ``faiss`` is not installed.
        """
        require_package("faiss", "semdedup.enabled (k-means over image embeddings)")
        return cls(cfg.semdedup)

    @classmethod
    def model_info(cls, cfg: PipelineConfig) -> dict[str, Any]:
        """The embedding's source model (the preset's filter or CLIP) and faiss' version."""
        src = "filter (BLIP ITC image embedding)" if {"itm", "itc"} & set(cfg.score.scorers) else "clip"
        return {"model": f"k-means + within-cluster cosine over the preset's {src}", "version": package_version("faiss-cpu")}

    @staticmethod
    def stats(table: pa.Table) -> dict[str, Any]:
        """``semantic_duplicates``: rows dropped as semantic duplicates."""
        return {"semantic_duplicates": column_or_nulls(table, "drop_reason").count(DROP_SEMANTIC_DUPLICATE)}

    @classmethod
    def finish(cls, cfg: PipelineConfig, ctx: RunContext) -> list[str]:
        """Decide over the whole committed output (:func:`semantic_dedup`); one note for the log."""
        from capfilt.io.filesystem import locate

        res = semantic_dedup(locate(ctx.output_uri), cfg)
        return [f"semantic dedup: {res.duplicates} of {res.candidates} kept rows are semantic duplicates "
                f"({res.clusters} clusters, {res.parts_rewritten} parts rewritten, {res.seconds:.1f} s)"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        out = batch if EMBEDDING in batch.column_names else set_field(batch, SEMDEDUP_FIELDS[0], pa.nulls(n, SEMDEDUP_FIELDS[0].type))
        out = set_field(out, SEMDEDUP_FIELDS[1], pa.nulls(n, SEMDEDUP_FIELDS[1].type))
        return set_field(out, SEMDEDUP_FIELDS[2], pa.nulls(n, SEMDEDUP_FIELDS[2].type))


def row_quality(web: list[float | None], synthetic: list[list[float] | None]) -> np.ndarray:
    """Per row, the best score among its candidates: ``max(web, *synthetic)``, ``-inf`` when none.

    Args:
        web: ``web_<rank_by>`` per row (null: no web caption).
        synthetic: ``synthetic_<rank_by>`` per row.

    Returns:
        float64 ``(N,)``.
    """
    out = np.full(len(web), -np.inf)
    for i, (w, s) in enumerate(zip(web, synthetic)):
        vals = [v for v in ([w] + list(s or [])) if v is not None]
        if vals:
            out[i] = max(vals)
    return out


def _sample(keys: list[str], size: int) -> np.ndarray:
    """Indices of ``size`` keys chosen by a hash of the key (the same whatever order rows arrived in)."""
    if len(keys) <= size:
        return np.arange(len(keys))
    h = np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "big") for k in keys],
                 dtype=np.uint64)
    return np.sort(np.argsort(h, kind="stable")[:size])


def cluster(emb: np.ndarray, keys: list[str], cfg: SemDedupConfig) -> tuple[np.ndarray, int]:
    """k-means cluster of every row (faiss, spherical, fitted on a key-hash sample).

    Args:
        emb: float32 ``(N, D)`` L2-normalised embeddings, rows sorted by key.
        keys: their keys.
        cfg: ``n_clusters``, ``sample_size``, ``kmeans_iterations``, ``seed``.

    Returns:
        ``(labels int64 (N,), k)``.
    """
    sample = _sample(keys, cfg.sample_size)
    k = min(cfg.n_clusters, max(1, len(sample) // MIN_POINTS_PER_CENTROID))
    if k == 1:
        return np.zeros(len(keys), np.int64), 1
    import faiss

    km = faiss.Kmeans(emb.shape[1], k, niter=cfg.kmeans_iterations, seed=cfg.seed, spherical=True, verbose=False)
    km.train(np.ascontiguousarray(emb[sample]))
    labels = np.empty(len(keys), np.int64)
    for start in range(0, len(keys), 65536):  # assignment streamed in chunks
        _, idx = km.index.search(np.ascontiguousarray(emb[start:start + 65536]), 1)
        labels[start:start + 65536] = idx[:, 0]
    return labels, k


def prune_cluster(emb: np.ndarray, members: np.ndarray, threshold: float) -> dict[int, tuple[int, float]]:
    """Greedy within-cluster pruning: ``members`` (row indices, best first) kept unless a kept one is close.

    Args:
        emb: float32 ``(N, D)`` L2-normalised embeddings.
        members: row indices of one cluster, ordered best-scored first.
        threshold: cosine at or above which a row repeats a kept one.

    Returns:
        ``{dropped row: (most similar kept row, cosine)}``.
    """
    dropped: dict[int, tuple[int, float]] = {}
    kept: list[int] = []
    for start in range(0, len(members), BLOCK):
        blk = members[start:start + BLOCK]
        eb = emb[blk]
        if kept:
            s = eb @ emb[kept].T
            best_j, best_s = s.argmax(1), s.max(1)
        within = eb @ eb.T
        blk_kept: list[int] = []
        for i in range(len(blk)):
            sim, of = (float(best_s[i]), kept[best_j[i]]) if kept else (-np.inf, -1)
            if blk_kept:
                w = within[i, blk_kept]
                j = int(w.argmax())
                if w[j] > sim:
                    sim, of = float(w[j]), int(blk[blk_kept[j]])
            if sim >= threshold:
                dropped[int(blk[i])] = (of, sim)
            else:
                blk_kept.append(i)
        kept += [int(blk[i]) for i in blk_kept]
    return dropped


def semantic_dedup(out: Location, cfg: PipelineConfig) -> SemDedupResult:
    """Decide semantic duplicates over every committed part of ``out`` and rewrite what changed.

    Rewritten parts keep their statistics except select's and this stage's counters, recomputed.

    Args:
        out: the output folder (every input row committed).
        cfg: the run's recipe (``semdedup``, and ``select`` for ``rank_by`` and for un-marking).

    Returns:
        :class:`SemDedupResult`.
    """
    import pyarrow.parquet as pq

    from capfilt.io.writer import scan_output

    t0 = time.time()
    sd, rank = cfg.semdedup, cfg.select.rank_by
    parts, _ = scan_output(out)
    keys: list[str] = []
    quality: list[np.ndarray] = []
    embs: list[np.ndarray] = []
    for p in parts:
        with out.fs.open_input_file(p.parquet) as f:
            names = pq.ParquetFile(f).schema_arrow.names
            cols = [c for c in ("key", "keep", "drop_reason", EMBEDDING, f"web_{rank}", f"synthetic_{rank}")
                    if c in names]
            t = pq.read_table(f, columns=cols)
        if EMBEDDING not in t.column_names:
            continue
        cand = pc.and_(pc.is_valid(t.column(EMBEDDING)),
                       pc.or_(t.column("keep"), pc.fill_null(pc.equal(t.column("drop_reason"),
                                                                      DROP_SEMANTIC_DUPLICATE), False)))
        t = t.filter(cand)
        if not t.num_rows:
            continue
        keys += t.column("key").to_pylist()
        quality.append(row_quality(column_or_nulls(t, f"web_{rank}"), column_or_nulls(t, f"synthetic_{rank}")))
        flat = pc.list_flatten(t.column(EMBEDDING)).to_numpy(zero_copy_only=False)
        embs.append(flat.astype(np.float32).reshape(t.num_rows, -1))
    decisions: dict[str, tuple[str, float]] = {}
    k = 0
    if len(keys) > 1:
        order = np.argsort(np.array(keys), kind="stable")
        keys = [keys[i] for i in order]
        emb = np.concatenate(embs)[order]
        q = np.concatenate(quality)[order]
        labels, k = cluster(emb, keys, sd)
        rank_of = np.empty(len(keys), np.int64)
        rank_of[np.lexsort((np.arange(len(keys)), -q))] = np.arange(len(keys))  # best first, then key
        for c in range(k):
            members = np.flatnonzero(labels == c)
            members = members[np.argsort(rank_of[members], kind="stable")]
            for row, (of, sim) in prune_cluster(emb, members, sd.threshold).items():
                decisions[keys[row]] = (keys[of], sim)
    rewritten = sum(_apply(out, p, decisions, cfg) for p in parts)
    res = SemDedupResult(len(keys), k, len(decisions), rewritten, time.time() - t0)
    log.info("%s: semantic dedup %s", out.uri, res)
    return res


def _apply(out: Location, part: Any, decisions: dict[str, tuple[str, float]], cfg: PipelineConfig) -> bool:
    """Make one committed part carry ``decisions``; return whether anything was rewritten."""
    import pyarrow.parquet as pq

    from capfilt.io.writer import commit_part
    from capfilt.stages.select import SelectStage

    with out.fs.open_input_file(part.parquet) as f:
        pf = pq.ParquetFile(f)
        if DUP_OF not in pf.schema_arrow.names:
            return False
        compression = pf.metadata.row_group(0).column(0).compression if pf.metadata.num_row_groups else "ZSTD"
        table = pf.read(columns=["key", "drop_reason", DUP_OF, SIMILARITY])  # the whole part only if it changes
    keys = table.column("key").to_pylist()
    reasons = column_or_nulls(table, "drop_reason")
    was = [r == DROP_SEMANTIC_DUPLICATE for r in reasons]
    now = [k in decisions for k in keys]
    dup_of = [decisions[k][0] if d else None for k, d in zip(keys, now)]
    sims = [decisions[k][1] if d else None for k, d in zip(keys, now)]
    same = (was == now and column_or_nulls(table, DUP_OF) == dup_of
            and np.allclose([s or 0.0 for s in column_or_nulls(table, SIMILARITY)], [s or 0.0 for s in sims], atol=1e-6))
    count = sum(now)
    if same and part.stats.get("semantic_duplicates") == count:
        return False
    with out.fs.open_input_file(part.parquet) as f:
        table = pq.read_table(f)
    if not same:
        new = table
        unmark = [i for i, (w, n) in enumerate(zip(was, now)) if w and not n]
        if unmark:  # an earlier decision no longer holds: select decides these rows again
            redo = SelectStage(cfg.select)(table.take(unmark))
            new = _patch(new, unmark, redo, ("captions", "caption_scores", "caption_sources", "keep", "drop_reason"))
        mark = [i for i, n in enumerate(now) if n]
        if mark:
            types = {c: new.schema.field(c).type for c in ("captions", "caption_scores", "caption_sources")}
            dropped = pa.table({"keep": pa.array([False] * len(mark)),
                                "drop_reason": pa.array([DROP_SEMANTIC_DUPLICATE] * len(mark), pa.string()),
                                **{c: pa.array([[]] * len(mark), t) for c, t in types.items()}})
            new = _patch(new, mark, dropped, ("captions", "caption_scores", "caption_sources", "keep", "drop_reason"))
        new = set_field(new, SEMDEDUP_FIELDS[1], dup_of)
        new = set_field(new, SEMDEDUP_FIELDS[2], sims)
        table = new.cast(table.schema)
    stats = dict(part.stats)
    stats.update(SelectStage.stats(table))
    stats.update(SemDedupStage.stats(table))
    commit_part(out, part.name, table, stats, None if compression == "UNCOMPRESSED" else compression.lower())
    return True


def _patch(table: pa.Table, rows: list[int], values: pa.Table, columns: tuple[str, ...]) -> pa.Table:
    """``table`` with ``columns`` of ``rows`` replaced by ``values``' (row ``j`` of ``values`` -> ``rows[j]``)."""
    pos = {r: j for j, r in enumerate(rows)}
    for c in columns:
        old, repl = table.column(c).to_pylist(), values.column(c).to_pylist()
        merged = [repl[pos[i]] if i in pos else v for i, v in enumerate(old)]
        table = table.set_column(table.column_names.index(c), c, pa.array(merged, table.schema.field(c).type))
    return table
