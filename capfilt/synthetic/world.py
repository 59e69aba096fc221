"""A learnable image-text world: procedural shape scenes, exact captions and labelled web noise.

In the spirit of ShapeWorld (Kuhnle & Copestake 2017, "ShapeWorld - A new test methodology for
multimodal language understanding"): every image is a scene of 1-3 coloured shapes whose true
content is known, so a caption can be checked exactly and a filter's decision can be scored
against a label. It is small enough that a BLIP a few MB in size learns it on two CPU cores, which
lets capfilt run BLIP's bootstrap experiment (BLIP §3.3, Table 1) end to end without real weights.

- :func:`sample_scene` draws a :class:`Scene` (objects with colour, shape, size, position,
  rotation) and :func:`render` draws it (RGB, ``IMAGE_SIZE`` px, anti-aliased, jittered colours,
  plain or lightly textured background, slight occlusion allowed).
- :func:`describe` writes an exact caption from a small grammar (counts, plurals, random group
  order, several templates): ``"two red circles and a blue square"``.
- :func:`parse_caption` reads a caption back into a multiset of ``(colour, shape)``; it is how
  synthetic captions are graded and how retrieval decides that a text matches an image.
- :func:`make_noisy` applies the web-noise model of BLIP's motivation (alt text that does not
  describe the image): ``unrelated``, ``wrong_attribute``, ``wrong_count``, ``junk``, ``partial``.

Everything is deterministic given ``numpy.random.Generator`` state.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

#: Side of the rendered images, pixels.
IMAGE_SIZE = 64
#: Named colours and their nominal RGB (each object's colour is jittered by up to ``COLOR_JITTER``).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (35, 160, 55), "blue": (40, 75, 215),
    "yellow": (235, 210, 35), "purple": (135, 45, 175), "orange": (245, 135, 25),
}
COLOR_JITTER = 18
#: Shape names (singular -> plural).
SHAPES: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
_PLURAL_TO_SHAPE = {v: k for k, v in SHAPES.items()}
#: Background tones (RGB) and the probability of each number of objects (1, 2, 3).
BACKGROUNDS = [(205, 205, 205), (225, 220, 205), (60, 62, 66), (175, 185, 195)]
OBJECT_COUNTS = (1, 2, 3)
OBJECT_COUNT_P = (0.35, 0.4, 0.25)
NUMBER_WORDS = {1: "a", 2: "two", 3: "three"}
_WORD_TO_NUMBER = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
#: Caption templates; ``{x}`` is the list of objects. The human and test splits use them too.
TEMPLATES = ("{x}", "a picture showing {x}", "an image of {x}", "{x} on a plain background",
             "a drawing of {x}", "{x} in the picture")
#: Web-noise types (``clean`` = the exact caption).
NOISE_TYPES = ("clean", "unrelated", "wrong_attribute", "wrong_count", "junk", "partial")
#: Default share of each noise type among the *noisy* rows (normalised), e.g. 40 % noisy overall.
DEFAULT_NOISE_MIX = {"unrelated": 0.3, "wrong_attribute": 0.25, "wrong_count": 0.15, "junk": 0.2, "partial": 0.1}
_JUNK = ("IMG_{n4}.JPG", "DSC{n5}.jpg", "click here to buy", "free shipping on all orders", "image",
         "photo", "SKU {n5}-{L}", "stock photo {n6}", "untitled", "best price {n2} off", "screenshot {n4}",
         "product {n4} front view")


@dataclass(frozen=True)
class Obj:
    """One object of a scene.

    Attributes:
        color: a key of :data:`COLORS`.
        shape: a key of :data:`SHAPES`.
        size: radius in pixels (of :data:`IMAGE_SIZE`), float.
        x, y: centre in pixels, float.
        angle: rotation in degrees (any for circles and stars, within +-20 of upright for squares
            and triangles).
    """

    color: str
    shape: str
    size: float
    x: float
    y: float
    angle: float


@dataclass(frozen=True)
class Scene:
    """A scene: its objects and background (index into :data:`BACKGROUNDS`, ``textured``)."""

    objects: tuple[Obj, ...]
    background: int
    textured: bool

    def content(self) -> Counter:
        """The multiset of ``(colour, shape)`` the scene shows: what an exact caption names."""
        return Counter((o.color, o.shape) for o in self.objects)

    def to_json(self) -> str:
        """The objects as a JSON list of dicts (``color``, ``shape``, ``size``, ``x``, ``y``, ``angle``)."""
        return json.dumps([{k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(o).items()}
                           for o in self.objects])


# ------------------------------------------------------------------------------------------------
# scenes and images
# ------------------------------------------------------------------------------------------------
def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a scene: 1-3 objects (``OBJECT_COUNT_P``), sizes 8-13 px radius, centres at least
    ``0.8 x (r1 + r2)`` apart (slight occlusion, never hidden), inside the frame."""
    n = int(rng.choice(OBJECT_COUNTS, p=OBJECT_COUNT_P))
    colors, shapes = list(COLORS), list(SHAPES)
    objs: list[Obj] = []
    while len(objs) < n:
        r = float(rng.uniform(8.0, 13.0))
        for _ in range(100):
            x, y = (float(v) for v in rng.uniform(r + 1, IMAGE_SIZE - r - 1, size=2))
            if all(math.hypot(x - o.x, y - o.y) >= 0.8 * (r + o.size) for o in objs):
                break
        else:  # no room: start again
            objs = []
            continue
        shape = shapes[int(rng.integers(len(shapes)))]
        # squares and triangles stand roughly upright (+-20 deg), so a square never becomes a diamond
        angle = float(rng.uniform(0, 360)) if shape in ("circle", "star") else float(rng.uniform(-20, 20))
        objs.append(Obj(colors[int(rng.integers(len(colors)))], shape, r, x, y, angle))
    return Scene(tuple(objs), int(rng.integers(len(BACKGROUNDS))), bool(rng.random() < 0.5))


