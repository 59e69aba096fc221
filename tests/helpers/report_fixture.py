"""Build a contract-conforming capfilt output from real files, for the report tests and benchmark.

Images are the real COCO val2017 thumbnails of ``tests/fixtures/coco/images`` (their bytes stored
as-is, ``original_*`` taken from the COCO annotation file), web captions and synthetic captions are
real COCO captions of the same image (plus a few known BLIP failures: back-to-back repetition and
one generic caption shared by many images), scores come from a seeded RNG, and the select step
follows the recipe (BLIP: ITM >= threshold on every text; BLIP-2: top-k by CLIP). Shards are cast
with :func:`capfilt.stages.registry.output_schema` / :func:`capfilt.schema.conform`, each followed by its
``<stem>.stats.json`` where the writer puts it, and ``_capfilt/run.json`` holds the resolved recipe and the ``tiny`` preset.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from capfilt import schema
from capfilt.stages.registry import output_schema
from capfilt.config import load_pipeline, load_preset
from capfilt.io import writer

#: Where the writer puts shard stats (``OUT/_stats/`` now; beside the shards in older layouts).
STATS_DIR = getattr(writer, "STATS_DIR", None)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
COCO = FIXTURES / "coco"

FAILURES = [
    (schema.FAILED_TO_DOWNLOAD, "HTTP Error 404: Not Found"),
    (schema.FAILED_TO_DOWNLOAD, "timed out after 10.0 s"),
    (schema.FAILED_TO_RESIZE, "cannot identify image file"),
    (schema.TOO_SMALL, "image is 12x9 px, shorter side below min_image_size 64"),
    (schema.INVALID_URL, "URL scheme 'ftp' is not allowed (only http, https)"),
    (schema.OPTED_OUT, "X-Robots-Tag: noai"),
]
REPETITIVE = ["a dai dai dai dai dai", "a man riding a wave on a wave on a wave"]
GENERIC = "a picture of a room with a table"
#: The synthetic world's ``noise_type`` values with their share of rows and the Beta(a, b) the web
#: caption's ITM score is drawn from (clean high, unrelated low, subtle noise in between).
NOISE_TYPES: dict[str, tuple[float, float, float]] = {
    "clean": (0.5, 5.0, 1.6), "unrelated": (0.2, 1.3, 5.0), "wrong_attribute": (0.12, 2.5, 2.5),
    "wrong_count": (0.08, 2.2, 2.8), "junk": (0.1, 1.0, 6.0),
}


def _nullable(s: pa.Schema) -> pa.Schema:
    """``s`` with every field nullable (records leave absent fields out; conform fills them)."""
    return pa.schema([f.with_nullable(True) for f in s], metadata=s.metadata)


def coco_items() -> list[dict]:
    """The COCO fixture images with their JPEG bytes, sizes and 5 captions each (sorted by id)."""
    ann = json.loads((COCO / "captions_val2017.json").read_text())
    caps: dict[int, list[str]] = {}
    for a in ann["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"].strip())
    items = []
    for im in sorted(ann["images"], key=lambda x: x["id"]):
        path = COCO / "images" / im["file_name"]
        if not path.exists():
            continue
        data = path.read_bytes()
        with Image.open(path) as pil:
            w, h = pil.size
        items.append({"id": im["id"], "bytes": data, "width": w, "height": h,
                      "original_width": im["width"], "original_height": im["height"], "captions": caps[im["id"]]})
    return items


def _variant(item: dict, rng: np.random.Generator) -> tuple[bytes, int, int]:
    """A distinct re-encoding of ``item``'s photo: random crop, 384 px longer side, JPEG q90."""
    import io

    if "_pil" not in item:
        with Image.open(io.BytesIO(item["bytes"])) as im:
            item["_pil"] = im.convert("RGB")
    im = item["_pil"]
    fw, fh = rng.uniform(0.7, 1.0, 2)
    cw, ch = max(8, int(im.width * fw)), max(8, int(im.height * fh))
    x, y = int(rng.integers(0, im.width - cw + 1)), int(rng.integers(0, im.height - ch + 1))
    crop = im.crop((x, y, x + cw, y + ch))
    scale = 384 / max(cw, ch)
    crop = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    crop.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), crop.width, crop.height


