"""The shapes world: captions parse back to the scene, each noise type breaks it the way it says,
splits are deterministic and disjoint, images show their objects."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from capfilt.synthetic.splits import generate, write_split
from capfilt.synthetic.world import (COLORS, IMAGE_SIZE, NOISE_TYPES, TEMPLATES, attribute_scores, caption_correct,
                                     describe, make_noisy, parse_caption, render, sample_scene)


def test_parse_reads_counts_plurals_and_templates():
    assert parse_caption("two red circles and a blue square") == Counter({("red", "circle"): 2, ("blue", "square"): 1})
    assert parse_caption("a picture showing an orange star, three green triangles and a purple circle") == Counter(
        {("orange", "star"): 1, ("green", "triangle"): 3, ("purple", "circle"): 1})
    assert parse_caption("IMG_2031.JPG") == Counter()
    assert parse_caption("") == Counter()
    assert parse_caption("red circle") == Counter({("red", "circle"): 1})


def test_describe_round_trips_every_template():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng)
        for t in TEMPLATES:
            text = describe(scene.content(), rng, template=t)
            assert parse_caption(text) == scene.content(), text
            assert caption_correct(text, scene.content())


def test_articles_are_english():
    rng = np.random.default_rng(0)
    assert describe(Counter({("orange", "star"): 1}), rng, "{x}") == "an orange star"
    assert describe(Counter({("red", "star"): 2}), rng, "{x}") == "two red stars"


@pytest.mark.parametrize("noise", [n for n in NOISE_TYPES if n != "clean"])
def test_each_noise_type_makes_the_caption_wrong_in_its_own_way(noise):
    rng = np.random.default_rng(1)
    seen = 0
    for _ in range(300):
        content = sample_scene(rng).content()
        if noise == "partial" and len(content) < 2:
            with pytest.raises(ValueError):
                make_noisy(noise, content, rng)
            continue
        other = Counter({("red", "circle"): 3}) if content != Counter({("red", "circle"): 3}) else Counter(
            {("blue", "star"): 1})
        text = make_noisy(noise, content, rng, other)
        got = parse_caption(text)
        assert got != content, (noise, text, content)
        if noise == "wrong_attribute":  # same number of objects, exactly one changed
            assert sum(got.values()) == sum(content.values())
            assert sum((content - got).values()) == 1
        elif noise == "wrong_count":  # same kinds, one count off by one
            assert set(got) == set(content)
            assert abs(sum(got.values()) - sum(content.values())) == 1
        elif noise == "partial":  # a strict, non-empty subset of the kinds, counts right
            assert got and set(got) < set(content) and all(got[k] == content[k] for k in got)
        elif noise == "junk":
            assert got == Counter()
        elif noise == "unrelated":
            assert got == other
        seen += 1
    assert seen > 100


def test_attribute_scores():
    truth = Counter({("red", "circle"): 2, ("blue", "square"): 1})
    assert attribute_scores("two red circles and a blue square", truth) == {
        "colors": True, "shapes": True, "count": True, "exact": True}
    s = attribute_scores("two red circles and a green square", truth)
    assert s == {"colors": False, "shapes": True, "count": True, "exact": False}
    s = attribute_scores("a red circle and a blue square", truth)
    assert s["count"] is False and s["exact"] is False


def test_render_shows_the_objects_colours():
    rng = np.random.default_rng(3)
    scene = sample_scene(rng)
    img = render(scene, rng)
    assert img.size == (IMAGE_SIZE, IMAGE_SIZE) and img.mode == "RGB"
    px = np.asarray(img).astype(int)
    for o in scene.objects:  # the pixel at each object's centre is near its colour (occlusion is slight)
        c = px[int(round(o.y)), int(round(o.x))]
        nearest = min(COLORS, key=lambda k: np.abs(np.array(COLORS[k]) - c).sum())
        top = max(scene.objects, key=lambda p: scene.objects.index(p) if np.hypot(p.x - o.x, p.y - o.y) < p.size
                  else -1)
        assert nearest == top.color


def test_splits_are_deterministic_disjoint_and_labelled():
    a = list(generate("web", 300, seed=5))
    b = list(generate("web", 300, seed=5))
    assert [r.caption for r in a] == [r.caption for r in b] and a[0].image == b[0].image
    human = list(generate("human", 50, seed=5))
    assert {r.image for r in human}.isdisjoint({r.image for r in a})
    assert all(r.noise_type == "clean" and caption_correct(r.caption, r.scene.content()) for r in human)
    kinds = Counter(r.noise_type for r in a)
    assert set(kinds) == set(NOISE_TYPES)
    assert 0.3 < 1 - kinds["clean"] / 300 < 0.5  # default 40 % noisy
    for r in a:
        assert caption_correct(r.caption, r.scene.content()) == (r.noise_type == "clean"), r
    other_seed = list(generate("web", 20, seed=6))
    assert [r.caption for r in other_seed] != [r.caption for r in a[:20]]


def test_noise_rate_and_mix_are_respected():
    rows = list(generate("web", 400, seed=0, noise_rate=1.0, noise_mix={"junk": 1.0}))
    assert Counter(r.noise_type for r in rows) == Counter({"junk": 400})
    assert all(r.noise_type == "clean" for r in generate("web", 50, seed=0, noise_rate=0.0))
    with pytest.raises(ValueError, match="noise rate"):
        list(generate("web", 5, noise_rate=1.5))
    with pytest.raises(ValueError, match="split"):
        list(generate("val", 5))


def test_write_split_files(tmp_path):
    import pyarrow.parquet as pq

    meta = write_split(tmp_path / "w", "web", 12, seed=1, base_url="http://127.0.0.1:9")
    t = pq.read_table(meta).to_pylist()
    assert len(t) == 12
    assert t[0]["url"] == "http://127.0.0.1:9/images/000000.jpg"
    img = Image.open(tmp_path / "w" / "images" / "000000.jpg")
    assert img.size == (IMAGE_SIZE, IMAGE_SIZE) and img.format == "JPEG"
    objs = json.loads(t[0]["objects"])
    assert caption_correct(t[0]["true_caption"], Counter((o["color"], o["shape"]) for o in objs))
    coco = json.loads((tmp_path / "w" / "captions.json").read_text())
    assert len(coco["images"]) == len(coco["annotations"]) == 12
    assert coco["annotations"][3]["caption"] == t[3]["caption"]
    local = write_split(tmp_path / "l", "test", 3, seed=1)
    assert pq.read_table(local).column("url").to_pylist()[0] == "images/000000.jpg"
    assert Image.open(io.BytesIO((tmp_path / "l" / "images" / "000002.jpg").read_bytes())).size == (64, 64)
