"""Read stages: turn shard specs (one row per shard) into the shard's rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.io.filesystem import locate
from capfilt.io.reader import InputFile, read_rows
from capfilt.stages.base import Stage

SPEC_SCHEMA = pa.schema([("shard_id", pa.int64()), ("file_index", pa.int64()), ("start", pa.int64()),
                         ("stop", pa.int64()), ("skip", pa.list_(pa.int64())), ("path", pa.string())])


@dataclass(frozen=True)
class ShardSpec:
    """One output shard: rows ``[start, stop)`` of input file ``file_index``, minus ``skip``.

    For ``source: output`` (refilter) ``path`` is the old shard file and the row range is unused.
    """

    shard_id: int
    file_index: int
    start: int
    stop: int
    skip: tuple[int, ...] = ()
    path: str | None = None

    @property
    def pending(self) -> int:
        """Rows this spec still has to produce."""
        return self.stop - self.start - len(self.skip)


def specs_table(specs: list[ShardSpec]) -> pa.Table:
    """Shard specs as a table (the input of the read stage)."""
    return pa.Table.from_pylist([{"shard_id": s.shard_id, "file_index": s.file_index, "start": s.start,
                                  "stop": s.stop, "skip": list(s.skip), "path": s.path} for s in specs],
                                schema=SPEC_SCHEMA)


def _with_position(t: pa.Table, shard_id: int, offsets: pa.Array) -> pa.Table:
    t = t.append_column("_shard", pa.array([shard_id] * t.num_rows, pa.int64()))
    return t.append_column("_offset", offsets)


class ReadStage(Stage):
    """Read the input rows of each shard spec (metadata input).

    Output: ``key``, ``url``, ``caption``, pass-through columns, and internal ``_shard`` /
    ``_offset`` (row offset within the shard), as :func:`capfilt.io.reader.read_rows` gives them.
    """

    name: ClassVar[str] = "read"

    def __init__(self, files: list[InputFile]):
        self.files = {f.index: f for f in files}

    def __call__(self, batch: pa.Table) -> pa.Table:
        tables = []
        for spec in batch.to_pylist():
            f = self.files[spec["file_index"]]
            t = read_rows(f, spec["start"], spec["stop"], frozenset(spec["skip"] or ()))
            offsets = pa.compute.subtract(t.column("_row"), pa.scalar(spec["start"], pa.int64()))
            tables.append(_with_position(t.drop_columns(["_row"]), spec["shard_id"], offsets.combine_chunks()))
        return pa.concat_tables(tables, promote_options="permissive")


class ReadOutputStage(Stage):
    """Read old shards of a capfilt output (``source: output``, the refilter recipe).

    Output: the old shard's columns unchanged, plus ``_shard`` / ``_offset``; the select stage then
    recomputes ``captions``/``caption_scores``/``caption_sources``/``keep``/``drop_reason``.
    """

    name: ClassVar[str] = "read"

    def __init__(self, output_uri: str):
        self.output_uri = output_uri

    def __call__(self, batch: pa.Table) -> pa.Table:
        loc = locate(self.output_uri)
        tables = []
        for spec in batch.to_pylist():
            with loc.fs.open_input_file(spec["path"]) as fh:
                t = pq.read_table(fh)
            t = t.replace_schema_metadata(None)
            skip = set(spec["skip"] or ())
            offsets = [i for i in range(t.num_rows) if i not in skip]
            if skip:
                t = t.take(pa.array(offsets, pa.int64()))
            tables.append(_with_position(t, spec["shard_id"], pa.array(offsets, pa.int64())))
        return pa.concat_tables(tables)
