"""A tiny real pipeline, run stage by stage in-process, recording what each stage was given.

Inputs are ``file://`` URLs of the COCO fixture images (``download.allow_file_urls``), plus a broken
URL and a repeated image so that failure and dedup paths carry rows too. Models: the ``tiny`` preset.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.config import PipelineConfig, load_pipeline, load_preset
from capfilt.io.filesystem import locate
from capfilt.io.reader import inspect_inputs, passthrough_fields
from capfilt.io.writer import scan_output
from capfilt.stages.base import RunContext, Stage
from capfilt.stages.read import plan_metadata_shards, plan_output_shards, specs_table
from capfilt.stages.registry import build_stages, output_schema, recipe_stages

COCO = Path(__file__).resolve().parents[1] / "fixtures" / "coco" / "images"
RUN_ID = "test-run"


@dataclass
class Recorded:
    """Per stage class: the stage as built (never set up) and the batch it was given."""

    stages: dict[type[Stage], Stage] = field(default_factory=dict)
    inputs: dict[type[Stage], pa.Table] = field(default_factory=dict)
    scorers: list[str] = field(default_factory=list)


def write_input(folder: Path) -> Path:
    """A Parquet input of 5 rows: 3 images, one repeated, one broken URL; ``note`` passes through."""
    images = sorted(COCO.glob("*.jpg"))[:3]
    urls = [p.as_uri() for p in images] + [images[0].as_uri(), "file:///nonexistent/x.jpg"]
    caps = ["a cat on a sofa", "two people", "", "a cat on a sofa again", "broken"]
    path = folder / "in.parquet"
    pq.write_table(pa.table({"url": urls, "caption": caps, "note": [f"n{i}" for i in range(5)]}), path)
    return path


def metadata_config(**overrides) -> PipelineConfig:
    """The ``blip`` recipe on file URLs with dedup on and small captions, plus ``overrides``."""
    return load_pipeline("blip", {"download.allow_file_urls": True, "download.thread_count": 2,
                                  "dedup.enabled": True, "caption.num_captions": 2, "caption.max_length": 10,
                                  "output.rows_per_shard": 5, **overrides})


def run_recorded(cfg: PipelineConfig, ctx: RunContext, specs: pa.Table, rec: Recorded,
                 stages: tuple[type[Stage], ...] | None = None) -> pa.Table:
    """Run the enabled stages of ``cfg`` in order on ``specs``, recording each one's stage and input.

    Each stage runs as a pickled copy (as Ray ships it), so the recorded stage is never set up.
    """
    t = specs
    for stage, _res in build_stages(cfg, ctx, stages):
        rec.stages.setdefault(type(stage), stage)
        rec.inputs.setdefault(type(stage), t)
        live = pickle.loads(pickle.dumps(stage))
        live.setup()
        t = live(t)
    return t


def record_all(tmp: Path) -> Recorded:
    """Run the metadata recipe, then refilter its output, recording every known stage's input."""
    rec = Recorded()
    (tmp / "blocklist.txt").write_text("sha256:" + "0" * 64 + "\n")  # blocks nothing here: the stage still runs
    (tmp / "eval").mkdir()
    (tmp / "eval" / "x.jpg").write_bytes(sorted(COCO.glob("*.jpg"))[10].read_bytes())  # not in the input
    cfg = metadata_config(**{"blocklist.enabled": True, "blocklist.lists": [str(tmp / "blocklist.txt")],
                             "langid.enabled": True, "decontam.enabled": True,
                             "decontam.eval_sets": [str(tmp / "eval")], "safety.enabled": True,
                             "semdedup.enabled": True, "resources.fused": False})  # caption, score recorded apart
    files = inspect_inputs([str(write_input(tmp))], cfg.input)
    rec.scorers = list(cfg.score.scorers)
    out = locate(str(tmp / "out"))
    ctx = RunContext(out.uri, RUN_ID, load_preset("tiny"), files,
                     schema=output_schema(passthrough_fields(files), rec.scorers, RUN_ID))
    specs, _ = plan_metadata_shards(files, cfg.output.rows_per_shard, [])
    run_recorded(cfg, ctx, specs_table(specs), rec)
    # the fused caption+score stage (the default layout) gets what the caption stage got
    from capfilt.stages.caption import CaptionStage
    from capfilt.stages.fused import CaptionScoreStage

    fused_cfg = cfg.model_copy(update={"resources": cfg.resources.model_copy(update={"fused": True})})
    rec.stages.setdefault(CaptionScoreStage, CaptionScoreStage.build(fused_cfg, ctx))
    rec.inputs.setdefault(CaptionScoreStage, rec.inputs[CaptionStage])

    refilter = load_pipeline("refilter")
    parts, _ = scan_output(out)
    old_specs, _, _ = plan_output_shards(out, parts, [])
    out2 = locate(str(tmp / "out2"))
    ctx2 = RunContext(out2.uri, RUN_ID, source_uri=out.uri, schema=output_schema([pa.field("note", pa.string())],
                                                                                  rec.scorers, RUN_ID))
    assert recipe_stages(refilter)[0] not in rec.stages
    run_recorded(refilter, ctx2, specs_table(old_specs), Recorded(rec.stages, rec.inputs))
    return rec
