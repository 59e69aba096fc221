"""Where things are in a capfilt output: committed shards and the run record (``_capfilt/run.json``).

The layout is the output contract of DESIGN.md: Parquet shards anywhere under ``OUT`` except in
``_``- or ``.``-prefixed folders; a shard is complete once its sibling ``<name>.stats.json`` exists
(the writer writes it last, :mod:`capfilt.io.writer`); ``OUT/_capfilt/run.json`` holds the resolved
config, models, versions, timings, totals and per-stage throughput, and may be partial or missing
when a run was interrupted. Everything here reads defensively and reports problems as sentences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from capfilt.errors import OutputError
from capfilt.io import run_record
from capfilt.io.filesystem import Location
from capfilt.io.writer import list_shards

#: Keys ``run.json`` is expected to hold (DESIGN.md "The output contract").
RUN_KEYS = ("config", "models", "versions", "timings", "totals", "stages")


@dataclass(frozen=True)
class ShardFile:
    """One Parquet shard: ``name`` relative to ``OUT``, filesystem ``path``, ``size`` in bytes."""

    name: str
    path: str
    size: int
    complete: bool


def find_shards(out: Location) -> list[ShardFile]:
    """List ``*.parquet`` files under ``out`` (recursively), skipping ``_``/``.``-prefixed parts
    (:func:`capfilt.io.writer.list_shards`, the one output scanner).

    A shard is ``complete`` when its stats file exists (the writer writes it last).

    Returns:
        Shards sorted by name.

    Raises:
        OutputError: if ``out`` is not a folder.
    """
    info = out.fs.get_file_info(out.path)
    if info.type != pafs.FileType.Directory:
        raise OutputError(f"{out.uri} is not a capfilt output folder (it does not exist or is a file); "
                          f"give the --output folder of a `capfilt run`")
    shards, _ = list_shards(out, recursive=True)
    return [ShardFile(s.name, s.path, s.size, s.stats_path is not None) for s in shards]


def read_run_record(out: Location) -> tuple[dict[str, Any] | None, list[str]]:
    """Read ``OUT/_capfilt/run.json`` defensively (:func:`capfilt.io.run_record.read_run_record`).

    Returns:
        ``(record as its JSON object or None, problems)``: problems are readable sentences (file
        missing, not JSON, expected keys missing); the report shows them instead of failing.
    """
    rec, problems = run_record.read_run_record(out)
    if rec is None:
        return None, problems
    record = rec.to_json()
    missing = missing_keys(record)
    if missing:
        problems.append(f"run record lacks {', '.join(missing)} (the run may have been interrupted "
                        f"before it finished)")
    return record, problems


def model_names(record: dict[str, Any] | None) -> dict[str, str]:
    """Model ids by role (``captioner``, ``filter``, ``clip``) from a run record, where present."""
    if not record:
        return {}
    models = record.get("models")
    out: dict[str, str] = {}
    if isinstance(models, dict):
        for role, spec in models.items():
            if isinstance(spec, dict) and spec.get("id"):
                rev = spec.get("revision")
                out[role] = f"{spec['id']}@{rev}" if rev else str(spec["id"])
            elif isinstance(spec, str) and role not in ("name", "description", "builder"):
                out[role] = spec
    return out


def uses_tiny_models(record: dict[str, Any] | None) -> bool:
    """True when the run used the untrained ``tiny`` preset (random weights: captions are noise).

    Looks at ``models.name`` / ``models.builder`` and ``config.models`` of the run record.
    """
    if not record:
        return False
    models = record.get("models")
    config = record.get("config")
    hits = []
    if isinstance(models, dict):
        hits += [models.get("name"), models.get("builder"), models.get("preset")]
    elif isinstance(models, str):
        hits.append(models)
    if isinstance(config, dict):
        hits.append(config.get("models"))
    return any(isinstance(h, str) and (h == "tiny" or h.endswith("/tiny.yaml")) for h in hits)


def preset_name(record: dict[str, Any] | None) -> str | None:
    """The model preset the run used: ``models.name`` (what was loaded), else the recipe's ``config.models``."""
    models = (record or {}).get("models")
    if isinstance(models, dict) and isinstance(models.get("name"), str):
        return models["name"]
    if record and "models" in record and not uses_models(record):
        return None  # a model-free recipe (download, refilter) loaded no preset
    default = config_get(record, "models")
    return default if isinstance(default, str) else None


def config_get(record: dict[str, Any] | None, *path: str) -> Any:
    """``record["config"][path[0]][path[1]]...`` or None where any level is missing."""
    node: Any = (record or {}).get("config")
    for p in path:
        if not isinstance(node, dict):
            return None
        node = node.get(p)
    return node


def uses_models(record: dict[str, Any] | None) -> bool:
    """True unless the run record's recipe disabled both model stages (``download``, ``refilter``)."""
    cfg = (record or {}).get("config") or {}
    if cfg.get("source") == "output":
        return False
    return bool((cfg.get("caption") or {}).get("enabled", True) or (cfg.get("score") or {}).get("enabled", True))


def missing_keys(record: dict[str, Any] | None) -> list[str]:
    """run.json sections that are absent or empty (``models: null`` of a model-free recipe is not missing)."""
    rec = record or {}
    return [k for k in RUN_KEYS
            if not rec.get(k) and not (k == "models" and "models" in rec and not uses_models(rec))]


def run_section(record: dict[str, Any] | None) -> dict[str, Any]:
    """The ``run`` part of the report: run.json's sections echoed, plus what is missing and the model ids."""
    rec = record or {}
    return {
        "present": record is not None,
        "missing_keys": missing_keys(record),
        "tiny_models": uses_tiny_models(record),
        "preset": preset_name(record),
        "model_ids": model_names(record),
        **{k: rec.get(k) for k in RUN_KEYS},
        "run_id": rec.get("run_id"),
        "status": rec.get("status"),
        "input_rows": rec.get("input_rows"),
        "command": rec.get("command"),
        "attempts": len(rec["attempts"]) if isinstance(rec.get("attempts"), list) else None,
    }


def wall_seconds(record: dict[str, Any] | None) -> float | None:
    """Total wall seconds of the run (``timings.wall_seconds``, or another ``timings`` key with
    ``wall`` in its name), or None when the run record has none."""
    timings = (record or {}).get("timings")
    if not isinstance(timings, dict):
        return None
    keys = ["wall_seconds"] + sorted(k for k in timings if "wall" in k and k != "wall_seconds")
    for k in keys:
        v = timings.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None
