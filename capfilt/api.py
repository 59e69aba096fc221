"""The Python API behind ``capfilt run``: plan, check, resume, execute, record.

``run(RunOptions(inputs=[...], output=..., pipeline="blip", models="tiny"))`` does what the CLI
does. Everything that can be wrong with the inputs, the recipe, the models or the output folder is
checked before any download starts, and raised as a :class:`capfilt.errors.CapfiltError` with one
readable message. The steps live elsewhere: what is read and planned in :mod:`capfilt.plan`, the
output folder and its run record in :mod:`capfilt.output` and :mod:`capfilt.io.run_record`, the
stages in :mod:`capfilt.stages.registry`, where they run in :mod:`capfilt.runner`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from capfilt.config import ConfigError, ModelPreset, PipelineConfig, load_pipeline, load_preset
from capfilt.errors import CapfiltError, OutputError, one_line, shorten, storage_error
from capfilt.io.filesystem import Location, locate
from capfilt.io.lease import OutputLease
from capfilt.io.run_record import RunRecord, run_record_location, write_run_record
from capfilt.io.writer import committed_keys, scan_output
from capfilt.output import check_not_file, check_overlap, identity, prepare_output, run_id_of, start_record
from capfilt.plan import Source, fingerprints, inspect_source, plan_shards
from capfilt.progress import RunProgress
from capfilt.retry import merge_staged, wanted_set
from capfilt.local_runner import block_processes, run_local
from capfilt.runner import StagePlan, init_ray, prepare_ray, run_ray, stage_counter
from capfilt.stages.base import RunContext
from capfilt.stages.read import specs_table, stream_blocks
from capfilt.stages.registry import (build_stages, filter_models, finish_run, known_stages, model_roles, output_schema,
                                     totals_from_stats)
from capfilt.stages.write import flush_staging, reconcile_parts

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    """One ``capfilt run``: inputs, output, recipe, model preset and where to execute.

    ``overrides`` are applied to the recipe: ``{"section.key": value}`` with typed values (what the
    CLI passes), or ``section.key=value`` strings whose values are parsed as YAML. ``executor`` ``ray``
    runs one streaming Ray Data job (local Ray unless ``ray_address``/``RAY_ADDRESS``); ``local``
    runs the stages in this process, a thread per stage; ``auto``: :func:`choose_executor`. ``progress`` shows Ray's
    progress bars; ``progress_every`` is the seconds between progress lines in the log
    (:mod:`capfilt.progress`; 0: only the last one). ``retry_failed``: after the run, fetch again the
    rows whose failure class or status is listed (``[]``: the transient classes; :mod:`capfilt.retry`).
    """

    inputs: list[str]
    output: str
    pipeline: str = "blip"
    models: str | None = None
    overrides: dict[str, Any] | list[str] = field(default_factory=dict)
    ray_address: str | None = None
    executor: Literal["ray", "local", "auto"] = "auto"
    overwrite: bool = False
    progress: bool = True
    progress_every: float = 30.0
    retry_failed: list[str] | None = None


@dataclass
class RunResult:
    """What a run did: the output, its run record and totals over all committed shards."""

    output: str
    run_id: str
    record: RunRecord
    totals: dict[str, Any]
    wall_seconds: float
    parts_written: int
    parts_skipped: int
    resumed: bool
    export: Any = None  # capfilt.export.job.ExportResult when the recipe's export section asked for one


def resolve(opts: RunOptions) -> tuple[PipelineConfig, ModelPreset | None]:
    """Load the recipe (with overrides) and, when a model stage runs, the model preset.

    Raises:
        ConfigError: unknown recipe/preset, invalid values, unknown keys.
    """
    cfg = load_pipeline(opts.pipeline, opts.overrides)
    if opts.models:  # the recorded recipe names the preset actually used
        cfg = cfg.model_copy(update={"models": opts.models})
    preset = load_preset(opts.models or cfg.models) if model_roles(cfg) else None
    return cfg, preset


def run(opts: RunOptions) -> RunResult:
    """Run a pipeline end to end (or resume it) and return what it did.

    Order: recipe and preset, input files, model weights, output folder, resources: every check
    that can fail does so before a shard is planned or a URL fetched.

    Raises:
        capfilt.errors.CapfiltError: bad inputs, recipe, models, resources or output folder (before any work);
            OutputError after the run if rows are missing (rerun to complete).
    """
    t0 = time.time()
    if opts.executor not in ("ray", "local", "auto"):
        raise ConfigError(f"--executor must be ray, local or auto, not {opts.executor!r}")
    # 1. check everything: recipe, inputs, models, output folder
    cfg, preset = resolve(opts)
    if opts.retry_failed is not None:
        wanted_set(opts.retry_failed)  # an unknown class or status is refused before any work
        if cfg.source != "metadata" or not cfg.download.enabled:
            raise ConfigError("--retry-failed fetches failed rows again, but this recipe downloads nothing (it "
                              "reads an earlier output); run it with the recipe that made the output")
    out = locate(opts.output)
    check_overlap(opts.inputs, out)
    src = inspect_source(cfg, opts.inputs)
    resolved: dict[str, Any] = {}
    if preset is not None:
        from capfilt.modeling.loading import preflight, resolved_commits

        preflight(preset, model_roles(cfg))
        resolved = {"models": resolved_commits(preset, model_roles(cfg))}
        if "filter" in model_roles(cfg) and "itm" in cfg.score.scorers:
            from capfilt.modeling.blip_scorer import resolve_filter_itm_prefix

            resolved["itm_text_prefix"] = resolve_filter_itm_prefix(preset.filter, preset, cfg.score.itm_text_prefix)
    filters = filter_models(cfg)  # each enabled filter's model and version, for run.json
    if filters:
        resolved["filters"] = filters
    ident = identity(cfg, preset, [locate(i).uri for i in opts.inputs], src.files, fingerprints(src))
    check_not_file(out)
    from capfilt.export.after_run import export_after_run, export_destination

    export_destination(cfg.export, out)  # an export after the run: its folder and package checked now
    opts = replace(opts, executor=choose_executor(opts, cfg, sum(f.num_rows for f in src.files)))
    log.info("executor: %s", opts.executor)
    if opts.executor == "ray":  # start (or join) Ray before the output folder is touched
        init_ray(opts.ray_address)
    with OutputLease(out):
        try:
            result = _run_leased(opts, cfg, preset, out, src, ident, t0, resolved)
            if cfg.export.format != "none":
                log.info("exporting %s as %s", out.uri, cfg.export.format)
                result.export = export_after_run(cfg.export, out)
            return result
        except CapfiltError:
            raise
        except Exception as e:  # a full disk, a read-only folder, an object store that says 403
            why = storage_error(e)
            if why is None:
                raise
            raise OutputError(f"cannot write to the output {out.uri}: {why}. Committed shards are kept. Free "
                              f"space or fix the permissions (or choose another --output), then rerun the same "
                              f"command to resume.") from None


def _run_leased(opts: RunOptions, cfg: PipelineConfig, preset: ModelPreset | None, out: Location, src: Source,
                ident: dict, t0: float, resolved: dict[str, Any]) -> RunResult:
    """The part of :func:`run` that touches the output folder, under its lease.

    ``resolved``: what the models resolved to (``models``: commit per role; ``itm_text_prefix``),
    recorded in ``run.json``.
    """
    previous, parts = prepare_output(out, ident, opts.overwrite)
    run_id = run_id_of(previous)
    schema = output_schema(src.passthrough, src.scorers, run_id)
    compression = None if cfg.output.compression == "none" else cfg.output.compression
    flushed = flush_staging(out, schema, run_id, known_stages(), compression)  # blocks staged before a crash
    if reconcile_parts(out, run_id, known_stages()) or flushed:  # stale siblings of an earlier attempt
        parts = scan_output(out)[0]
    if merge_staged(out, run_id_of(previous), known_stages())["parts"]:  # results of an interrupted retry
        parts = scan_output(out)[0]
    resumed = bool(parts)

    # 2. plan what is left and build the stages
    specs, skipped, total_rows = plan_shards(cfg, src, committed_keys(out, parts))
    ctx = RunContext(out.uri, run_id, preset, src.files, src.old.uri if src.old else None,
                     tuple(p.parquet for p in parts), schema)
    plans = [StagePlan(stage, res) for stage, res in build_stages(cfg, ctx)]
    executor = opts.executor  # resolved by run() (choose_executor)
    if executor == "ray":  # refuse impossible resources before anything is written
        prepare_ray(plans, opts.ray_address)

    # 3. record the start, stream the shards, record the end
    record = start_record(out, run_id, ident, cfg, preset, opts.inputs, src.files, total_rows, previous, len(parts))
    if resolved:
        record = record.model_copy(update={"resolved": resolved})
    if previous is not None and previous.retries:
        record = record.model_copy(update={"retries": previous.retries})
    write_run_record(out, record)
    t_exec = time.time()
    # a shard streams through the stages in blocks of block_rows and is committed whole
    table = specs_table(stream_blocks(specs, block_rows(cfg)))
    counter = stage_counter(executor)  # per-stage rows for the progress lines
    try:
        if executor == "ray":
            stream = run_ray(table, plans, opts.ray_address, opts.progress, getattr(counter, "name", None))
        else:
            stream = run_local(table, plans, counter, processes=block_processes(plans, table.num_rows))
        written: dict[str, dict] = {}  # by part name: two blocks finishing a shard at once both commit it
        done_rows = total_rows - sum(s.pending for s in specs)
        with RunProgress(total_rows, done_rows, opts.progress_every, [p.stage.name for p in plans],
                         counter.snapshot) as progress:
            for batch in stream:
                for s in batch.column("stats").to_pylist():
                    st = json.loads(s)
                    if st["name"] not in written:
                        written[st["name"]] = st
                        progress.add(st)
        progress.log_lines()
        flush_staging(out, schema, run_id, known_stages(), compression)  # a shard whose blocks never all arrived
        if opts.retry_failed is not None:
            retried = _retry_failed(opts, cfg, ctx, out, run_id, executor)
            record = record.model_copy(update={"retries": list(record.retries or []) + [retried]})
        exec_seconds = time.time() - t_exec
        reconcile_parts(out, run_id, known_stages())
        parts = scan_output(out)[0]
        keys = committed_keys(out, parts)
        if len(set(keys)) == total_rows:  # every row is in: run-wide steps (semantic dedup)
            for note in finish_run(cfg, ctx):
                log.info("%s", note)
            parts = scan_output(out)[0]
        totals = totals_from_stats([p.stats for p in parts])
    except KeyboardInterrupt:
        _try_record(out, record.interrupted())
        raise
    except Exception as e:
        _try_record(out, record.failed(storage_error(e) or f"{type(e).__name__}: {shorten(one_line(e), 500)}"))
        raise
    finally:
        getattr(counter, "close", lambda: None)()
    wall = time.time() - t0
    record = record.finished(totals, len(written), wall, exec_seconds, len(keys), len(set(keys)))
    write_run_record(out, record)
    if record.status != "complete":
        twice = len(keys) - len(set(keys))
        raise OutputError(f"run finished with {len(set(keys))} of {total_rows} input rows written"
                          + (f" ({twice} written twice)" if twice else "") + "; rerun the same command to complete it")
    return RunResult(out.uri, run_id, record, totals, wall, len(written), skipped, resumed)


def block_rows(cfg: PipelineConfig) -> int:
    """Rows per streaming block of this recipe (:meth:`capfilt.config.OutputConfig.resolved_block_rows`)."""
    models = [s for s in (cfg.caption, cfg.score) if s.enabled]
    return cfg.output.resolved_block_rows(bool(models), max((s.batch_size for s in models), default=1))


def _retry_failed(opts: RunOptions, cfg: PipelineConfig, ctx: RunContext, out: Location, run_id: str,
                  executor: str) -> dict[str, Any]:
    """Fetch the failed rows of ``opts.retry_failed`` again and merge the results into their parts
    (:mod:`capfilt.retry`); returns the run record's ``retries`` entry."""
    from capfilt.retry import RetryReadStage, RetryWriter, pick_rows, retry_entry

    wanted = wanted_set(opts.retry_failed)
    started = time.time()
    specs, before = pick_rows(out, scan_output(out)[0], wanted)
    log.info("retrying %d failed rows (%s) in %d parts", sum(before.values()),
             ", ".join(f"{k} {v}" for k, v in before.most_common()) or "none", specs.num_rows)
    if specs.num_rows:
        built = build_stages(cfg, ctx)
        stats_from = known_stages()
        stages = ([(RetryReadStage(out.uri), built[0][1])] + built[1:-1]
                  + [(RetryWriter(out.uri, ctx.schema, run_id, stats_from), built[-1][1])])
        plans = [StagePlan(stage, res) for stage, res in stages]
        stream = run_ray(specs, plans, opts.ray_address, opts.progress) if executor == "ray" else run_local(specs, plans)
        with RunProgress(sum(before.values()), 0, opts.progress_every) as progress:
            for batch in stream:
                for s in batch.column("stats").to_pylist():
                    progress.add(json.loads(s))
        log.info("retry %s", progress.line())
    entry = retry_entry(wanted, before, merge_staged(out, run_id, known_stages()), started)
    log.info("retry: %d of %d rows succeeded, %d parts rewritten", entry["succeeded"], entry["rows"],
             entry["parts_rewritten"])
    return entry


