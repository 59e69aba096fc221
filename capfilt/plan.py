"""What a run reads and which of its shards are still to do.

A ``metadata`` recipe reads input files (:mod:`capfilt.io.reader`); the ``refilter`` recipe reads
the committed shards of an earlier output, whose stored scores decide which scorers select may
use. Shards are cut by :mod:`capfilt.stages.read`, skipping the keys already committed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import get_args

import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.config import ConfigError, PipelineConfig, Scorer
from capfilt.errors import OutputError
from capfilt.io.filesystem import Location, locate
from capfilt.io.reader import InputFile, inspect_inputs, passthrough_fields
from capfilt.io.writer import CommittedPart, scan_output
from capfilt.stages.read import ShardSpec, plan_metadata_shards, plan_output_shards
from capfilt.stages.registry import output_schema


@dataclass
class Source:
    """What the run reads: metadata files, or (refilter) the committed parts of an old output.

    Attributes:
        files: the metadata input files (empty for refilter).
        scorers: scorers whose columns the output has (computed now, or stored in ``old``).
        passthrough: input columns carried to the output.
        old / old_parts: the earlier output a refilter reads, and its committed parts.
    """

    files: list[InputFile]
    scorers: list[str]
    passthrough: list[pa.Field]
    old: Location | None = None
    old_parts: list[CommittedPart] = field(default_factory=list)


def inspect_source(cfg: PipelineConfig, inputs: list[str]) -> Source:
    """Check the inputs up front and decide the output's pass-through columns and scorers.

    Raises:
        InputError / OutputError / ConfigError: unreadable input, no shards, a score never computed.
    """
    if cfg.source == "metadata":
        files = inspect_inputs(inputs, cfg.input)
        return Source(files, cfg.score.scorers if cfg.score.enabled else [], passthrough_fields(files))
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
    return Source([], scorers, [f for f in old_schema if f.name not in contract], src, old_parts)


def fingerprints(src: Source) -> dict[str, str]:
    """Content fingerprints of what the run reads (:func:`capfilt.io.fingerprint.fingerprint`).

    Returns:
        ``{input file URI: fingerprint}`` for metadata input; for refilter, ``{old part name:
        fingerprint}`` of the earlier output's committed parts.

    Raises:
        InputError: a file cannot be read (named).
    """
    from capfilt.errors import InputError
    from capfilt.io.fingerprint import fingerprint

    if src.old is not None:
        items = [(p.name, src.old.join(p.name + ".parquet")) for p in src.old_parts]
    else:
        items = [(f.uri, locate(f.uri)) for f in src.files]
    out = {}
    for name, loc in items:
        try:
            out[name] = fingerprint(loc)
        except OSError as e:
            raise InputError(f"cannot read {loc.uri} to fingerprint it: {e}") from None
    return out


def plan_shards(cfg: PipelineConfig, src: Source, done_keys: list[str]) -> tuple[list[ShardSpec], int, int]:
    """Shard specs still to do, shards already done, and total input rows."""
    if cfg.source == "metadata":
        specs, skipped = plan_metadata_shards(src.files, cfg.output.rows_per_shard, done_keys)
        return specs, skipped, sum(f.num_rows for f in src.files)
    return plan_output_shards(src.old, src.old_parts, done_keys)
