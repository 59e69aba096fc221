"""WebDataset shards: one tar per source part, three members per kept row.

Each exported row ``KEY`` becomes (the layout open_clip's and img2dataset's loaders read):

- ``KEY.jpg`` (or ``.png``/``.webp``, from the stored bytes): the image bytes exactly as stored;
- ``KEY.txt``: the best kept caption (``captions[0]``, ranked by the select stage; see
  :func:`capfilt.export.source.best_caption` for rows the filter kept nothing of, with ``--all``);
- ``KEY.json``: every other column of the row: ``key``, ``url``, ``status``, the web caption
  ``caption`` and its scores (``web_itm``...), ``synthetic_captions`` and their scores, the kept
  ``captions`` with ``caption_scores`` and ``caption_sources`` (ranked), sizes, ``sha256`` and the
  input's pass-through columns; plus ``text_source`` (where ``KEY.txt`` came from).

Written with ``webdataset.TarWriter`` (``pip install webdataset``), streaming into the shard's
output stream.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import BinaryIO

import pyarrow as pa

from capfilt.errors import OutputError
from capfilt.export.source import Tally, best_caption, image_ext, jsonable

EXT = "tar"


def _tar_writer(stream: BinaryIO):
    try:
        import webdataset
    except ImportError:
        raise OutputError("exporting WebDataset shards needs the webdataset package: "
                          "pip install 'capfilt[export]' (or pip install webdataset)") from None
    # encoder=False: members are written as the bytes given; mtime fixed so a shard is reproducible.
    return webdataset.TarWriter(stream, encoder=False, mtime=0.0)


def write_tar(batches: Iterable[pa.RecordBatch], stream: BinaryIO, all_rows: bool,
              default_ext: str | None) -> dict:
    """Write the exported rows of ``batches`` into ``stream`` as one WebDataset tar.

    Args:
        batches: one source part's rows (:func:`capfilt.export.source.iter_batches`).
        stream: a writable binary stream (the shard's temporary file).
        all_rows: every row with image bytes, not only ``keep`` rows.
        default_ext: extension for image bytes whose format is not recognised (the run's
            ``download.encode_format``).

    Returns:
        The shard's counts (:meth:`capfilt.export.source.Tally.to_json`).

    Raises:
        OutputError: a row's key contains ``.`` or ``/`` (WebDataset splits member names there).
    """
    tally = Tally()
    tar = _tar_writer(stream)
    try:
        for batch in batches:
            for row in batch.to_pylist():
                if tally.see(row, all_rows) is not None:
                    continue
                key = str(row["key"])
                if "." in key or "/" in key:
                    raise OutputError(f"row key {key!r} contains '.' or '/', which WebDataset reads as a member "
                                      f"extension or folder; capfilt keys never do: is this a capfilt output?")
                image = row.pop("image")
                text, text_source = best_caption(row)
                meta = jsonable({**row, "text_source": text_source})
                tar.write({"__key__": key, image_ext(image, default_ext): image, "txt": text.encode("utf-8"),
                           "json": json.dumps(meta, ensure_ascii=False, allow_nan=False).encode("utf-8")})
                tally.wrote(len(image))
    finally:
        tar.close()
    return tally.to_json()
