"""Exports of a capfilt output for other trainers: WebDataset tars (open_clip, LAVIS, img2dataset
readers) and HF Parquet with the ``Image`` feature (``datasets``, the Hub viewer).

``capfilt export OUT --format webdataset|hf-parquet --to DEST`` (:mod:`capfilt.export.cli`) calls
:func:`export_output` (:mod:`capfilt.export.job`): the source's committed parts
(:mod:`~capfilt.export.source`) are streamed one at a time into shards committed whole
(:mod:`~capfilt.export.commit`) by the format's writer (:mod:`~capfilt.export.webdataset`,
:mod:`~capfilt.export.hf`). This package reads outputs through :mod:`capfilt.io` only; it never
imports the stages or the runner. Imports are lazy so that ``capfilt --help`` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ExportResult", "ShardResult", "export_output"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from capfilt.export import job

        return getattr(job, name)
    raise AttributeError(f"module 'capfilt.export' has no attribute {name!r}")
