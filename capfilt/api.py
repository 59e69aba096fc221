"""The Python API behind ``capfilt run``: plan, check, resume, execute, record.

``run(RunOptions(inputs=[...], output=..., pipeline="blip", models="tiny"))`` does what the CLI
does. Everything that can be wrong with the inputs, the recipe, the models or the output folder is
checked before any download starts, and raised as a :class:`capfilt.errors.CapfiltError` with one
readable message.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from capfilt import __version__
from capfilt.config import ModelPreset, PipelineConfig, Scorer, load_pipeline, load_preset
from capfilt.config import ConfigError
from capfilt.errors import OutputError
from capfilt.io.filesystem import Location, locate
from capfilt.io.reader import InputFile, inspect_inputs, passthrough_fields
from capfilt.io.writer import META_DIR, STATS_DIR, committed_keys, is_capfilt_file, scan_output, write_json
from capfilt.runner import StagePlan, prepare_ray, run_local, run_ray
from capfilt.stages.base import RunContext
from capfilt.stages.read import ShardSpec, plan_metadata_shards, plan_output_shards, specs_table
from capfilt.stages.registry import build_stages, model_roles, output_schema, totals_from_stats

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    """One ``capfilt run``: inputs, output, recipe, model preset and where to execute.

    ``overrides`` are applied to the recipe: ``{"section.key": value}`` with typed values (what the
    CLI passes), or ``section.key=value`` strings whose values are parsed as YAML. ``executor`` ``ray``
    runs one streaming Ray Data job (local Ray unless ``ray_address``/``RAY_ADDRESS``); ``local``
    runs the stages in this process (model-free recipes, debugging).
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


@dataclass
class RunResult:
    """What a run did: the output, its run record and totals over all committed shards."""

    output: str
    run_id: str
    record: dict[str, Any]
    totals: dict[str, Any]
    wall_seconds: float
    parts_written: int
    parts_skipped: int
    resumed: bool


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"capfilt": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "ray", "pyarrow", "img2dataset", "pillow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _check_overlap(inputs: list[str], out: Location) -> None:
    if not out.is_local:  # object store: compare bucket/key prefixes
        o = out.uri.rstrip("/")
        for i in inputs:
            i = i.rstrip("/")
            if i == o:
                raise OutputError(f"output {out.uri} is also an input; choose another --output")
            if i.startswith(o + "/") or o.startswith(i + "/"):
                raise OutputError(f"output {out.uri} overlaps input {i}: shards would be read back as input. "
                                  f"Choose an --output outside the input prefix.")
        return
    outp = os.path.realpath(out.path)
    for i in inputs:
        if "://" in i:
            continue
        ip = os.path.realpath(i)
        if ip == outp or ip.startswith(outp + os.sep) or outp.startswith(ip + os.sep):
            raise OutputError(f"output {out.uri} overlaps input {i}: shards would be read back as input. "
                              f"Choose an --output outside the input folder.")


def _read_json(loc: Location) -> dict | None:
    if not loc.exists():
        return None
    with loc.fs.open_input_stream(loc.path) as f:
        try:
            return json.loads(f.read())
        except ValueError:
            return None


def _wipe(out: Location) -> None:
    """Delete what capfilt wrote in ``out`` (shard parts, ``_stats/``, ``_capfilt/``), nothing else."""
    for info in out.fs.get_file_info(pafs.FileSelector(out.path, recursive=False)):
        name = info.path.rsplit("/", 1)[-1]
        if info.type == pafs.FileType.Directory and name in (STATS_DIR, META_DIR):
            out.fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File and is_capfilt_file(name):
            out.fs.delete_file(info.path)


