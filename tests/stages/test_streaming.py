"""Issue 15 item 2: shards stream through the stages as small blocks and are still committed whole.

Exercised without Ray: the read stage on streaming blocks, the writer's staging, and the flush a
run does after a crash. The pipeline-level checks (Ray, kill -9, worker kills) run with small
blocks in tests/pipeline/test_resume.py and test_worker_kill.py.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.config import InputConfig, OutputConfig
from capfilt.io.filesystem import locate
from capfilt.io.reader import inspect_inputs
from capfilt.io.writer import committed_keys, scan_output, stage_block, staged_shards
from capfilt.stages.read import PART_ROWS, ReadStage, ShardSpec, specs_table, stream_blocks
from capfilt.stages.registry import known_stages, output_schema
from capfilt.stages.write import ShardWriter, flush_staging


def test_stream_blocks_cover_each_pending_row_once_in_shard_order():
    specs = [ShardSpec(0, 0, 0, 10, skip=(1, 2, 7)), ShardSpec(1, 0, 10, 13), ShardSpec(2, 1, 0, 5, path="old.parquet")]
    blocks = stream_blocks(specs, 3)
    rows = [(b.shard_id, r) for b in blocks for r in range(b.start, b.stop) if r not in b.skip]
    assert rows == [(0, r) for r in (0, 3, 4, 5, 6, 8, 9)] + [(1, 10), (1, 11), (1, 12), (2, 0), (2, 1), (2, 2),
                                                               (2, 3), (2, 4)]
    shard0 = [b for b in blocks if b.shard_id == 0]
    assert [(b.start, b.stop, b.skip) for b in shard0] == [(0, 5, (1, 2)), (5, 9, (7,)), (9, 10, ())]
    assert {(b.base, b.part_rows) for b in shard0} == {(0, 7)}
    # a shard that fits one block, and a refilter spec, stay whole (committed directly)
    assert blocks[3:] == specs[1:]
    assert stream_blocks(specs, 100) == specs
    with pytest.raises(ValueError):
        stream_blocks(specs, 0)


def test_block_rows_auto_streams_only_when_a_model_runs():
    assert OutputConfig().resolved_block_rows(models=True, model_batch=8) == 64
    assert OutputConfig().resolved_block_rows(models=True, model_batch=100) == 200
    assert OutputConfig().resolved_block_rows(models=False) == 1000
    assert OutputConfig(rows_per_shard=10).resolved_block_rows(models=True) == 10
    assert OutputConfig(block_rows=5).resolved_block_rows(models=False) == 5


def test_read_stage_gives_blocks_the_offsets_of_the_whole_shard(tmp_path):
    src = tmp_path / "in.csv"
    src.write_text("url,caption\n" + "".join(f"http://h/{i}.jpg,c{i}\n" for i in range(20)))
    files = inspect_inputs([str(src)], InputConfig())
    stage = ReadStage(files)
    whole = stage(specs_table([ShardSpec(1, 0, 10, 20, skip=(12,))]))
    blocks = stream_blocks([ShardSpec(1, 0, 10, 20, skip=(12,))], 4)
    parts = [stage(specs_table([b])) for b in blocks]
    streamed = pa.concat_tables([p.drop_columns([PART_ROWS]) for p in parts])
    assert streamed.column("key").to_pylist() == whole.column("key").to_pylist()
    assert streamed.column("_offset").to_pylist() == whole.column("_offset").to_pylist() == [0, 1, 3, 4, 5, 6, 7, 8, 9]
    assert {r for p in parts for r in p.column(PART_ROWS).to_pylist()} == {9}
    assert PART_ROWS not in whole.column_names


def _block(shard: int, offsets: list[int], part_rows: int | None) -> pa.Table:
    n = len(offsets)
    cols = {"key": [f"0000_{shard * 100 + o:09d}" for o in offsets], "url": [f"http://h/{o}" for o in offsets],
            "status": ["failed_to_download"] * n, "error_message": [f"boom {o}" for o in offsets],
            "_shard": pa.array([shard] * n, pa.int64()), "_offset": pa.array(offsets, pa.int64()),
            "_seconds_download": pa.array([0.5] * n, pa.float64())}
    if part_rows is not None:
        cols[PART_ROWS] = pa.array([part_rows] * n, pa.int64())
    return pa.table(cols)


def _parts(out: Path) -> dict[str, list[str]]:
    loc = locate(str(out))
    return {p.name: pq.read_table(p.parquet, columns=["key"]).column("key").to_pylist() for p in scan_output(loc)[0]}


def test_writer_commits_a_streamed_shard_whole_when_its_last_block_arrives(tmp_path):
    out = tmp_path / "out"
    writer = ShardWriter(str(out), output_schema([], []), "run1", stats_from=known_stages())
    first = writer(_block(0, [4, 5, 6], 7))          # blocks arrive out of order
    again = writer(_block(0, [4, 5, 6], 7))          # Ray re-executes a block: same staged file
    assert first.num_rows == again.num_rows == 0 and _parts(out) == {}
    assert staged_shards(locate(str(out))) == [0]
    last = writer(_block(0, [0, 1, 3], 7))
    assert last.num_rows == 0  # 6 of 7 rows staged
    done = writer(_block(0, [7], 7))
    assert done.column("name").to_pylist() == ["00000"] and done.column("rows").to_pylist() == [7]
    assert _parts(out) == {"00000": [f"0000_{o:09d}" for o in (0, 1, 3, 4, 5, 6, 7)]}
    loc = locate(str(out))
    assert staged_shards(loc) == []
    part = scan_output(loc)[0][0]
    assert part.stats["rows"] == 7 and part.stats["seconds"]["download"] == pytest.approx(3.5)
    assert pq.read_table(part.parquet).column_names == output_schema([], []).names  # no internal columns
    # a shard that fits one block (no _part_rows) is committed at once, as before
    assert writer(_block(1, [0, 1], None)).column("name").to_pylist() == ["00001"]


def test_staged_blocks_left_by_a_crash_become_a_part_and_are_not_redone(tmp_path):
    out = tmp_path / "out"
    schema = output_schema([], [])
    writer = ShardWriter(str(out), schema, "run1", stats_from=known_stages())
    writer(_block(0, [3, 4, 5], 9))
    writer(_block(0, [6, 7, 8], 9))  # crash: the block with offsets 0-2 never arrived
    loc = locate(str(out))
    notes = flush_staging(loc, schema, "run1", known_stages())
    assert len(notes) == 1 and "6 staged rows of shard 0" in notes[0]
    assert _parts(out) == {"00000-000003": [f"0000_{o:09d}" for o in range(3, 9)]}
    assert staged_shards(loc) == [] and flush_staging(loc, schema, "run1", known_stages()) == []
    # a crash between committing a shard and deleting its staging: the leftovers are dropped, not re-added
    writer(_block(1, [0, 1], 4))
    done = writer(_block(1, [2, 3], 4))
    assert done.column("name").to_pylist() == ["00001"]
    stage_block(loc, 1, 0, _block(1, [0, 1], 4))
    assert flush_staging(loc, schema, "run1", known_stages()) == []
    keys = committed_keys(loc, scan_output(loc)[0])
    assert len(keys) == len(set(keys)) == 10 and staged_shards(loc) == []
