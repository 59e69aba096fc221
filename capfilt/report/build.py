"""``build_report``: compute the report data, draw the figures, write the HTML and JSON files."""

from __future__ import annotations

import json
import math
import posixpath
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from capfilt.io.filesystem import Location, locate
from capfilt.report.html import render_html
from capfilt.report.plots import render_plots
from capfilt.report.stats import compute_report_data

#: Where the report goes by default, relative to the output folder.
DEFAULT_HTML = "_capfilt/report.html"
DEFAULT_JSON = "_capfilt/report.json"


def json_safe(x: Any) -> Any:
    """``x`` with NaN/inf floats replaced by None (JSON has no NaN) and tuples turned into lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def _write_text(target: str | Path, text: str) -> str:
    loc: Location = locate(str(target))
    loc.fs.create_dir(posixpath.dirname(loc.path), recursive=True)
    with loc.fs.open_output_stream(loc.path) as f:
        f.write(text.encode("utf-8"))
    return loc.uri


def build_report(out: str | Path, html: str | Path | None = None, json_path: str | Path | None = None,
                 samples: int = 24, seed: int = 0, label_col: str | None = None,
                 label_positive: Sequence[str] | None = None) -> dict[str, Any]:
    """Write the dataset-quality report of a capfilt output (complete or interrupted).

    Args:
        out: the output folder of ``capfilt run`` (local path or ``s3://``-style URI).
        html: where to write the self-contained HTML report; default ``OUT/_capfilt/report.html``.
        json_path: where to write the JSON with every number; default ``OUT/_capfilt/report.json``.
        samples: images in the sample grid (drawn uniformly among downloaded rows).
        seed: seed of that draw.
        label_col: a pass-through column of ground-truth labels (``noise_type``, an audit column):
            adds the "Filter vs labels" section and the ``labels`` key (:mod:`capfilt.report.labels`).
        label_positive: label values meaning "the web caption matches its image" (repeatable,
            each possibly comma-separated); default: ``clean``, ``true``, ``1``, ``yes``, ... .

    Returns:
        The report data as written to the JSON file, plus ``"files": {"html": uri, "json": uri}``
        (that key is not written to the JSON file itself).

    Raises:
        capfilt.errors.OutputError: if ``out`` is not a folder.
        capfilt.errors.LabelError: if ``label_col`` is missing or has no positive value (nothing is
            written then).
        OSError: if a report file cannot be written.
    """
    loc = locate(str(out))
    result = compute_report_data(loc, samples=samples, seed=seed, label_col=label_col, label_positive=label_positive)
    data = json_safe(result.data)
    plots = render_plots(data)
    html_uri = _write_text(html if html is not None else loc.join(DEFAULT_HTML).uri,
                           render_html(data, plots, result.images))
    json_uri = _write_text(json_path if json_path is not None else loc.join(DEFAULT_JSON).uri,
                           json.dumps(data, indent=1, allow_nan=False, ensure_ascii=False) + "\n")
    return {**data, "files": {"html": html_uri, "json": json_uri}}
