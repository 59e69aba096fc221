"""The contract every registered stage keeps (see :class:`capfilt.stages.base.Stage`).

Parametrised over :func:`capfilt.stages.registry.known_stages`: a new stage gets these tests for
free. Inputs are what the stage really receives in a run of the ``blip`` recipe (with dedup) and of
``refilter`` on its output (:mod:`tests.helpers.pipeline`).
"""

from __future__ import annotations

import pickle
import typing

import pyarrow as pa
import pytest

from capfilt.config import PipelineConfig, ResourcesConfig
from capfilt.schema import CONTRACT_COLUMNS, ID_FIELDS
from capfilt.stages.base import Shape, Stage
from capfilt.stages.registry import known_stages, output_schema
from capfilt.stages.write import STATS_ROW_SCHEMA
from tests.helpers.pipeline import Recorded, record_all

STAGES = known_stages()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Recorded:
    return record_all(tmp_path_factory.mktemp("contract"))


def _fresh(rec: Recorded, cls: type[Stage]) -> Stage:
    """A new copy of the recorded stage (as Ray ships it), set up."""
    stage = pickle.loads(pickle.dumps(rec.stages[cls]))
    stage.setup()
    return stage


def _public(t: pa.Table) -> pa.Table:
    """``t`` without internal timing columns (``_seconds_*``), which differ between calls."""
    return t.drop_columns([c for c in t.column_names if c.startswith("_seconds_")])


@pytest.mark.parametrize("cls", STAGES, ids=lambda c: f"{c.name}:{c.__name__}")
def test_declaration(cls: type[Stage]):
    assert cls.shape in typing.get_args(Shape)
    assert cls.section is None or cls.section in PipelineConfig.model_fields
    assert cls.name in ResourcesConfig.model_fields  # built-in stages have a resources entry
    fields = cls.output_fields(["itm", "itc", "clip"])
    assert {f.name for f in fields} <= CONTRACT_COLUMNS
    assert all(isinstance(v, (int, dict)) for v in cls.stats(pa.table({})).values())


def test_every_contract_column_is_declared_by_a_stage():
    assert set(output_schema([], ["itm", "itc", "clip"]).names) == CONTRACT_COLUMNS
    assert output_schema([pa.field("note", pa.string())], []).names[: len(ID_FIELDS) + 1] == ["key", "url",
                                                                                              "caption", "note"]


@pytest.mark.parametrize("cls", STAGES, ids=lambda c: f"{c.name}:{c.__name__}")
def test_stage_contract(recorded: Recorded, cls: type[Stage]):
    assert cls in recorded.stages, f"{cls.__name__} never ran in the recorded pipelines"
    batch = recorded.inputs[cls]
    first = _fresh(recorded, cls)(batch)  # picklable, and works after the round trip

    if cls.shape == "sink":  # one stats row per shard part, and rewriting a part is harmless
        assert first.schema == STATS_ROW_SCHEMA and first.num_rows == len(set(batch.column("_shard").to_pylist()))
        assert first.column("name").to_pylist() == _fresh(recorded, cls)(batch).column("name").to_pylist()
        return
    if cls.shape == "fanout":  # one spec row in, the shard's rows out, with their position
        assert batch.num_rows >= 1 and first.num_rows >= batch.num_rows
        assert {"_shard", "_offset"} <= set(first.column_names)
        assert _public(_fresh(recorded, cls)(batch)).equals(_public(first))
    else:  # same rows, same order, input columns kept
        assert first.num_rows == batch.num_rows
        assert first.column("key").to_pylist() == batch.column("key").to_pylist()
        assert set(batch.column_names) <= set(first.column_names)
        # idempotent: the stage applied to its own output changes nothing
        second = _fresh(recorded, cls)(first)
        assert _public(second).equals(_public(first)), cls.__name__
    for f in cls.output_fields(recorded.scorers):
        assert f.name in first.column_names, f.name
        assert first.schema.field(f.name).type == f.type, f.name
