"""The stage protocol shared by every pipeline step."""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa


class Stage:
    """A pipeline step: a cheap, picklable constructor; heavy state loaded in :meth:`setup`.

    ``__call__(batch)`` takes a ``pyarrow.Table`` and returns the same rows in the same order with
    the stage's columns added or replaced. Errors on a row become row data (``status`` and
    ``error_message``); only infrastructure faults raise. ``uses_model`` stages run as Ray actors
    (one model load per actor), the others as Ray tasks.

    Stages may add internal columns named ``_*`` (e.g. ``_seconds_caption``: float64 per row,
    the batch's wall seconds divided by its row count) that the writer aggregates into shard
    stats and then drops.
    """

    name: ClassVar[str] = "stage"
    uses_model: ClassVar[bool] = False
    single_actor: ClassVar[bool] = False  # run-wide state: the runner uses exactly one actor

    def setup(self) -> None:
        """Load heavy state (models, clients). Called once per worker before the first batch."""

    def __call__(self, batch: pa.Table) -> pa.Table:  # pragma: no cover - interface
        raise NotImplementedError


def set_column(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    """Add column ``name`` or replace it in place (keeping its position)."""
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)
