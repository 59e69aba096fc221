"""Dataset-quality report of a capfilt output: ``capfilt report`` (HTML + JSON) and ``capfilt inspect``.

- :mod:`capfilt.report.stats`: every number, streamed from the shards with pyarrow.
- :mod:`capfilt.report.plots`: matplotlib figures drawn from those numbers.
- :mod:`capfilt.report.html`: the self-contained HTML page.
- :mod:`capfilt.report.inspect`: the terminal overview (rich).
- :mod:`capfilt.report.cli`: the typer commands, registered by :mod:`capfilt.cli`.

Imports are lazy so that ``capfilt --help`` does not load pyarrow and matplotlib.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_report", "inspect_output"]


def __getattr__(name: str) -> Any:
    if name == "build_report":
        from capfilt.report.build import build_report

        return build_report
    if name == "inspect_output":
        from capfilt.report.inspect import inspect_output

        return inspect_output
    raise AttributeError(f"module 'capfilt.report' has no attribute {name!r}")
