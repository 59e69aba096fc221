"""COCO-format caption data (``captions_*.json`` + image folder) as a training :class:`~capfilt.train.records.RowSource`.

CapFilt's captioner and filter are BLIP models finetuned on COCO (BLIP §3.3): the captioner with
the LM loss, the filter with ITC + ITM. The ``caption-coco`` / ``itm-coco`` recipes read COCO
Karpathy-style annotation files in the official format::

    {"images": [{"id": 397133, "file_name": "000000397133.jpg", ...}, ...],
     "annotations": [{"image_id": 397133, "id": 370509, "caption": "A man ..."}, ...]}

Each annotation is one row (five rows per COCO image); rows of the same image share a ``group``
(the ``image_id``), so in ITC they are positives of each other and never ITM negatives, as in
BLIP's retrieval finetuning (``idx``-based targets). Units are ``rows_per_unit`` consecutive
annotations in file order.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence

import numpy as np
import pyarrow.fs as pafs

from capfilt.errors import InputError
from capfilt.io.filesystem import locate
from capfilt.train.records import Record, read_json


class CocoCaptions:
    """Rows = COCO caption annotations whose image file exists.

    Args:
        annotations: path or URI of a ``captions_*.json``.
        images: folder holding the ``file_name`` s (default: ``images/`` next to the JSON if it
            exists, else the JSON's own folder). Local or URI.
        rows_per_unit: annotations per read unit.

    Raises:
        InputError: the JSON is missing / not COCO captions, the image folder does not exist, or
            no annotation has its image file (the message gives an example of a missing file).
    """

    def __init__(self, annotations: str, images: str | None = None, rows_per_unit: int = 256) -> None:
        self.uri = annotations
        ann_loc = locate(annotations)
        data = read_json(ann_loc)
        if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
            raise InputError(f"{annotations}: not a COCO captions file (needs 'images' and 'annotations' lists)")
        if images is None:
            parent = posixpath.dirname(ann_loc.path)
            cand = ann_loc.fs.get_file_info(posixpath.join(parent, "images"))
            base = posixpath.dirname(ann_loc.uri)
            images = posixpath.join(base, "images") if cand.type == pafs.FileType.Directory else base
        img_loc = locate(images)
        if img_loc.fs.get_file_info(img_loc.path).type != pafs.FileType.Directory:
            raise InputError(f"COCO image folder {images} does not exist (set data.images in the recipe "
                             f"or --images)")
        self.images_uri = img_loc.uri
        self._fs, self._dir = img_loc.fs, img_loc.path
        present = {posixpath.basename(i.path) for i in
                   img_loc.fs.get_file_info(pafs.FileSelector(img_loc.path, recursive=False))
                   if i.type == pafs.FileType.File}
        try:
            files = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
            anns = [(int(a["image_id"]), int(a["id"]), str(a["caption"])) for a in data["annotations"]]
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{annotations}: malformed COCO entry ({type(e).__name__}: {e})") from None
        self._anns = anns
        self._files = files
        usable = np.array([files.get(i) in present for i, _, _ in anns], dtype=bool)
        if not usable.any():
            example = next((files.get(i, f"image id {i}") for i, _, _ in anns), "(no annotations)")
            raise InputError(f"{annotations}: no annotation has its image in {images} (e.g. {example})")
        self.missing = int((~usable).sum())
        self._usable = usable
        self.rows_per_unit = rows_per_unit

    def num_units(self) -> int:
        """``ceil(annotations / rows_per_unit)``."""
        return -(-len(self._anns) // self.rows_per_unit)

    def _span(self, unit: int) -> tuple[int, int]:
        lo = unit * self.rows_per_unit
        return lo, min(lo + self.rows_per_unit, len(self._anns))

    def kept_rows(self, unit: int) -> np.ndarray:
        """Annotations of the unit whose image file exists (indices within the unit)."""
        lo, hi = self._span(unit)
        return np.flatnonzero(self._usable[lo:hi]).astype(np.int64)

    def read(self, unit: int, rows: Sequence[int]) -> dict[int, Record]:
        """Read the image bytes of ``rows`` (each distinct file once)."""
        lo, _ = self._span(unit)
        blobs: dict[str, bytes | None] = {}
        out = {}
        for r in rows:
            image_id, ann_id, caption = self._anns[lo + int(r)]
            name = self._files[image_id]
            if name not in blobs:
                try:
                    with self._fs.open_input_stream(posixpath.join(self._dir, name)) as f:
                        blobs[name] = f.read()
                except OSError:
                    blobs[name] = None
            out[int(r)] = Record(key=f"{image_id}/{ann_id}", image=blobs[name], texts=[caption], group=image_id)
        return out

    def describe(self) -> str:
        """``COCO captions FILE: N annotations of I images (M without image file)``."""
        return (f"COCO captions {self.uri}: {len(self._anns)} annotations of {len(self._files)} images "
                f"({self.missing} without image file in {self.images_uri})")
