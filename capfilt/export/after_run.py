"""Export as the final step of ``capfilt run`` (the recipe's ``export:`` section, e.g.
``--set export.format=webdataset``): the same resumable :func:`capfilt.export.job.export_output`,
with its destination checked before the run starts.
"""

from __future__ import annotations

from typing import Any

from capfilt.errors import OutputError
from capfilt.io.filesystem import Location, locate


def export_destination(cfg: Any, out: Location) -> Location | None:
    """Where the run's export goes, checked before any work; ``None`` when ``cfg.format`` is ``none``.

    Args:
        cfg: the recipe's :class:`capfilt.config.ExportConfig`.
        out: the run's output folder.

    Returns:
        ``cfg.to``, or the folder beside ``out`` named ``OUT-FORMAT``.

    Raises:
        OutputError: the destination is the output or inside it, or the format's package is missing
            (names the install command).
    """
    if cfg.format == "none":
        return None
    try:
        dest = locate(cfg.to) if cfg.to else locate(f"{out.uri.rstrip('/')}-{cfg.format}")
    except ValueError as e:
        raise OutputError(f"export.to {cfg.to}: {e}") from None
    if type(dest.fs) is type(out.fs) and (dest.path.rstrip("/") + "/").startswith(out.path.rstrip("/") + "/"):
        raise OutputError(f"export.to {dest.uri} is inside the output {out.uri}, where its shards would mix with "
                          f"the run's: give a folder outside it (or leave export.to unset for {out.uri}-{cfg.format}).")
    package = {"webdataset": "webdataset", "hf-parquet": "datasets"}[cfg.format]
    try:
        __import__(package)
    except ImportError:
        raise OutputError(f"export.format={cfg.format} needs the {package} package: pip install 'capfilt[export]' "
                          f"(or pip install {package}), or run without the export and use `capfilt export` "
                          f"later.") from None
    return dest


def export_after_run(cfg: Any, out: Location, on_shard: Any = None) -> Any:
    """Export the committed output ``out`` as ``cfg`` says (:func:`export_destination`).

    Returns:
        The :class:`capfilt.export.job.ExportResult`, or ``None`` when ``cfg.format`` is ``none``.

    Raises:
        OutputError: as :func:`capfilt.export.job.export_output` (a destination holding something
            else, counts that do not add up, storage errors).
    """
    dest = export_destination(cfg, out)
    if dest is None:
        return None
    from capfilt.export.job import export_output

    return export_output(out.uri, cfg.format, dest.uri, all_rows=cfg.all_rows, on_shard=on_shard,
                         rows_per_file=cfg.rows_per_file)
