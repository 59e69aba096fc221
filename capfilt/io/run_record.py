"""The run record, ``OUT/_capfilt/run.json``: one typed model, one reader, one writer.

``capfilt run`` writes it when a run starts (``status: running``), when it is interrupted and when
it ends (``complete`` / ``incomplete``, with totals, timings and per-stage throughput); the report,
``inspect`` and the bootstrap experiment read it back with :func:`read_run_record`. The JSON keys
are the fields of :class:`RunRecord`, in that order; a field is written only once it was set, so a
record written while running has no ``totals``, ``timings`` or ``stages``. Keys this version does
not know (a record of another capfilt version) are kept as they are.
"""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from capfilt.io.filesystem import Location
from capfilt.io.writer import META_DIR, write_json

#: The run record's file name inside ``OUT/_capfilt/``.
RUN_JSON = "run.json"


class Attempt(BaseModel):
    """One ``capfilt run`` of an output folder (a resume is another attempt).

    Attributes:
        started / finished: Unix time, seconds.
        resumed: committed shards were already there; ``parts_already_done`` counts them.
        interrupted: stopped by Ctrl-C (``KeyboardInterrupt``) or SIGTERM.
        error: why the attempt failed (one paragraph), when it did.
        parts_written: shard parts this attempt committed.
        wall_seconds: the attempt's wall time; ``execute_seconds`` the part spent streaming shards.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    started: float | None = None
    resumed: bool | None = None
    parts_already_done: int | None = None
    finished: float | None = None
    interrupted: bool | None = None
    error: str | None = None
    parts_written: int | None = None
    wall_seconds: float | None = None
    execute_seconds: float | None = None


class RunRecord(BaseModel):
    """What ``OUT/_capfilt/run.json`` holds. Every field is optional: a record may be partial.

    Attributes:
        run_id: 12 hex digits, kept across resumes (it is also in the shards' schema metadata).
        status: ``running``, ``interrupted``, ``failed``, ``complete`` or ``incomplete``.
        command: the ``capfilt`` command line, or None when run from Python.
        identity: what must not change between a run and its resume (recipe fingerprint, models,
            inputs and their files); compared by :func:`capfilt.output.prepare_output`.
        config: the resolved recipe (``PipelineConfig`` as JSON).
        models: the model preset as JSON, or None for a model-free recipe.
        inputs: one entry per input file (``uri``, ``format``, ``rows``, ``url_col``, ``caption_col``).
        input_rows: rows over all inputs; the run is complete when ``totals.rows`` equals it.
        output: the output folder URI.
        versions: ``{package: version}`` of capfilt, Python and the main dependencies.
        attempts: one :class:`Attempt` per run of this folder, oldest first.
        retries: one entry per ``--retry-failed`` pass, oldest first (:func:`capfilt.retry.retry_entry`:
            rows retried, ``before`` by class, ``after`` by outcome, parts rewritten).
        totals: counters summed over the committed shards' stats (set at the end).
        timings: ``wall_seconds`` (all attempts), ``last_attempt_seconds``, ``stage_seconds``.
        stages: per-stage throughput (``rows``, ``seconds``, ``rows_per_s``...).
        resolved: what the preset's models resolved to on this machine: ``models`` (per role: id,
            revision, ``source`` hub|local, the Hub ``commit`` of the cached snapshot or the local
            ``path``) and ``itm_text_prefix`` (the ITM text token the filter is fed).
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    run_id: str | None = None
    status: str | None = None
    capfilt_version: str | None = None
    command: str | None = None
    identity: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    models: Any = None
    inputs: list[dict[str, Any]] | None = None
    input_rows: int | None = None
    output: str | None = None
    versions: dict[str, Any] | None = None
    attempts: list[Attempt] | None = None
    retries: list[dict[str, Any]] | None = None
    totals: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    stages: dict[str, Any] | None = None
    resolved: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as written to ``run.json``: the fields that were set, then unknown keys."""
        return self.model_dump(mode="json", exclude_unset=True)

    def started(self, resumed_parts: int, previous: RunRecord | None) -> RunRecord:
        """This record with one more :class:`Attempt` (after ``previous``'s attempts), ``running``."""
        attempt = Attempt(started=time.time(), resumed=bool(resumed_parts), parts_already_done=resumed_parts)
        return self.model_copy(update={"status": "running",
                                       "attempts": list((previous and previous.attempts) or []) + [attempt]})

    def _last(self, **changes: Any) -> list[Attempt]:
        attempts = list(self.attempts or [Attempt()])
        last = attempts[-1]
        attempts[-1] = Attempt.model_validate({**last.model_dump(exclude_unset=True), "finished": time.time(),
                                               **changes})
        return attempts

    def interrupted(self) -> RunRecord:
        """This record after Ctrl-C: ``status: interrupted``, the last attempt finished and marked."""
        return self.model_copy(update={"status": "interrupted", "attempts": self._last(interrupted=True)})

    def failed(self, error: str) -> RunRecord:
        """This record after an error ended the attempt: ``status: failed``, the error recorded."""
        return self.model_copy(update={"status": "failed", "attempts": self._last(error=error)})

    def finished(self, totals: dict[str, Any], parts_written: int, wall: float, execute: float,
                 keys: int | None = None, unique_keys: int | None = None) -> RunRecord:
        """This record at the end of an attempt.

        Args:
            totals: counters over every committed shard (``rows``, ``throughput``, ...).
            parts_written: parts this attempt committed.
            wall: this attempt's wall time, seconds; ``execute``: its streaming part, seconds.
            keys / unique_keys: rows in the committed parts, and distinct ``key`` values among them
                (``None``: not counted; then only ``totals.rows`` decides).

        Returns:
            The record with ``status`` ``complete`` (every input row once: ``unique_keys == keys ==
            totals.rows == input_rows``) or ``incomplete``, ``totals``, ``timings`` (wall seconds
            summed over attempts) and ``stages``.
        """
        attempts = self._last(parts_written=parts_written, wall_seconds=wall, execute_seconds=execute)
        complete = totals["rows"] == self.input_rows and all(
            n is None or n == self.input_rows for n in (keys, unique_keys))
        timings = {"wall_seconds": sum(a.wall_seconds or 0 for a in attempts), "last_attempt_seconds": wall,
                   "stage_seconds": {k: v["seconds"] for k, v in totals["throughput"].items()}}
        return self.model_copy(update={"attempts": attempts, "status": "complete" if complete else "incomplete",
                                       "totals": totals, "timings": timings, "stages": totals["throughput"]})


def run_record_location(out: Location) -> Location:
    """Where the run record of the output folder ``out`` is: ``OUT/_capfilt/run.json``."""
    return out.join(META_DIR, RUN_JSON)


def write_run_record(out: Location, record: RunRecord) -> None:
    """Write ``record`` to ``OUT/_capfilt/run.json`` atomically (:func:`capfilt.io.writer.write_json`)."""
    write_json(run_record_location(out), record.to_json())


def read_run_record(out: Location) -> tuple[RunRecord | None, list[str]]:
    """Read ``OUT/_capfilt/run.json`` defensively.

    Returns:
        ``(record or None, problems)``: problems are readable sentences (file missing, not JSON,
        not a run record); callers show them instead of failing.
    """
    loc = run_record_location(out)
    if not loc.exists():
        return None, [f"run record {loc.uri} is missing: the run may have been interrupted before it "
                      f"was written (config, models, timings and throughput are unknown)"]
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, [f"run record {loc.uri} cannot be read ({e}); config, models and timings are unknown"]
    if not isinstance(data, dict):
        return None, [f"run record {loc.uri} is not a JSON object; config, models and timings are unknown"]
    try:
        return RunRecord.model_validate(data), []
    except ValidationError as e:
        where = ", ".join(".".join(str(x) for x in err["loc"]) for err in e.errors()[:5])
        return None, [f"run record {loc.uri} is not a capfilt run record (unexpected values in {where}); "
                      f"config, models and timings are unknown"]
