"""What a training source yields, shared by the readers (:mod:`capfilt.train.data`, :mod:`capfilt.train.coco`).

Kept apart from the readers so that each imports it without importing the other.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from capfilt.errors import InputError
from capfilt.io.filesystem import Location


@dataclass(frozen=True)
class Record:
    """One usable row of a source.

    Attributes:
        key: unique row key (capfilt ``key``; COCO ``"<image_id>/<annotation_id>"``).
        image: encoded image bytes (JPEG/PNG/WebP), or ``None`` if the row has none.
        texts: candidate texts, best first (capfilt ``captions``; COCO: the one annotation).
        group: int64 id of the image; rows with the same group are positives of each other in
            ITC and never ITM negatives (COCO: ``image_id``; capfilt: the row's dataset index).
    """

    key: str
    image: bytes | None
    texts: list[str]
    group: int


class RowSource(Protocol):
    """What :class:`StreamingDataset` reads. Implementations must be picklable (DataLoader workers).

    ``kept_rows(u)`` must be cheap (no image I/O) and identical in every process.
    """

    def num_units(self) -> int:
        """Number of read units."""

    def kept_rows(self, unit: int) -> np.ndarray:
        """Row indices (int64, ascending) of the usable rows of ``unit``."""

    def read(self, unit: int, rows: Sequence[int]) -> dict[int, Record]:
        """The records of ``rows`` of ``unit`` (one read of the unit), keyed by row index."""

    def describe(self) -> str:
        """One line for logs: where the data is and how much."""


def read_json(loc: Location) -> Any:
    """Parse a JSON file at ``loc``.

    Raises:
        InputError: missing or not JSON.
    """
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            return json.loads(f.read())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read JSON {loc.uri}: {e}") from None