def _foreign_entries(out: Location) -> list[str]:
    """Names at the top of ``out`` that capfilt did not write."""
    if not out.exists():
        return []
    names = [i.path.rsplit("/", 1)[-1] for i in out.fs.get_file_info(pafs.FileSelector(out.path, recursive=False))]
    return sorted(n for n in names if n not in (STATS_DIR, META_DIR) and not is_capfilt_file(n))


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, list) and isinstance(new, list) and old != new:
        added = [x for x in new if x not in old]
        removed = [x for x in old if x not in new]
        return [f"{prefix.rstrip('.')}: " + "; ".join(
            part for part in (f"added {added}" if added else "", f"removed {removed}" if removed else "",
                              "reordered" if not added and not removed else "") if part)]
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _identity(cfg: PipelineConfig, preset: ModelPreset | None, inputs: list[str], files: list[InputFile]) -> dict:
    """What must not change between a run and its resume: recipe, models, inputs and their files.

    Keys are positions in the sorted file list, so a file added to an input folder (or one that
    grew) would shift them: the file list with row counts is part of the identity.
    """
    return {"recipe": cfg.fingerprint(),
            "models": preset.model_dump(mode="json", exclude={"description"}) if preset else None,
            "inputs": inputs, "files": [f"{f.uri} ({f.num_rows} rows)" for f in files]}


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


@dataclass
class _Source:
    """What the run reads: metadata files, or (refilter) the committed parts of an old output."""

    files: list[InputFile]
    scorers: list[str]
    passthrough: list[pa.Field]
    old: Location | None = None
    old_parts: list = field(default_factory=list)


def _inspect_source(cfg: PipelineConfig, inputs: list[str]) -> _Source:
    """Check the inputs up front and decide the output's pass-through columns and scorers.

    Raises:
        InputError / OutputError / ConfigError: unreadable input, no shards, a score never computed.
    """
    if cfg.source == "metadata":
        files = inspect_inputs(inputs, cfg.input)
        return _Source(files, cfg.score.scorers if cfg.score.enabled else [], passthrough_fields(files))
    if len(inputs) != 1:
        raise ConfigError("the refilter recipe reads exactly one capfilt output: --input OLD_OUT")
    src = locate(inputs[0])
    if not src.is_dir():
        raise OutputError(f"the refilter recipe reads an earlier capfilt output folder, but {src.uri} is not a "
                          f"folder; give --input the --output of an earlier `capfilt run`")
    old_parts, _ = scan_output(src)
    if not old_parts:
        raise OutputError(f"{src.uri} holds no committed capfilt shards (NAME.parquet + _stats/NAME.stats.json)")
    with src.fs.open_input_file(old_parts[0].parquet) as fh:
        old_schema = pq.read_schema(fh)
    scorers = [s for s in get_args(Scorer) if f"web_{s}" in old_schema.names]
    missing = sorted(cfg.select.scorers_needed() - set(scorers))
    if missing:
        raise ConfigError(f"{src.uri} has no stored {', '.join(missing)} scores (it has: "
                          f"{', '.join(scorers) or 'none'}); the old run never computed them. Rerun "
                          f"`capfilt run` with score.scorers including {missing}, or select on what exists.")
    contract = {f.name for f in output_schema([], scorers)}
    return _Source([], scorers, [f for f in old_schema if f.name not in contract], src, old_parts)


def _prepare_output(out: Location, ident: dict, overwrite: bool) -> tuple[dict | None, list]:
    """Refuse, wipe or resume an existing output; delete uncommitted leftovers.

    Returns:
        ``(previous run.json or None, committed parts)``.

    Raises:
        OutputError: the folder holds a run with other settings (and not ``overwrite``).
    """
    info = out.fs.get_file_info(out.path)
    if info.type == pafs.FileType.File:
        raise OutputError(f"output {out.uri} is a file; --output must be a folder (new, empty, or an earlier "
                          f"capfilt output)")
    previous = _read_json(out.join(META_DIR, "run.json"))
    foreign = _foreign_entries(out) if info.type == pafs.FileType.Directory else []
    if previous is None and foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(f"output folder {out.uri} already holds files that capfilt did not write ({shown}); "
                          f"choose a new or empty --output folder (capfilt never deletes other files)")
    if previous is not None and not overwrite:
        changes = _diff(previous.get("identity"), ident)
        if changes:
            shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
            raise OutputError(f"{out.uri} holds a run with different settings ({shown}). Use --overwrite to "
                              f"delete it and start again, or choose another --output.")
    elif previous is None and out.exists() and not overwrite:
        if scan_output(out)[0]:
            raise OutputError(f"{out.uri} holds shards but no {META_DIR}/run.json; use --overwrite or another --output")
    if overwrite and out.exists():
        _wipe(out)
        previous = None
    out.fs.create_dir(out.path, recursive=True)
    parts, leftovers = scan_output(out)
    for path in leftovers:
        out.fs.delete_file(path)
    return previous, parts


