"""The ordered list of stages of each recipe, and what follows from the stages' declarations.

A recipe with ``source: metadata`` runs :data:`METADATA_STAGES` (each one whose section is
enabled), ``source: output`` (refilter) runs :data:`OUTPUT_STAGES`. Everything that depends on
which stages exist is derived here from the stages' own declarations (:class:`Stage`): the model
roles to check before a run, the output schema, per-shard statistics, run totals and throughput,
and each stage's resources. A new stage is a new module plus one entry in a list.

The output contract is the same for every recipe (a download-only run still has
``synthetic_captions``, all null), so schema, statistics and totals are built from every known
stage, enabled or not: :func:`known_stages`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

from capfilt.config import PipelineConfig, StageResources
from capfilt.schema import SCHEMA_VERSION, SUCCESS
from capfilt.stages.base import RunContext, Stage
from capfilt.stages.caption import CaptionStage
from capfilt.stages.blocklist import BlocklistStage
from capfilt.stages.decontam import DecontamStage
from capfilt.stages.dedup import DedupStage
from capfilt.stages.download import DownloadStage
from capfilt.stages.fused import CaptionScoreStage
from capfilt.stages.langid import LangIdStage
from capfilt.stages.read import ReadOutputStage, ReadStage
from capfilt.stages.safety import SafetyStage
from capfilt.stages.score import ScoreStage
from capfilt.stages.select import SelectStage
from capfilt.stages.semdedup import SemDedupStage
from capfilt.stages.write import ShardWriter

#: ``source: metadata``: read -> download -> blocklist -> langid -> decontam -> safety -> dedup -> caption
#: -> score -> select -> semdedup -> write (optional stages run only when their section is enabled; with
#: ``resources.fused`` one caption_score actor replaces caption and score).
METADATA_STAGES: tuple[type[Stage], ...] = (ReadStage, DownloadStage, BlocklistStage, LangIdStage, DecontamStage,
                                            SafetyStage, DedupStage, CaptionStage, ScoreStage, CaptionScoreStage,
                                            SelectStage, SemDedupStage, ShardWriter)
#: ``source: output`` (refilter): read the old shards -> select -> semdedup -> write.
OUTPUT_STAGES: tuple[type[Stage], ...] = (ReadOutputStage, SelectStage, SemDedupStage, ShardWriter)


def recipe_stages(cfg: PipelineConfig) -> tuple[type[Stage], ...]:
    """The stage classes of ``cfg``'s source, in order (enabled or not)."""
    return METADATA_STAGES if cfg.source == "metadata" else OUTPUT_STAGES


def known_stages(extra: Iterable[type[Stage]] = ()) -> tuple[type[Stage], ...]:
    """Every stage class of every recipe, plus ``extra``, in pipeline order, each once."""
    return tuple(dict.fromkeys((*METADATA_STAGES, *OUTPUT_STAGES, *extra)))


def enabled_stages(cfg: PipelineConfig, stages: Sequence[type[Stage]] | None = None) -> list[type[Stage]]:
    """The stage classes ``cfg`` runs (default: :func:`recipe_stages`), in order."""
    return [s for s in (recipe_stages(cfg) if stages is None else stages) if s.enabled(cfg)]


def model_roles(cfg: PipelineConfig, stages: Sequence[type[Stage]] | None = None) -> set[str]:
    """Model preset roles the enabled stages of ``cfg`` load (empty: the run needs no preset)."""
    return {r for s in enabled_stages(cfg, stages) for r in s.model_roles(cfg)}


