"""Adding a stage touches the stage module (with its config section) and a test, nothing in capfilt/."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from capfilt.io.filesystem import locate
from capfilt.io.reader import inspect_inputs, passthrough_fields
from capfilt.io.writer import scan_output
from capfilt.local_runner import run_local
from capfilt.runner import StagePlan
from capfilt.stages.base import RunContext
from capfilt.stages.read import plan_metadata_shards, specs_table
from capfilt.stages.registry import METADATA_STAGES, build_stages, output_schema, totals_from_stats
from capfilt.stages.select import SelectStage
from tests.helpers.caption_length import CAPTION_TOO_SHORT, CaptionLengthPipeline, CaptionLengthStage
from tests.helpers.pipeline import RUN_ID, write_input


def test_toy_filter_stage_runs_end_to_end(tmp_path):
    at = METADATA_STAGES.index(SelectStage)
    stages = (*METADATA_STAGES[:at], CaptionLengthStage, *METADATA_STAGES[at:])
    cfg = CaptionLengthPipeline.model_validate({"download": {"allow_file_urls": True, "thread_count": 2},
                                                "caption": {"enabled": False}, "score": {"enabled": False},
                                                "select": {"itm_threshold": None}, "caption_length": {"min_words": 3}})
    files = inspect_inputs([str(write_input(tmp_path))], cfg.input)
    out = locate(str(tmp_path / "out"))
    extra = (CaptionLengthStage,)
    ctx = RunContext(out.uri, RUN_ID, files=files,
                     schema=output_schema(passthrough_fields(files), [], RUN_ID, extra=extra))
    plans = [StagePlan(s, r) for s, r in build_stages(cfg, ctx, stages)]
    assert [p.stage.name for p in plans] == ["read", "download", "caption_length", "select", "write"]
    specs, _ = plan_metadata_shards(files, cfg.output.rows_per_shard, [])
    list(run_local(specs_table(specs), plans))

    t = pq.read_table(out.path).sort_by("key")
    assert t.column("caption_words").to_pylist() == [5, 2, 0, 6, 1]
    assert t.column("status").to_pylist()[:3] == ["success", CAPTION_TOO_SHORT, CAPTION_TOO_SHORT]
    parts, _ = scan_output(out)
    stats = [p.stats for p in parts]
    assert stats[0]["captions_too_short"] == 2
    totals = totals_from_stats(stats, extra=extra)
    assert totals["captions_too_short"] == 2 and totals["status"][CAPTION_TOO_SHORT] == 2
    assert json.loads(json.dumps(totals)) == totals