def _plan_shards(cfg: PipelineConfig, src: _Source, done_keys: list[str]) -> tuple[list[ShardSpec], int, int]:
    """Shard specs still to do, shards already done, and total input rows."""
    if cfg.source == "metadata":
        specs, skipped = plan_metadata_shards(src.files, cfg.output.rows_per_shard, done_keys)
        return specs, skipped, sum(f.num_rows for f in src.files)
    return plan_output_shards(src.old, src.old_parts, done_keys)


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
    cfg, preset = resolve(opts)
    out = locate(opts.output)
    _check_overlap(opts.inputs, out)
    src = _inspect_source(cfg, opts.inputs)
    if preset is not None:
        from capfilt.modeling.loading import preflight

        preflight(preset, model_roles(cfg))

    ident = _identity(cfg, preset, [locate(i).uri for i in opts.inputs], src.files)
    previous, parts = _prepare_output(out, ident, opts.overwrite)
    done_keys = committed_keys(out, parts)
    run_id = previous.get("run_id") if previous else uuid.uuid4().hex[:12]
    schema = output_schema(src.passthrough, src.scorers, run_id)
    specs, skipped, total_rows = _plan_shards(cfg, src, done_keys)
    ctx = RunContext(out.uri, run_id, preset, src.files, src.old.uri if src.old else None,
                     tuple(p.parquet for p in parts), schema)
    plans = [StagePlan(stage, res) for stage, res in build_stages(cfg, ctx)]

    executor = opts.executor
    if executor == "auto":
        executor = "local" if cfg.source == "output" else "ray"
    if executor == "ray":  # refuse impossible resources before anything is written
        prepare_ray(plans, opts.ray_address)

    run_json = out.join(META_DIR, "run.json")
    record = {
        "run_id": run_id, "status": "running", "capfilt_version": __version__,
        "command": " ".join(sys.argv) if sys.argv and "capfilt" in sys.argv[0] else None,
        "identity": ident, "config": cfg.model_dump(mode="json"),
        "models": preset.model_dump(mode="json") if preset else None,
        "inputs": [{"uri": f.uri, "format": f.format, "rows": f.num_rows, "url_col": f.url_col,
                    "caption_col": f.caption_col} for f in src.files] or [{"uri": u} for u in opts.inputs],
        "input_rows": total_rows, "output": out.uri, "versions": _versions(),
        "attempts": (previous or {}).get("attempts", []) + [{"started": time.time(), "resumed": bool(parts),
                                                            "parts_already_done": len(parts)}],
    }
    write_json(run_json, record)

    t_exec = time.time()
    table = specs_table(specs)
    stream = run_ray(table, plans, opts.ray_address, opts.progress) if executor == "ray" else run_local(table, plans)
    try:
        written = [json.loads(s) for batch in stream for s in batch.column("stats").to_pylist()]
    except KeyboardInterrupt:
        record["status"] = "interrupted"
        record["attempts"][-1].update({"finished": time.time(), "interrupted": True})
        write_json(run_json, record)
        raise
    exec_seconds = time.time() - t_exec

    parts_now, _ = scan_output(out)
    totals = totals_from_stats([p.stats for p in parts_now])
    wall = time.time() - t0
    record["attempts"][-1].update({"finished": time.time(), "parts_written": len(written),
                                   "wall_seconds": wall, "execute_seconds": exec_seconds})
    complete = totals["rows"] == total_rows
    record.update({"status": "complete" if complete else "incomplete", "totals": totals,
                   "timings": {"wall_seconds": sum(a.get("wall_seconds", 0) for a in record["attempts"]),
                               "last_attempt_seconds": wall,
                               "stage_seconds": {k: v["seconds"] for k, v in totals["throughput"].items()}},
                   "stages": totals["throughput"]})
    write_json(run_json, record)
    if not complete:
        raise OutputError(f"run finished with {totals['rows']} of {total_rows} rows written; rerun the same command "
                          f"to complete it")
    return RunResult(out.uri, run_id, record, totals, wall, len(written), skipped, bool(parts))
