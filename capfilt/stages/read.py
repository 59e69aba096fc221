"""Read stages: plan the shards of a run, then turn each shard spec (one row per shard) into its rows.

Planning lives here, next to the stages that read what it plans: :func:`plan_metadata_shards`
(row ranges of the input files) and :func:`plan_output_shards` (the committed parts of an earlier
output, for refilter). Both leave out rows already committed, so a resume redoes only the rest.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.io.filesystem import Location, locate
from capfilt.io.readcache import ReadCache
from capfilt.io.reader import InputFile, key_to_position, read_rows
from capfilt.schema import ID_FIELDS
from capfilt.stages.base import RunContext, Stage

if TYPE_CHECKING:
    from capfilt.config import PipelineConfig
    from capfilt.io.writer import CommittedPart

SPEC_SCHEMA = pa.schema([("shard_id", pa.int64()), ("file_index", pa.int64()), ("start", pa.int64()),
                         ("stop", pa.int64()), ("skip", pa.list_(pa.int64())), ("path", pa.string()),
                         ("base", pa.int64()), ("part_rows", pa.int64())])


@dataclass(frozen=True)
class ShardSpec:
    """One output shard: rows ``[start, stop)`` of input file ``file_index``, minus ``skip``.

    For ``source: output`` (refilter) ``path`` is the old shard file and the row range is unused.
    A streaming block of a shard (:func:`stream_blocks`) has ``base``, the shard's first input row
    (row offsets within the shard count from it), and ``part_rows``, the rows the whole shard
    still has to produce in this run (the writer commits the shard once that many arrived).
    """

    shard_id: int
    file_index: int
    start: int
    stop: int
    skip: tuple[int, ...] = ()
    path: str | None = None
    base: int | None = None
    part_rows: int | None = None

    @property
    def pending(self) -> int:
        """Rows this spec still has to produce."""
        return self.stop - self.start - len(self.skip)


def specs_table(specs: list[ShardSpec]) -> pa.Table:
    """Shard specs as a table (the input of the read stage)."""
    return pa.Table.from_pylist([{"shard_id": s.shard_id, "file_index": s.file_index, "start": s.start,
                                  "stop": s.stop, "skip": list(s.skip), "path": s.path, "base": s.base,
                                  "part_rows": s.part_rows} for s in specs],
                                schema=SPEC_SCHEMA)


def stream_blocks(specs: list[ShardSpec], block_rows: int) -> list[ShardSpec]:
    """Cut metadata shard specs into streaming blocks of at most ``block_rows`` pending rows.

    A spec with no more pending rows than ``block_rows`` (or a refilter spec) stays whole and is
    committed directly. Longer ones become consecutive blocks that keep the shard id, carry the
    shard's first row as ``base`` and its pending rows as ``part_rows``, and together read exactly
    the spec's pending rows. Blocks keep the shard order, so shards complete (and are committed)
    one after another as the stream goes.

    Raises:
        ValueError: ``block_rows`` < 1.
    """
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    out: list[ShardSpec] = []
    for s in specs:
        if s.path is not None or s.pending <= block_rows:
            out.append(s)
            continue
        skip = set(s.skip)
        rows = [r for r in range(s.start, s.stop) if r not in skip]
        for i in range(0, len(rows), block_rows):
            first, last = rows[i], rows[min(i + block_rows, len(rows)) - 1]
            out.append(ShardSpec(s.shard_id, s.file_index, first, last + 1,
                                 tuple(r for r in range(first, last + 1) if r in skip), None, s.start, s.pending))
    return out


def plan_metadata_shards(files: list[InputFile], rows_per_shard: int, done_keys: list[str]
                         ) -> tuple[list[ShardSpec], int]:
    """Shard specs of metadata input: ``rows_per_shard`` rows of one file each, minus committed rows.

    Shard ids are positions in the full plan, so they stay the same on resume.

    Returns:
        ``(specs still to do, number of shards already complete)``.
    """
    done = dict.fromkeys(key_to_position(k) for k in done_keys)
    specs, shard_id, skipped = [], 0, 0
    for f in files:
        for start in range(0, f.num_rows, rows_per_shard):
            stop = min(start + rows_per_shard, f.num_rows)
            skip = tuple(r for r in range(start, stop) if (f.index, r) in done)
            spec = ShardSpec(shard_id, f.index, start, stop, skip)
            if spec.pending > 0:
                specs.append(spec)
            else:
                skipped += 1
            shard_id += 1
    return specs, skipped


def plan_output_shards(old: Location, old_parts: list[CommittedPart], done_keys: list[str]
                       ) -> tuple[list[ShardSpec], int, int]:
    """Shard specs of an earlier output (refilter): one per committed part, minus committed rows.

    A spec keeps its source part's identity: shard id and row offset come from the part's name
    (``00012-000250`` -> shard 12, rows from offset 250), so the refiltered part has the same name
    as the part it refilters, whatever other parts the source gains or loses between attempts.

    Returns:
        ``(specs still to do, number of shards already complete, rows in the old output)``.
    """
    done_set = set(done_keys)
    specs, skipped, total_rows = [], 0, 0
    for p in old_parts:
        with old.fs.open_input_file(p.parquet) as fh:
            keys = pq.read_table(fh, columns=["key"]).column("key").to_pylist()
        total_rows += len(keys)
        sid, _, offset = p.name.partition("-")
        base = int(offset or 0)
        spec = ShardSpec(int(sid), 0, base, base + len(keys),
                         tuple(i for i, k in enumerate(keys) if k in done_set), p.parquet)
        if spec.pending:
            specs.append(spec)
        else:
            skipped += 1
    return specs, skipped, total_rows


#: Internal column of a streaming block's rows: the rows its whole shard produces in this run.
PART_ROWS = "_part_rows"


def _with_position(t: pa.Table, shard_id: int, offsets: pa.Array) -> pa.Table:
    t = t.append_column("_shard", pa.array([shard_id] * t.num_rows, pa.int64()))
    return t.append_column("_offset", offsets)


class ReadStage(Stage):
    """Read the input rows of each shard spec (metadata input).

    Output: ``key``, ``url``, ``caption``, pass-through columns, and internal ``_shard`` /
    ``_offset`` (row offset within the shard), as :func:`capfilt.io.reader.read_rows` gives them;
    a streaming block (:func:`stream_blocks`) also gets :data:`PART_ROWS`.
    """

    name: ClassVar[str] = "read"
    shape: ClassVar[str] = "fanout"
    fields: ClassVar[tuple[pa.Field, ...]] = tuple(ID_FIELDS)

    def __init__(self, files: list[InputFile]):
        self.files = {f.index: f for f in files}
        # A fresh token per stage object: Ray keeps deserialized task functions per worker and
        # reuses one whose pickled bytes are the same, so without it a later run over the same
        # files could meet this run's stage, and its decoded (perhaps since edited) input.
        self.run_token = uuid.uuid4().hex
        self._cache: ReadCache | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": None}  # decoded tables never travel; each process decodes

    @classmethod
    def build(cls, cfg: PipelineConfig, ctx: RunContext) -> ReadStage:
        """The read stage over the run's input files."""
        return cls(list(ctx.files))

    def setup(self) -> None:
        """Start this process's cache of decoded input (shared by this run's shards only)."""
        if self._cache is None:
            self._cache = ReadCache()

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.setup()
        tables = []
        for spec in batch.to_pylist():
            f = self.files[spec["file_index"]]
            t = read_rows(f, spec["start"], spec["stop"], frozenset(spec["skip"] or ()), self._cache)
            base = spec["start"] if spec.get("base") is None else spec["base"]
            offsets = pa.compute.subtract(t.column("_row"), pa.scalar(base, pa.int64()))
            t = _with_position(t.drop_columns(["_row"]), spec["shard_id"], offsets.combine_chunks())
            if spec.get("part_rows") is not None:  # one streaming block of a longer shard
                t = t.append_column(PART_ROWS, pa.array([spec["part_rows"]] * t.num_rows, pa.int64()))
            tables.append(t)
        return pa.concat_tables(tables, promote_options="permissive")


