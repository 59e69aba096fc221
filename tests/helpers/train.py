"""Helpers of the trainer tests: capfilt-contract shards made from the real COCO fixtures."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfilt import schema
from capfilt.stages.registry import output_schema
from capfilt.io.writer import STATS_DIR, STATS_SUFFIX

COCO = Path(__file__).resolve().parents[1] / "fixtures" / "coco"


def coco_rows() -> list[dict]:
    """One row per COCO fixture image: ``image_id``, ``file``, ``captions`` (5 real captions)."""
    data = json.loads((COCO / "captions_val2017.json").read_text())
    caps: dict[int, list[str]] = {}
    for a in data["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"].strip())
    return [{"image_id": im["id"], "file": COCO / "images" / im["file_name"], "url": im["coco_url"],
             "captions": caps.get(im["id"], [])} for im in data["images"]]


def _jpeg(path: Path, side: int) -> tuple[bytes, int, int, int, int]:
    with Image.open(path) as im:
        ow, oh = im.size
        im = im.convert("RGB")
        im.thumbnail((side * 4, side), Image.BICUBIC) if ow >= oh else im.thumbnail((side, side * 4), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        return buf.getvalue(), im.size[0], im.size[1], ow, oh


def make_shards(out: Path, files: int = 3, rows_per_group: int = 8, side: int = 72,
                drop_every: int = 5, fail_every: int = 11) -> list[str]:
    """Write a capfilt-contract output folder (``NNNNN.parquet`` + ``_stats/NNNNN.stats.json``) from COCO.

    Every ``drop_every``-th row is dropped by the filter (``keep`` false, no captions), every
    ``fail_every``-th row failed to download (no image). Kept rows carry 2-4 real COCO captions as
    ``captions`` (the web caption first). Images are resized so the short side is ``side`` px,
    as ``download.image_size`` would.

    Returns:
        The keys of the kept rows.
    """
    out.mkdir(parents=True, exist_ok=True)
    sch = output_schema(scorers=("itm", "itc"), run_id="test-shards")
    rows = coco_rows()
    kept: list[str] = []
    per_file = -(-len(rows) // files)
    for f in range(files):
        recs = []
        for i, r in enumerate(rows[f * per_file:(f + 1) * per_file], start=f * per_file):
            key = f"{i:06d}"
            rec = {"key": key, "url": r["url"], "caption": r["captions"][0]}
            if i % fail_every == 3:
                rec.update(status=schema.FAILED_TO_DOWNLOAD, error_message="HTTP 404", keep=False,
                           drop_reason=schema.DROP_NOT_DOWNLOADED, captions=[], caption_scores=[],
                           caption_sources=[])
            else:
                data, w, h, ow, oh = _jpeg(r["file"], side)
                rec.update(status=schema.SUCCESS, image=data, width=w, height=h, original_width=ow,
                           original_height=oh, synthetic_captions=r["captions"][1:3])
                if i % drop_every == 0:
                    rec.update(keep=False, drop_reason=schema.DROP_BELOW_THRESHOLD, captions=[],
                               caption_scores=[], caption_sources=[])
                else:
                    n = 2 + i % 3
                    caps = r["captions"][:n]
                    rec.update(keep=True, captions=caps, caption_scores=[0.9 - 0.1 * j for j in range(len(caps))],
                               caption_sources=["web"] + ["synthetic"] * (len(caps) - 1))
                    kept.append(key)
            recs.append(rec)
        table = schema.conform(pa.Table.from_pylist(recs), sch)
        pq.write_table(table, out / f"{f:05d}.parquet", row_group_size=rows_per_group)
        stats = {"rows": table.num_rows, "keep": sum(1 for r in recs if r.get("keep"))}
        (out / STATS_DIR).mkdir(exist_ok=True)
        (out / STATS_DIR / f"{f:05d}{STATS_SUFFIX}").write_text(json.dumps(stats))
    return kept


def loss_trend(history: list[dict], objectives, k: int = 5) -> dict[str, tuple[float, float]]:
    """``{objective: (mean of the first k logged steps, mean of the last k)}``, printed per objective."""
    out = {}
    for o in objectives:
        vals = [row[o] for row in history]
        out[o] = (sum(vals[:k]) / k, sum(vals[-k:]) / k)
    print("  ".join(f"{o}: {a:.4f} -> {b:.4f}" for o, (a, b) in out.items()))
    return out


#: The most frequent words of the COCO fixture captions (a trained captioner uses them much more than noise does).
FREQUENT_WORDS = {"a", "on", "of", "the", "in", "with", "and", "is", "to", "an", "two", "at", "sitting", "man"}


def frequent_word_rate(captions: list[str]) -> float:
    """Fraction of the words of ``captions`` that are in :data:`FREQUENT_WORDS`."""
    words = [w for c in captions for w in c.lower().split()]
    return sum(w in FREQUENT_WORDS for w in words) / max(len(words), 1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run tiny models on one intra-op thread (restored after the test).

    On a shared 2-core machine torch's default (one thread per core) spins against the DataLoader
    workers and other processes; the tiny models run several times faster on one thread.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