#: ``--executor auto`` runs an input of at most this many rows in this process
#: (:mod:`capfilt.local_runner`) when no Ray cluster is named: starting Ray, a worker per pool and
#: its model costs 25-40 s on a 2-core laptop, more than such a run's work (benchmarks/RESULTS.md).
LOCAL_MAX_ROWS = 1000


def choose_executor(opts: RunOptions, cfg: PipelineConfig, input_rows: int) -> str:
    """``ray`` or ``local`` for ``opts.executor`` (``auto`` resolved).

    ``auto``: ``local`` for refilter (no model, no download); ``ray`` when a cluster is named
    (``--ray-address`` or ``RAY_ADDRESS``, e.g. under ``ray job submit``); else ``local`` for an
    input of at most :data:`LOCAL_MAX_ROWS` rows or a recipe without model stages (``download``:
    the local executor spreads the download over one process per core, which Ray's own processes
    only slow down on one machine; benchmarks/RESULTS.md), and ``ray`` for a larger model run.
    """
    if opts.executor != "auto":
        return opts.executor
    if cfg.source == "output":
        return "local"
    if opts.ray_address or os.environ.get("RAY_ADDRESS"):
        return "ray"
    return "local" if input_rows <= LOCAL_MAX_ROWS or not model_roles(cfg) else "ray"


def _try_record(out: Location, record: RunRecord) -> None:
    """Write the run record, but never let a failing write (a full disk) hide the error being raised.

    When the atomic write fails (no room for a temporary copy), the record is overwritten in place:
    truncating it frees the space the new one needs.
    """
    try:
        write_run_record(out, record)
    except OSError:
        try:
            with out.fs.open_output_stream(run_record_location(out).path) as f:
                f.write(json.dumps(record.to_json(), indent=2, default=str).encode())
        except OSError as e:
            log.warning("could not update the run record of %s: %s", out.uri, e)