class ReadOutputStage(Stage):
    """Read old shards of a capfilt output (``source: output``, the refilter recipe).

    Output: the old shard's columns unchanged, plus ``_shard`` / ``_offset``; the select stage then
    recomputes ``captions``/``caption_scores``/``caption_sources``/``keep``/``drop_reason``.
    """

    name: ClassVar[str] = "read"
    shape: ClassVar[str] = "fanout"
    fields: ClassVar[tuple[pa.Field, ...]] = tuple(ID_FIELDS)

    def __init__(self, output_uri: str):
        self.output_uri = output_uri

    @classmethod
    def build(cls, cfg: PipelineConfig, ctx: RunContext) -> ReadOutputStage:
        """The read stage over the earlier output the run refilters."""
        return cls(ctx.source_uri)

    def __call__(self, batch: pa.Table) -> pa.Table:
        loc = locate(self.output_uri)
        tables = []
        for spec in batch.to_pylist():
            with loc.fs.open_input_file(spec["path"]) as fh:
                t = pq.read_table(fh)
            t = t.replace_schema_metadata(None)
            skip = set(spec["skip"] or ())
            rows = [i for i in range(t.num_rows) if i not in skip]
            if skip:
                t = t.take(pa.array(rows, pa.int64()))
            offsets = pa.array([spec["start"] + i for i in rows], pa.int64())  # the source part's offsets
            tables.append(_with_position(t, spec["shard_id"], offsets))
        return pa.concat_tables(tables)