def make_output(out: Path, rows: int = 120, rows_per_shard: int = 50, recipe: Literal["blip", "blip2", "download"] = "blip",
                seed: int = 0, incomplete_shards: int = 0, run_json: Literal["full", "partial", "none"] = "full",
                models: str = "tiny", unique_images: bool = False, row_group_rows: int | None = None,
                noise_col: str | None = None) -> Path:
    """Write a capfilt output with ``rows`` rows into ``out``.

    Args:
        recipe: ``blip`` (1 synthetic caption, ITM+ITC, ITM >= 0.5), ``blip2`` (10 synthetic
            captions, ITM+ITC+CLIP, top-2 by CLIP) or ``download`` (no caption/score columns).
        incomplete_shards: the last this-many shards are written without their ``.stats.json``
            (an interrupted run).
        run_json: ``full``, ``partial`` (only ``config`` and ``versions``) or ``none``.
        models: preset name recorded in ``run.json`` (``tiny`` triggers the report's warning).
        unique_images: give every row its own image bytes (a random 70-100 % crop of the COCO photo,
            resized to 384 px on the longer side, JPEG q90), as a real run stores distinct images;
            otherwise the 79 thumbnails repeat (and Parquet's dictionary encoding dedups them).
        row_group_rows: rows per Parquet row group (default: half a shard, so readers meet several).
        noise_col: add a pass-through string column of this name holding a :data:`NOISE_TYPES` label
            for every row (the synthetic world's ``noise_type``, about 1 row in 40 null), and draw each
            scored web caption's ITM from its label's Beta distribution (a second seeded RNG, so the
            other columns are the same as without it); the select step follows those scores.

    Returns:
        ``out``.
    """
    rng = np.random.default_rng(seed)
    items = coco_items()
    out.mkdir(parents=True, exist_ok=True)
    scorers = {"blip": ["itm", "itc"], "blip2": ["itm", "itc", "clip"], "download": []}[recipe]
    n_syn = {"blip": 1, "blip2": 10, "download": 0}[recipe]
    overrides = {"blip2": ["caption.num_captions=10", "score.scorers=[itm, itc, clip]", "select.rank_by=clip",
                           "select.top_k=2", "select.itm_threshold=null", "name=blip2"]}.get(recipe, [])
    config = load_pipeline("download" if recipe == "download" else "blip", overrides)
    config_json = config.model_dump(mode="json")
    config_json["models"] = models
    thr = config.select.itm_threshold
    passthrough = [pa.field(noise_col, pa.string())] if noise_col else []
    out_schema = output_schema(passthrough, scorers=scorers, run_id="fixture-run")
    lrng = np.random.default_rng(seed + 10_000)
    names = list(NOISE_TYPES)
    shares = np.array([NOISE_TYPES[k][0] for k in names])
    if recipe == "download":  # no caption/score/select columns at all
        dropped = {f.name for f in schema.CAPTION_FIELDS + schema.SELECT_FIELDS}
        out_schema = pa.schema([f for f in out_schema if f.name not in dropped], metadata=out_schema.metadata)

    records = []
    for i in range(rows):
        it = items[i % len(items)]
        r: dict = {"key": f"{i:09d}", "url": f"http://127.0.0.1:8000/coco/{it['id']:012d}.jpg?n={i}"}
        r["caption"] = None if i % 37 == 5 else it["captions"][i % len(it["captions"])]
        if i % 29 == 3 and r["caption"] is not None:  # alt text far longer than the filter reads
            r["caption"] = " ".join([r["caption"].rstrip(".")] * 5)
        label = names[int(lrng.choice(len(names), p=shares / shares.sum()))] if noise_col else None
        if noise_col:
            r[noise_col] = None if i % 41 == 7 else label
        fail = rng.random() < 0.12
        if fail:
            st, msg = FAILURES[int(rng.integers(len(FAILURES)))]
            r.update(status=st, error_message=msg)
            if st == schema.TOO_SMALL:
                r.update(original_width=12, original_height=9)
            if recipe != "download":
                r.update(keep=False, drop_reason=schema.DROP_NOT_DOWNLOADED)
            records.append(r)
            continue
        img, w, h = (_variant(it, rng) if unique_images else (it["bytes"], it["width"], it["height"]))
        r.update(status=schema.SUCCESS, image=img, width=w, height=h,
                 original_width=it["original_width"], original_height=it["original_height"],
                 sha256=f"{it['id']:064x}")
        if recipe == "download":
            records.append(r)
            continue
        syn = []
        for j in range(n_syn):
            u = rng.random()
            if u < 0.06:
                syn.append(REPETITIVE[int(rng.integers(len(REPETITIVE)))])
            elif u < 0.12:
                syn.append(GENERIC)
            else:
                syn.append(it["captions"][(i + j + 1) % len(it["captions"])].lower().rstrip("."))
        scores = {"itm": lambda k: rng.beta(2.2, 1.4, k), "itc": lambda k: rng.normal(0.35, 0.12, k),
                  "clip": lambda k: rng.normal(0.27, 0.05, k)}
        syn_scores = {s: scores[s](n_syn).astype(np.float32) for s in scorers}
        web_scores = {s: (None if r["caption"] is None else float(np.float32(scores[s](1)[0]))) for s in scorers}
        if noise_col and "itm" in scorers and r["caption"] is not None:
            _, a, b = NOISE_TYPES[label]
            web_scores["itm"] = float(np.float32(lrng.beta(a, b)))
        r["synthetic_captions"] = syn
        if r["caption"] is not None:  # a word count stands in for the tokenizer's count ([CLS] + words + [SEP])
            r["web_text_tokens"] = len(r["caption"].split()) + 2
            r["web_text_truncated"] = r["web_text_tokens"] > config.score.max_text_tokens
        for s in scorers:
            r[f"synthetic_{s}"] = syn_scores[s].tolist()
            r[f"web_{s}"] = web_scores[s]
        cands = []
        if r["caption"] is not None:
            cands.append((r["caption"], schema.SOURCE_WEB, {s: web_scores[s] for s in scorers}))
        cands += [(t, schema.SOURCE_SYNTHETIC, {s: float(syn_scores[s][j]) for s in scorers}) for j, t in enumerate(syn)]
        rank = config.select.rank_by
        passing = [c for c in cands if thr is None or c[2]["itm"] >= thr]
        passing.sort(key=lambda c: -c[2][rank])
        if config.select.top_k:
            passing = passing[: config.select.top_k]
        r.update(captions=[c[0] for c in passing], caption_scores=[c[2][rank] for c in passing],
                 caption_sources=[c[1] for c in passing], keep=bool(passing),
                 drop_reason=None if passing else schema.DROP_BELOW_THRESHOLD)
        records.append(r)

    n_shards = (rows + rows_per_shard - 1) // rows_per_shard
    for s in range(n_shards):
        part = records[s * rows_per_shard:(s + 1) * rows_per_shard]
        table = schema.conform(pa.Table.from_pylist(part, schema=_nullable(out_schema)), out_schema)
        path = out / f"{s:05d}.parquet"
        pq.write_table(table, path, compression="zstd", row_group_size=row_group_rows or max(1, rows_per_shard // 2))
        if s < n_shards - incomplete_shards:
            stats = {"rows": len(part), "successes": sum(r["status"] == schema.SUCCESS for r in part)}
            stats_dir = out / STATS_DIR if STATS_DIR else out
            stats_dir.mkdir(exist_ok=True)
            (stats_dir / f"{s:05d}.stats.json").write_text(json.dumps(stats))

    if run_json != "none":
        rec: dict = {"run_id": "fixture-run", "config": config_json,
                     "versions": {"capfilt": "0.1.0", "pyarrow": pa.__version__}}
        if run_json == "full":
            preset = load_preset(models).model_dump(mode="json") if models in ("tiny", "blip-large", "blip-base") else {"name": models}
            rec.update(models=preset,
                       timings={"started_at": "2026-01-01T00:00:00Z", "wall_seconds": 12.5},
                       totals={"rows": rows, "shards": n_shards},
                       stages={"download": {"rows": rows, "seconds": 4.0, "rows_per_s": rows / 4.0},
                               "caption": {"rows": rows, "seconds": 6.0, "rows_per_s": rows / 6.0}})
        (out / "_capfilt").mkdir(exist_ok=True)
        (out / "_capfilt" / "run.json").write_text(json.dumps(rec, indent=2))
    return out
