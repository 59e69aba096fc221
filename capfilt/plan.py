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
        if not cfg.download.allow_private_network and cfg.download.enabled:
            warn_private_hosts(files)
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


#: URLs sampled per input file, and host names resolved at most, by :func:`warn_private_hosts`.
PRIVATE_SAMPLE, PRIVATE_RESOLVE, PRIVATE_RESOLVE_TIMEOUT_S = 200, 8, 2.0


def private_share(urls: list[str]) -> tuple[float, str | None]:
    """Share of ``urls`` whose host is a loopback/private/link-local address, and one example.

    IP literals and ``localhost`` are judged directly; up to :data:`PRIVATE_RESOLVE` other host
    names are resolved (in parallel, at most :data:`PRIVATE_RESOLVE_TIMEOUT_S` seconds in all;
    a name that does not answer in time counts as public).
    """
    import concurrent.futures as cf
    import socket
    from urllib.parse import urlsplit

    from capfilt.io.fetch import address_block_reason

    def private_host(host: str) -> bool:
        """True when ``host`` (a literal or a name) is a non-public address."""
        if host in ("localhost",) or host.endswith(".localhost"):
            return True
        try:
            return address_block_reason(host) is not None
        except ValueError:  # a name, not a literal
            infos = socket.getaddrinfo(host, 80, type=socket.SOCK_STREAM)
            return any(address_block_reason(str(i[4][0])) is not None for i in infos)

    hosts = []
    for u in urls:
        try:
            hosts.append((urlsplit(u).hostname or "").lower())
        except ValueError:
            hosts.append("")
    hosts = [h for h in hosts if h]
    if not hosts:
        return 0.0, None
    verdict: dict[str, bool] = {}
    names = []
    for h in dict.fromkeys(hosts):
        try:
            verdict[h] = h == "localhost" or h.endswith(".localhost") or address_block_reason(h) is not None
        except ValueError:
            names.append(h)
    pool = cf.ThreadPoolExecutor(max_workers=PRIVATE_RESOLVE)
    futures = {pool.submit(private_host, h): h for h in names[:PRIVATE_RESOLVE]}
    done, _ = cf.wait(futures, timeout=PRIVATE_RESOLVE_TIMEOUT_S)
    pool.shutdown(wait=False, cancel_futures=True)
    for f in done:
        try:
            verdict[futures[f]] = f.result()
        except OSError:
            verdict[futures[f]] = False
    judged = [h for h in hosts if h in verdict]
    private = [h for h in judged if verdict[h]]
    return (len(private) / len(judged) if judged else 0.0), (private[0] if private else None)


def warn_private_hosts(files: list[InputFile]) -> None:
    """Warn before any work when most sampled URLs point at private/loopback hosts, which the
    download stage refuses (``blocked_address``) unless ``--allow-private-network``."""
    import logging

    from capfilt.io.reader import read_rows

    urls: list[str] = []
    for f in files:
        t = read_rows(f, 0, min(f.num_rows, PRIVATE_SAMPLE))
        urls += [u for u in t.column("url").to_pylist() if isinstance(u, str)]
    share, example = private_share(urls)
    if share > 0.5:
        logging.getLogger(__name__).warning(
            "%.0f%% of the sampled input URLs point at loopback/private addresses (e.g. host %s); the download "
            "stage refuses them as blocked_address. If that is intended (a local mirror, a test server), pass "
            "--allow-private-network.", 100 * share, example)


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