def _polygon(shape: str, x: float, y: float, r: float, angle: float) -> list[tuple[float, float]]:
    a0 = math.radians(angle)
    if shape == "square":
        pts = [(r * 0.85, a0 + math.pi / 4 + k * math.pi / 2) for k in range(4)]  # axis-aligned at angle 0
        pts = [(rad * math.sqrt(2), a) for rad, a in pts]
    elif shape == "triangle":  # apex up at angle 0
        pts = [(r * 1.1, a0 - math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
    else:  # star: 5 points, inner radius 0.45
        pts = [(r * (1.15 if k % 2 == 0 else 0.5), a0 + k * math.pi / 5) for k in range(10)]
    return [(x + rad * math.cos(a), y + rad * math.sin(a)) for rad, a in pts]


def render(scene: Scene, rng: np.random.Generator, scale: int = 4) -> Image.Image:
    """Draw ``scene`` as an RGB ``IMAGE_SIZE`` x ``IMAGE_SIZE`` image.

    Drawn at ``scale`` x resolution and downsampled (anti-aliasing); each object's colour is jittered
    by up to :data:`COLOR_JITTER` per channel; a textured background adds a gradient and mild noise.
    """
    s = IMAGE_SIZE * scale
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    if scene.textured:
        ramp = np.linspace(-12, 12, s, dtype=np.float32)
        grad = ramp[None, :, None] if rng.random() < 0.5 else ramp[:, None, None]
        arr = np.clip(bg[None, None, :] + grad + rng.normal(0, 6, (s, s, 1)).astype(np.float32), 0, 255)
        img = Image.fromarray(arr.astype(np.uint8), "RGB")
    else:
        img = Image.new("RGB", (s, s), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        rgb = tuple(int(np.clip(c + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1), 0, 255)) for c in COLORS[o.color])
        x, y, r = o.x * scale, o.y * scale, o.size * scale
        if o.shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=rgb)
        else:
            draw.polygon(_polygon(o.shape, x, y, r, o.angle), fill=rgb)
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return img.filter(ImageFilter.GaussianBlur(0.3)) if rng.random() < 0.3 else img


# ------------------------------------------------------------------------------------------------
# captions
# ------------------------------------------------------------------------------------------------
def phrase(count: int, color: str, shape: str) -> str:
    """``"a red circle"`` / ``"an orange star"`` / ``"two red circles"`` (count 1-4)."""
    word = NUMBER_WORDS.get(count, "four")
    if word == "a" and color[0] in "aeiou":
        word = "an"
    return f"{word} {color} {shape if count == 1 else SHAPES[shape]}"


def describe(content: Counter, rng: np.random.Generator, template: str | None = None) -> str:
    """An exact caption of ``content`` (a multiset of ``(colour, shape)``).

    Groups appear in random order, joined as ``"X"``, ``"X and Y"`` or ``"X, Y and Z"``, inside a
    template from :data:`TEMPLATES` (random unless given).
    """
    groups = [phrase(n, c, s) for (c, s), n in content.items() if n > 0]
    order = rng.permutation(len(groups))
    groups = [groups[i] for i in order]
    x = groups[0] if len(groups) == 1 else ", ".join(groups[:-1]) + " and " + groups[-1]
    t = template if template is not None else TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    return t.format(x=x)


def canonical_caption(content: Counter, template: str | None = None) -> str:
    """The one caption a careful annotator writes for ``content``: groups in a fixed order (shape,
    then colour, as listed in :data:`SHAPES` / :data:`COLORS`) inside a template picked by a
    stable hash of the content (``template`` forces one). Equal contents get equal captions, so
    duplicate descriptions of different images are recognisable as such (the human split)."""
    order = {c: i for i, c in enumerate(COLORS)}, {s: i for i, s in enumerate(SHAPES)}
    keys = sorted((k for k, n in content.items() if n > 0), key=lambda k: (order[1][k[1]], order[0][k[0]]))
    groups = [phrase(content[k], *k) for k in keys]
    x = groups[0] if len(groups) == 1 else ", ".join(groups[:-1]) + " and " + groups[-1]
    if template is None:
        template = TEMPLATES[zlib.crc32(x.encode()) % len(TEMPLATES)]
    return template.format(x=x)


_TOKEN = re.compile(r"[a-z]+")


def parse_caption(text: str) -> Counter:
    """The multiset of ``(colour, shape)`` a caption names (empty if it names none).

    Reads every ``[number] colour shape`` phrase (``"two red circles"``, ``"a blue square"``); a
    phrase without a number word counts once. Other words are ignored, so any template parses.
    """
    words = _TOKEN.findall((text or "").lower())
    out: Counter = Counter()
    for i in range(len(words) - 1):
        c, s = words[i], words[i + 1]
        shape = s if s in SHAPES else _PLURAL_TO_SHAPE.get(s)
        if c in COLORS and shape is not None:
            n = _WORD_TO_NUMBER.get(words[i - 1], 1) if i > 0 else 1
            out[(c, shape)] += n
    return out


def caption_correct(text: str, content: Counter) -> bool:
    """True when ``text`` names exactly ``content`` (same colours, shapes and counts)."""
    return bool(content) and parse_caption(text) == content


def attribute_scores(text: str, content: Counter) -> dict[str, bool]:
    """Per-attribute correctness of a caption: ``colors`` (multiset of colours), ``shapes``
    (multiset of shapes), ``count`` (number of objects) and ``exact``."""
    got = parse_caption(text)

    def by(i: int, c: Counter) -> Counter:
        """Multiset of attribute ``i`` (0 colour, 1 shape) of the ``(colour, shape)`` multiset ``c``."""
        out: Counter = Counter()
        for k, n in c.items():
            out[k[i]] += n
        return out

    return {"colors": by(0, got) == by(0, content), "shapes": by(1, got) == by(1, content),
            "count": sum(got.values()) == sum(content.values()), "exact": got == content and bool(content)}


# ------------------------------------------------------------------------------------------------
# the web-noise model
# ------------------------------------------------------------------------------------------------
def applicable(noise: str, content: Counter) -> bool:
    """Whether ``noise`` can be applied to a scene of ``content`` (``partial`` needs >= 2 groups)."""
    return noise != "partial" or len(content) >= 2


def _junk(rng: np.random.Generator) -> str:
    t = _JUNK[int(rng.integers(len(_JUNK)))]
    return t.format(n2=rng.integers(10, 90), n4=rng.integers(1000, 9999), n5=rng.integers(10000, 99999),
                    n6=rng.integers(100000, 999999), L="ABCDEFGH"[int(rng.integers(8))])


def make_noisy(noise: str, content: Counter, rng: np.random.Generator, other: Counter | None = None) -> str:
    """A web caption of type ``noise`` for a scene of ``content``.

    - ``clean``: an exact caption.
    - ``unrelated``: the exact caption of ``other`` (another image's content, must differ).
    - ``wrong_attribute``: one object's colour or shape changed (the hard case).
    - ``wrong_count``: one group's count off by one (1 -> 2, 2 -> 1 or 3, 3 -> 2).
    - ``junk``: boilerplate alt text (file names, shop text, SKUs, "image").
    - ``partial``: correct but names only some of the groups (needs >= 2 groups).

    Raises:
        ValueError: unknown ``noise``, ``unrelated`` without a different ``other``, or ``partial`` on
            a one-group scene.
    """
    if noise == "clean":
        return describe(content, rng)
    if noise == "unrelated":
        if other is None or other == content:
            raise ValueError("unrelated noise needs another scene's different content")
        return describe(other, rng)
    if noise == "junk":
        return _junk(rng)
    items = sorted(content.elements())
    if noise == "wrong_attribute":
        i = int(rng.integers(len(items)))
        c, s = items[i]
        if rng.random() < 0.5:
            c = [x for x in COLORS if x != c][int(rng.integers(len(COLORS) - 1))]
        else:
            s = [x for x in SHAPES if x != s][int(rng.integers(len(SHAPES) - 1))]
        items[i] = (c, s)
        return describe(Counter(items), rng)
    if noise == "wrong_count":
        keys = sorted(content)
        k = keys[int(rng.integers(len(keys)))]
        out = Counter(content)
        n = out[k]
        out[k] = 2 if n in (1, 3) else int(rng.choice([1, 3]))
        return describe(out, rng)
    if noise == "partial":
        keys = sorted(content)
        if len(keys) < 2:
            raise ValueError("partial noise needs a scene with two or more kinds of object")
        m = int(rng.integers(1, len(keys)))
        pick = [keys[i] for i in rng.permutation(len(keys))[:m]]
        return describe(Counter({k: content[k] for k in pick}), rng)
    raise ValueError(f"unknown noise type {noise!r}; one of {', '.join(NOISE_TYPES)}")
