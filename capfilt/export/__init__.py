"""Exports of a capfilt output for other trainers: WebDataset tars (open_clip, LAVIS, img2dataset
readers) and HF Parquet with the ``Image`` feature (``datasets``, the Hub viewer).

``capfilt export OUT --format webdataset|hf-parquet --to DEST`` (:mod:`capfilt.export.cli`) calls
:func:`export_output` (:mod:`capfilt.export.job`): the source's committed parts
(:mod:`~capfilt.export.source`) are streamed one at a time into shards committed whole
(:mod:`~capfilt.export.commit`) by the format's writer (:mod:`~capfilt.export.webdataset`,
:mod:`~capfilt.export.hf`). This package reads outputs through :mod:`capfilt.io` only; it never
imports the stages or the runner.
"""

from capfilt.export.job import ExportResult, ShardResult, export_output

__all__ = ["ExportResult", "ShardResult", "export_output"]
