"""HF Parquet shards: the image column as ``datasets``' ``Image`` feature, plus a dataset card.

Each shard ``DEST/NAME.parquet`` holds the exported rows of source part ``NAME`` with:

- ``image``: ``struct<bytes: binary, path: string>`` (the stored bytes; ``path`` is ``KEY.jpg``), which
  ``datasets`` decodes to a ``PIL.Image`` because the file's schema metadata (key ``huggingface``,
  ``{"info": {"features": ...}}``, written by ``datasets.Features.arrow_schema``) declares it ``Image``;
- ``text``: the best kept caption (:func:`capfilt.export.source.best_caption`; ``capfilt_text``
  when the input already passed a ``text`` column through);
- every other column of the output unchanged (key, url, captions with scores and sources, ...).

``DEST/README.md`` is a dataset card (Hub YAML header, the run's recipe and the export's numbers), so
``load_dataset("parquet", data_files="DEST/*.parquet")`` and the Hub viewer show pictures.
Needs ``datasets`` (``pip install 'capfilt[export]'``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from capfilt.errors import OutputError
from capfilt.export.source import BATCH_ROWS, Source, Tally, best_caption, image_ext

EXT = "parquet"
IMAGE = "image"


def text_column(source_schema: pa.Schema) -> str:
    """Name of the best-caption column: ``text``, or ``capfilt_text`` if ``text`` is already a column."""
    return "capfilt_text" if "text" in source_schema.names else "text"


def hf_schema(source_schema: pa.Schema) -> pa.Schema:
    """The shard schema for a source part: ``image`` as HF ``Image``, the text column, then the rest.

    Returns:
        An Arrow schema whose metadata carries the ``huggingface`` features JSON.

    Raises:
        OutputError: ``datasets`` is not installed (names the install command), or a pass-through
            column's type has no HF feature.
    """
    try:
        import datasets
    except ImportError:
        raise OutputError("exporting HF Parquet needs the datasets package: pip install 'capfilt[export]' "
                          "(or pip install datasets)") from None
    rest = [f.with_nullable(True) for f in source_schema if f.name != IMAGE]
    plain = pa.schema([pa.field(IMAGE, pa.binary()), pa.field(text_column(source_schema), pa.string()), *rest])
    try:
        features = datasets.Features.from_arrow_schema(plain)
    except (TypeError, ValueError, NotImplementedError) as e:
        raise OutputError(f"a column of the output has an Arrow type HF datasets cannot describe ({e}); drop that "
                          f"input column (capfilt run --keep-columns) or export --format webdataset.") from None
    features[IMAGE] = datasets.Image()
    return features.arrow_schema


def write_parquet(batches: Iterable[pa.RecordBatch], stream: BinaryIO, source_schema: pa.Schema, all_rows: bool,
                  default_ext: str | None, compression: str = "zstd") -> dict:
    """Write the exported rows of ``batches`` into ``stream`` as one HF Parquet shard.

    Row groups hold about :data:`capfilt.export.source.BATCH_ROWS` exported rows (one group of images
    in memory at a time).

    Args:
        source_schema: the source part's schema (:func:`capfilt.export.source.schema_of`).
        all_rows / default_ext: as :func:`capfilt.export.webdataset.write_tar`.

    Returns:
        The shard's counts (:meth:`capfilt.export.source.Tally.to_json`).
    """
    out_schema = hf_schema(source_schema)
    text_col = text_column(source_schema)
    tally = Tally()
    pending: list[pa.Table] = []
    pending_rows = 0
    with pq.ParquetWriter(stream, out_schema, compression=compression) as writer:
        for batch in batches:
            cols = [c for c in batch.schema.names if c != IMAGE]
            light = batch.select(cols).to_pylist()
            images = batch.column(IMAGE) if IMAGE in batch.schema.names else pa.nulls(batch.num_rows, pa.binary())
            has_image = pc.fill_null(pc.greater(pc.binary_length(images), 0), False).to_pylist()
            mask, paths, texts = [], [], []
            for i, row in enumerate(light):
                row[IMAGE] = has_image[i]
                take = tally.see(row, all_rows) is None
                mask.append(take)
                if take:
                    data = images[i].as_py()
                    tally.wrote(len(data))
                    paths.append(f"{row['key']}.{image_ext(data[:12], default_ext)}")
                    texts.append(best_caption(row)[0])
            chosen = batch.filter(pa.array(mask, pa.bool_()))
            image = pa.StructArray.from_arrays([chosen.column(IMAGE), pa.array(paths, pa.string())],
                                               names=["bytes", "path"]) if chosen.num_rows else None
            arrays = {IMAGE: image, text_col: pa.array(texts, pa.string())}
            table = pa.table({f.name: (arrays[f.name] if f.name in arrays else chosen.column(f.name))
                              for f in out_schema} if chosen.num_rows else
                             {f.name: pa.array([], f.type) for f in out_schema})
            pending.append(table.cast(out_schema))
            pending_rows += table.num_rows
            if pending_rows >= BATCH_ROWS:
                writer.write_table(pa.concat_tables(pending))
                pending, pending_rows = [], 0
        if pending_rows:
            writer.write_table(pa.concat_tables(pending))
    return tally.to_json()


def _fmt(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else "n/a"


def dataset_card(src: Source, totals: dict[str, Any], all_rows: bool) -> str:
    """The text of ``DEST/README.md``: Hub YAML header, headline numbers, the run's recipe.

    Args:
        totals: the export's summed counts (``rows_in``, ``written``, ``kept``, ``web_scored``, ``web_kept``).
    """
    import yaml

    rec = src.record
    cfg = (rec.config if rec else None) or {}
    name = cfg.get("name") or "capfilt"
    noise = (f"{1 - totals['web_kept'] / totals['web_scored']:.1%} of the {totals['web_scored']:,} scored web "
             f"captions were removed by the filter (BLIP's noise ratio)") if totals.get("web_scored") else \
        "not available (no scored web captions)"
    header = {"configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "*.parquet"}]}],
              "task_categories": ["image-to-text", "text-to-image"], "tags": ["capfilt", "image-text"]}
    lines = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
             f"# {name}: image-text pairs curated with capfilt", "",
             f"Exported from `{src.out.uri}` (run `{(rec.run_id if rec else None) or 'unknown'}`, status "
             f"`{(rec.status if rec else None) or 'unknown'}`) by `capfilt export --format hf-parquet`"
             f"{' --all' if all_rows else ''}.", "",
             "| | rows |", "|---|---|",
             f"| rows in the exported shards | {_fmt(totals.get('rows_in'))} |",
             f"| input rows of the run | {_fmt(rec.input_rows if rec else None)} |",
             f"| kept by the filter | {_fmt(totals.get('kept'))} |",
             f"| in this dataset | {_fmt(totals.get('written'))} |", "",
             f"Noise ratio: {noise}.", "",
             "Columns: `image` (HF `Image`), `text` (the best kept caption), `captions` / `caption_scores` / "
             "`caption_sources` (every kept caption, ranked), the web `caption` and `synthetic_captions` with their "
             "scores, `url`, `key`, `status` and the input's own columns.", "",
             "```python", "from datasets import load_dataset",
             'ds = load_dataset("parquet", data_files="*.parquet", split="train")  # run inside this folder',
             "```", "", "## The run's recipe", "", "```json", json.dumps(cfg, indent=2, default=str), "```", ""]
    return "\n".join(lines)
