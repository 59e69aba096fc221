"""Decoded input is shared by the shards of one run's read stage, and by nothing else."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.config import InputConfig
from capfilt.io.readcache import ReadCache
from capfilt.io.reader import inspect_inputs, read_rows
from capfilt.stages.read import ReadStage, ShardSpec, specs_table


def _big_row_group(path, rows: int) -> None:
    t = pa.table({"url": [f"http://x/{i}.jpg" for i in range(rows)], "caption": [f"c{i}" for i in range(rows)]})
    pq.write_table(t, path, row_group_size=rows)
    assert pq.ParquetFile(path).num_row_groups == 1


def test_one_row_group_is_decoded_once_for_all_its_shards(tmp_path):
    """20 shards of one 1000-row row group: one decode, and exactly the rows and keys of a plain read."""
    _big_row_group(tmp_path / "a.parquet", 1000)
    files = inspect_inputs([str(tmp_path / "a.parquet")], InputConfig())
    stage = ReadStage(files)
    stage.setup()
    specs = [ShardSpec(i, 0, i * 50, i * 50 + 50, (i * 50 + 1,) if i % 3 == 0 else ()) for i in range(20)]
    got = pa.concat_tables([stage(specs_table([s])) for s in specs])
    assert stage._cache.loads == 1
    plain = pa.concat_tables([read_rows(files[0], s.start, s.stop, frozenset(s.skip)) for s in specs])
    assert got.column("key").to_pylist() == plain.column("key").to_pylist()
    assert got.column("url").to_pylist() == plain.column("url").to_pylist()
    assert len(got) == 1000 - 7


def test_cache_never_travels_and_a_new_run_clears_the_old(tmp_path):
    _big_row_group(tmp_path / "a.parquet", 10)
    files = inspect_inputs([str(tmp_path / "a.parquet")], InputConfig())
    first = ReadStage(files)
    first.setup()
    first(specs_table([ShardSpec(0, 0, 0, 5)]))
    assert len(first._cache) == 1
    copy = pickle.loads(pickle.dumps(first))
    assert copy._cache is None and copy.run_token == first.run_token
    second = ReadStage(files)
    assert second.run_token != first.run_token  # Ray never mistakes it for the first run's function
    second.setup()
    assert len(first._cache) == 0  # one run's decoded input per process


def test_budget_drops_oldest_but_keeps_newest():
    cache = ReadCache(max_bytes=1)
    a = cache.get("a", lambda: pa.table({"x": [1, 2, 3]}))
    assert cache.get("a", lambda: pa.table({"x": [0]})) is a and cache.loads == 1
    cache.get("b", lambda: pa.table({"x": [4]}))
    assert len(cache) == 1 and cache.get("b", lambda: pa.table({"x": [0]})).column("x").to_pylist() == [4]


def test_shards_across_row_group_boundaries_read_the_same_rows(tmp_path):
    """Row groups of 7, shards of 5: every shard spans one or two groups; keys and values as a plain read."""
    t = pa.table({"url": [f"http://x/{i}.jpg" for i in range(40)], "caption": [f"c{i}" for i in range(40)]})
    pq.write_table(t, tmp_path / "a.parquet", row_group_size=7)
    (f,) = inspect_inputs([str(tmp_path / "a.parquet")], InputConfig())
    stage = ReadStage([f])
    specs = [ShardSpec(i, 0, s, min(s + 5, 40)) for i, s in enumerate(range(0, 40, 5))]
    got = pa.concat_tables([stage(specs_table([s])) for s in specs])
    assert got.column("key").to_pylist() == [f"0000_{i:09d}" for i in range(40)]
    assert got.column("caption").to_pylist() == t.column("caption").to_pylist()
    assert stage._cache.loads == 6  # each of the 6 row groups decoded once