def output_schema(passthrough: pa.Schema | Sequence[pa.Field] = (), scorers: Iterable[str] = ("itm", "itc"),
                  run_id: str | None = None, extra: Iterable[type[Stage]] = ()) -> pa.Schema:
    """The schema every shard of a run is cast to: each known stage's output fields, in order.

    Args:
        passthrough: input columns passed through under their own names, in input order, placed
            after the read stage's identity columns. Their names must not collide with contract
            columns (the reader renames or drops those).
        scorers: scorers whose columns exist in this run (``itm``, ``itc``, ``clip``); a run
            always has the same columns in every shard, also in shards whose rows all failed.
        run_id: stored in the Parquet key-value metadata with the schema version.
        extra: stage classes beyond the built-in ones (see :func:`known_stages`).

    Returns:
        An Arrow schema with metadata ``capfilt.schema_version`` (and ``capfilt.run_id``).
    """
    scorers = list(scorers)
    stages = known_stages(extra)
    head = [f for s in stages if s.shape == "fanout" for f in s.output_fields(scorers)]
    rest = [f for s in stages if s.shape != "fanout" for f in s.output_fields(scorers)]
    fields = list({f.name: f for f in head}.values()) + list(passthrough) + rest
    meta = {"capfilt.schema_version": SCHEMA_VERSION}
    if run_id:
        meta["capfilt.run_id"] = run_id
    return pa.schema(fields, metadata=meta)


def build_stages(cfg: PipelineConfig, ctx: RunContext, stages: Sequence[type[Stage]] | None = None
                 ) -> list[tuple[Stage, StageResources]]:
    """The enabled stages of ``cfg``, built for this run, each with its recipe resources.

    ``ctx.stats_from`` defaults to :func:`known_stages` (with ``stages``), so every part's
    statistics have the same keys whatever the recipe.
    """
    if not ctx.stats_from:
        from dataclasses import replace

        ctx = replace(ctx, stats_from=known_stages(stages or ()))
    return [(s.build(cfg, ctx), s.resources(cfg)) for s in enabled_stages(cfg, stages)]


def filter_models(cfg: PipelineConfig, stages: Sequence[type[Stage]] | None = None) -> dict[str, dict[str, Any]]:
    """``{stage name: its model_info}`` of the enabled stages that report one (``run.json`` ``resolved.filters``)."""
    return {s.name: info for s in enabled_stages(cfg, stages) if (info := s.model_info(cfg)) is not None}


def finish_run(cfg: PipelineConfig, ctx: RunContext, stages: Sequence[type[Stage]] | None = None) -> list[str]:
    """Run each enabled stage's run-wide :meth:`Stage.finish` step, in order; their notes.

    Called once every input row is committed (and again by a resumed run: the steps are idempotent).
    """
    return [note for s in enabled_stages(cfg, stages) for note in s.finish(cfg, ctx)]


def totals_from_stats(stats: list[dict], extra: Iterable[type[Stage]] = ()) -> dict[str, Any]:
    """Sum per-part stats into run totals, with per-stage throughput.

    ``rows``, ``status`` and ``success`` are the sink's; every other counter is the sum of a
    :meth:`Stage.stats` key over the parts (``{str: int}`` counters summed per key). Throughput is
    per worker-second of a stage (:meth:`Stage.throughput`, e.g. ``images_per_s`` for caption):
    summed stage seconds are busy time across all workers.
    """
    stages = known_stages(extra)
    status, seconds = Counter(), Counter()
    for s in stats:
        status.update(s.get("status", {}))
        seconds.update(s.get("seconds", {}))
    totals: dict[str, Any] = {"rows": sum(s.get("rows", 0) for s in stats), "status": dict(sorted(status.items())),
                              "success": status.get(SUCCESS, 0)}
    for stage in stages:
        for key, zero in stage.stats(pa.table({})).items():
            if isinstance(zero, dict):
                acc: Counter = Counter()
                for s in stats:
                    acc.update(s.get(key, {}))
                totals[key] = dict(acc)
            else:
                totals[key] = sum(s.get(key, 0) for s in stats)
    totals["parts"] = len(stats)
    throughput = {}
    for stage in stages:
        if seconds.get(stage.name):
            tp = stage.throughput(totals, seconds[stage.name])
            if tp:
                throughput[stage.name] = tp
    totals["throughput"] = throughput
    return totals
