"""Splits of the shapes world, as rows in memory or as files a user (or capfilt) reads.

Three splits, as in BLIP's setting (BLIP §3.3): ``web`` (large, noisy alt text: the LAION stand-in),
``human`` (small, exact captions, one canonical caption per content: the COCO stand-in the
captioner and filter are finetuned on) and
``test`` (exact captions, held out). Each split of each seed is its own random stream, so the
splits never share an image and ``capfilt synth --seed S`` makes data no model has seen.

On disk (:func:`write_split`)::

    DIR/images/000000.jpg ...   JPEG, IMAGE_SIZE px
    DIR/meta.parquet            url, caption, noise_type, objects (JSON), true_caption, split, seed, id
    DIR/captions.json           COCO-style captions (images + annotations) for ``capfilt train``

``url`` is the image's path relative to ``DIR`` (``images/000000.jpg``), or ``BASE_URL/images/...``
when a base URL is given (e.g. a server on 127.0.0.1, so capfilt's real download path runs).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from capfilt.synthetic.world import (DEFAULT_NOISE_MIX, NOISE_TYPES, Scene, applicable, canonical_caption,
                                     make_noisy, render, sample_scene)

SPLITS = ("web", "human", "test")
_SPLIT_STREAM = {"web": 11, "human": 22, "test": 33}
#: Default web noise rate (share of rows whose web caption is not an exact caption).
DEFAULT_NOISE_RATE = 0.4


@dataclass(frozen=True)
class Row:
    """One generated image-text pair.

    Attributes:
        id: index in the split.
        scene: the true content.
        image: JPEG bytes (quality 92).
        caption: the (web or human) caption.
        noise_type: one of :data:`~capfilt.synthetic.world.NOISE_TYPES`.
        true_caption: an exact caption of the scene (what a perfect captioner could write).
    """

    id: int
    scene: Scene
    image: bytes
    caption: str
    noise_type: str
    true_caption: str


def _noise_types(rng: np.random.Generator, n: int, rate: float, mix: dict[str, float]) -> list[str]:
    names = [k for k in mix if mix[k] > 0]
    p = np.array([mix[k] for k in names], dtype=np.float64)
    p /= p.sum()
    out = []
    for _ in range(n):
        out.append(str(rng.choice(names, p=p)) if rng.random() < rate else "clean")
    return out


def generate(split: str, n: int, seed: int = 0, noise_rate: float | None = None,
             noise_mix: dict[str, float] | None = None) -> Iterator[Row]:
    """Yield the ``n`` rows of ``split`` for ``seed`` (deterministic).

    Args:
        split: ``web``, ``human`` or ``test``.
        n: number of rows.
        seed: world seed; each split draws from its own stream of it.
        noise_rate: share of noisy web captions; default :data:`DEFAULT_NOISE_RATE` for ``web``
            and 0 for ``human`` / ``test``.
        noise_mix: relative weights of the noisy types (default
            :data:`~capfilt.synthetic.world.DEFAULT_NOISE_MIX`). A type that does not apply to a
            scene (``partial`` on a one-kind scene) is redrawn among those that do.

    Raises:
        ValueError: unknown split or noise type, a rate outside [0, 1], or ``n < 2`` with noise.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
    rate = (DEFAULT_NOISE_RATE if split == "web" else 0.0) if noise_rate is None else float(noise_rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")
    mix = dict(DEFAULT_NOISE_MIX if noise_mix is None else noise_mix)
    bad = [k for k in mix if k not in NOISE_TYPES or k == "clean"]
    if bad or not any(v > 0 for v in mix.values()):
        raise ValueError(f"noise mix needs positive weights for some of {', '.join(NOISE_TYPES[1:])}; got {mix}")
    rng = np.random.default_rng([int(seed), _SPLIT_STREAM[split]])
    scenes = [sample_scene(rng) for _ in range(n)]
    kinds = _noise_types(rng, n, rate, mix)
    for i, (scene, kind) in enumerate(zip(scenes, kinds)):
        content = scene.content()
        if not applicable(kind, content):
            others = [k for k in mix if mix[k] > 0 and applicable(k, content)]
            kind = str(rng.choice(others)) if others else "clean"
        other = None
        if kind == "unrelated":
            for _ in range(100):
                j = int(rng.integers(n))
                if scenes[j].content() != content:
                    other = scenes[j].content()
                    break
            else:
                kind = "clean"
        # web alt text varies (random template and order); human captions are canonical: one
        # caption per content, as a careful annotator writes them (see canonical_caption)
        caption = canonical_caption(content) if split != "web" and kind == "clean" else make_noisy(kind, content,
                                                                                                     rng, other)
        buf = io.BytesIO()
        render(scene, rng).save(buf, format="JPEG", quality=92)
        yield Row(i, scene, buf.getvalue(), caption, kind, canonical_caption(content, template="{x}"))


def write_split(output: str | Path, split: str, n: int, seed: int = 0, noise_rate: float | None = None,
                noise_mix: dict[str, float] | None = None, base_url: str | None = None) -> Path:
    """Write a split as images + ``meta.parquet`` + COCO-style ``captions.json`` (module docstring).

    Args:
        output: folder to create (may exist; files of the same names are replaced).
        base_url: prefix of the ``url`` column (e.g. ``http://127.0.0.1:8000``); default: paths
            relative to ``output``.
        split, n, seed, noise_rate, noise_mix: see :func:`generate`.

    Returns:
        The path of ``meta.parquet``.
    """
    out = Path(output)
    (out / "images").mkdir(parents=True, exist_ok=True)
    cols: dict[str, list] = {k: [] for k in ("url", "caption", "noise_type", "objects", "true_caption",
                                             "split", "seed", "id")}
    coco_images, coco_ann = [], []
    for row in generate(split, n, seed, noise_rate, noise_mix):
        name = f"images/{row.id:06d}.jpg"
        (out / name).write_bytes(row.image)
        cols["url"].append(f"{base_url.rstrip('/')}/{name}" if base_url else name)
        cols["caption"].append(row.caption)
        cols["noise_type"].append(row.noise_type)
        cols["objects"].append(row.scene.to_json())
        cols["true_caption"].append(row.true_caption)
        cols["split"].append(split)
        cols["seed"].append(int(seed))
        cols["id"].append(row.id)
        coco_images.append({"id": row.id, "file_name": f"{row.id:06d}.jpg", "width": 64, "height": 64})
        coco_ann.append({"id": row.id, "image_id": row.id, "caption": row.caption})
    table = pa.table({k: pa.array(v, pa.int64() if k in ("seed", "id") else pa.string()) for k, v in cols.items()})
    pq.write_table(table, out / "meta.parquet")
    (out / "captions.json").write_text(json.dumps({"info": {"description": f"capfilt shapes world, split {split}, "
                                                                            f"seed {seed}"},
                                                   "images": coco_images, "annotations": coco_ann}))
    return out / "meta.parquet"


def write_served_meta(folder: str | Path, base_url: str, dest: str | Path) -> Path:
    """Copy ``folder/meta.parquet`` to ``dest`` with ``url`` rewritten to ``base_url/<relative url>``
    (the split served over HTTP, e.g. by :func:`capfilt.demo.serve`, so capfilt's real download path runs).

    Returns:
        ``dest``.
    """
    meta = pq.read_table(Path(folder) / "meta.parquet")
    urls = [f"{base_url.rstrip('/')}/{u}" for u in meta.column("url").to_pylist()]
    pq.write_table(meta.set_column(meta.schema.get_field_index("url"), "url", pa.array(urls, pa.string())), dest)
    return Path(dest)
