"""Synthetic captioned scenes: the training data of sfumato's built-in model and the ground truth of its
quality benchmark.

A scene is one or two flat shapes (circle, square, triangle, star, ring) of a named colour on a flat
background, each small or large and in one cell of a 3x3 grid. ``render`` draws it at 64x64, supersampled
4x and box-filtered (exact area coverage in integer arithmetic, so a scene gives the same pixels wherever it
is drawn); ``caption`` describes it from varied templates and synonyms and ``parse_caption`` reads a
caption back. ``HELD_OUT`` colour x shape x background combinations are never sampled for training, so the
benchmark can measure composition: every colour, shape and background, and every pair of them, still
appears in training.

The idea follows the synthetic compositional datasets CLEVR (Johnson et al. 2017) and dSprites
(Matthey et al. 2017), at a size a CPU can train on. Colours are told apart in CIELAB (CIE 1976).

``NOVEL_KINDS`` (hexagon, crescent) are drawn the same way (same supersampling, sizes, positions and
jitter) but are not in ``KINDS``: the built-in model's training data never holds them, so teaching it one
from a few examples under a rare word (``caption(..., names={"hexagon": "sks shape"})``) measures
personalisation. Everything that makes training data (``sample_scene``, ``HELD_OUT``, ``dataset``) draws
from ``KINDS`` only, unless a caller asks for other kinds.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "IMAGE_SIZE", "PALETTE", "COLOURS", "BACKGROUNDS", "KINDS", "NOVEL_KINDS", "SIZES", "POSITIONS", "MIN_CONTRAST",
    "Shape", "Scene", "SceneData", "HELD_OUT", "allowed_combos", "contrasts", "to_lab", "render", "caption",
    "describe", "parse_caption", "sample_scene", "make_item", "iter_dataset", "dataset",
]

IMAGE_SIZE = 64
_SS = 4  # supersampling factor: shapes are drawn at 256 px and box-filtered down

# sRGB of every colour name; spaced >= 40 delta-E apart in CIELAB so a nearest-colour analyser separates them
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (245, 215, 30), "green": (35, 160, 60),
    "cyan": (30, 195, 205), "blue": (30, 100, 230), "purple": (140, 40, 170), "pink": (245, 125, 190),
    "brown": (125, 75, 35), "white": (245, 245, 245), "black": (20, 20, 20), "grey": (128, 128, 128),
}
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "brown", "white", "black")
BACKGROUNDS = ("white", "black", "grey", "blue", "yellow", "green")
KINDS = ("circle", "square", "triangle", "star", "ring")  # the built-in model's training shapes
NOVEL_KINDS = ("hexagon", "crescent")  # drawable and recognisable, never in training data (personalisation)
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
MIN_CONTRAST = 45.0  # delta-E between a shape's colour and its background's; closer pairs are never drawn

# geometry, in 64 px units: ``_RADIUS`` is half a shape's extent (its bounding box's longer side)
_RADIUS = {"small": 7.5, "large": 13.0}
_CELL_CENTRE = {"small": (12.0, 32.0, 52.0), "large": (17.0, 32.0, 47.0)}  # large ones stay inside the frame
_JITTER = {"small": 1.5, "large": 1.0}  # max offset from the cell centre, px
_SCALE = (0.9, 1.1)
_RING_HOLE = 0.55  # inner / outer radius
_STAR_INNER = 0.45  # inner / outer radius (a pentagram's is 0.38: fatter arms survive 64 px)
# crescent: a disc of radius r minus a disc of radius _BITE r whose centre is _BITE_OFFSET r to the right; its
# back is (1 + _BITE_OFFSET - _BITE) r = 0.65 r thick (4.4 px at the smallest), the horns meet at x = 0.53 r
_BITE, _BITE_OFFSET = 0.85, 0.5
_ARC_POINTS = 48  # polygon vertices per arc of a crescent


def to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (..., 3) in 0..255 -> CIELAB (..., 3), D65 white."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


_LAB = {name: to_lab(rgb) for name, rgb in PALETTE.items()}


def contrasts(colour: str, background: str) -> bool:
    """Whether a ``colour`` shape stands out clearly enough on a ``background`` to be drawn."""
    return float(np.linalg.norm(_LAB[colour] - _LAB[background])) >= MIN_CONTRAST


def _all_combos(kinds: Iterable[str] = KINDS) -> list[tuple[str, str, str]]:
    kinds = tuple(kinds)
    return [(c, k, b) for b in BACKGROUNDS for c in COLOURS if contrasts(c, b) for k in kinds]


def _held_out() -> frozenset[tuple[str, str, str]]:
    # one combination in eight, picked by a hash of its name: the same set on every machine and Python
    return frozenset(t for t in _all_combos() if hashlib.sha256(" ".join(t).encode()).digest()[0] % 8 == 0)


HELD_OUT: frozenset[tuple[str, str, str]] = _held_out()  # (colour, kind, background) never trained on


def allowed_combos(exclude: Iterable[tuple[str, str, str]] = HELD_OUT, *, kinds: Iterable[str] = KINDS
                   ) -> list[tuple[str, str, str]]:
    """Every drawable (colour, kind, background) of one of ``kinds`` (default: the training shapes) not in
    ``exclude``."""
    skip = set(exclude)
    return [t for t in _all_combos(kinds) if t not in skip]


_TRAIN_COMBOS = allowed_combos(HELD_OUT)


# --- scenes ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """One shape. A parsed caption leaves unknown attributes ``None``; rendering needs them all. ``kind`` is
    one of ``KINDS`` or ``NOVEL_KINDS``."""

    kind: str | None
    colour: str | None
    size: str | None = None
    position: str | None = None
    dx: float = 0.0  # offset from the cell centre, px at 64 (quarter-pixel steps)
    dy: float = 0.0
    scale: float = 1.0  # of the size's nominal extent

    def attributes(self) -> tuple[str | None, str | None, str | None, str | None]:
        return self.kind, self.colour, self.size, self.position


@dataclass(frozen=True)
class Scene:
    """Shapes (drawn in order) on a flat background."""

    shapes: tuple[Shape, ...]
    background: str | None


def _cell(position: str) -> tuple[int, int]:
    i = POSITIONS.index(position)
    return i % 3, i // 3  # (column, row)


def _draw_shape(draw: ImageDraw.ImageDraw, s: Shape, background: tuple[int, int, int]) -> None:
    col, row = _cell(s.position)
    cx = (_CELL_CENTRE[s.size][col] + s.dx) * _SS
    cy = (_CELL_CENTRE[s.size][row] + s.dy) * _SS
    r = _RADIUS[s.size] * s.scale * _SS
    fill = PALETTE[s.colour]

    def box(radius: float) -> list[int]:
        return [round(cx - radius), round(cy - radius), round(cx + radius), round(cy + radius)]

    if s.kind == "circle":
        draw.ellipse(box(r), fill=fill)
    elif s.kind == "ring":
        draw.ellipse(box(r), fill=fill)
        draw.ellipse(box(r * _RING_HOLE), fill=background)
    elif s.kind == "square":
        draw.rectangle(box(0.9 * r), fill=fill)  # 0.9: a square of the circle's extent looks too big
    elif s.kind == "triangle":
        h = 0.9 * r
        draw.polygon([(round(cx), round(cy - h)), (round(cx - r), round(cy + h)), (round(cx + r), round(cy + h))],
                     fill=fill)
    elif s.kind == "hexagon":  # regular, a vertex left and right: 2r wide, sqrt(3) r high
        draw.polygon([(round(cx + r * math.cos(k * math.pi / 3)), round(cy - r * math.sin(k * math.pi / 3)))
                      for k in range(6)], fill=fill)
    elif s.kind == "crescent":  # drawn as one polygon, so it paints no background over anything else
        hx = (_BITE_OFFSET**2 + 1 - _BITE**2) / (2 * _BITE_OFFSET)  # the horns' x, over r, from the disc's centre
        hy = math.sqrt(1 - hx * hx)
        ox = cx + r * (1 - hx) / 2  # its bounding box (-r .. hx r across, 2r high) is centred on the cell
        a = math.atan2(hy, hx)  # the outer arc runs from the top horn round the back to the bottom one
        b = math.atan2(hy, hx - _BITE_OFFSET)  # the bite's arc, from the bottom horn back to the top one
        n = _ARC_POINTS
        outer = [a + (2 * math.pi - 2 * a) * i / n for i in range(n + 1)]
        inner = [2 * math.pi - b - (2 * math.pi - 2 * b) * i / n for i in range(1, n)]
        draw.polygon([(round(ox + r * math.cos(t)), round(cy - r * math.sin(t))) for t in outer]
                     + [(round(ox + r * (_BITE_OFFSET + _BITE * math.cos(t))), round(cy - r * _BITE * math.sin(t)))
                        for t in inner], fill=fill)
    elif s.kind == "star":
        ro = r / math.sin(math.radians(72))  # its width, 2 ro sin 72, is 2r
        cy0 = cy + ro * (1 - math.cos(math.radians(36))) / 2  # centres the bounding box, not the circumcircle
        pts = [(round(cx + (ro if k % 2 == 0 else ro * _STAR_INNER) * math.sin(k * math.pi / 5)),
                round(cy0 - (ro if k % 2 == 0 else ro * _STAR_INNER) * math.cos(k * math.pi / 5))) for k in range(10)]
        draw.polygon(pts, fill=fill)
    else:
        raise ValueError(f"unknown shape kind {s.kind!r}; known: {', '.join(KINDS + NOVEL_KINDS)}")


def render(scene: Scene) -> Image.Image:
    """The scene as a 64x64 RGB image."""
    background = PALETTE[scene.background]
    big = Image.new("RGB", (IMAGE_SIZE * _SS, IMAGE_SIZE * _SS), background)
    draw = ImageDraw.Draw(big)
    for s in scene.shapes:
        _draw_shape(draw, s, background)
    return big.reduce(_SS)


def _jitter(rng: random.Random, size: str) -> tuple[float, float, float]:
    j = _JITTER[size]
    return (round(rng.uniform(-j, j) * _SS) / _SS, round(rng.uniform(-j, j) * _SS) / _SS,
            round(rng.uniform(*_SCALE), 3))


def sample_scene(rng: random.Random, *, exclude: Iterable[tuple[str, str, str]] = HELD_OUT,
                 two_shapes: float = 0.3, kinds: Iterable[str] = KINDS) -> Scene:
    """A random scene of shapes of ``kinds`` (default: the training shapes; e.g. ``NOVEL_KINDS[:1]`` for
    personalisation examples); no shape's (colour, kind, background) is in ``exclude``. With probability
    ``two_shapes`` there are two small shapes of different colours, in cells that are not side by side."""
    kinds = tuple(kinds)
    if kinds == KINDS:  # training data: exactly as before NOVEL_KINDS existed
        combos = allowed_combos(exclude) if exclude is not HELD_OUT else _TRAIN_COMBOS
    else:
        unknown = set(kinds) - set(KINDS + NOVEL_KINDS)
        if not kinds or unknown:
            raise ValueError(f"kinds must be some of {', '.join(KINDS + NOVEL_KINDS)}, got {kinds!r}")
        combos = allowed_combos(exclude, kinds=kinds)
    background = rng.choice(BACKGROUNDS)
    pairs = [(c, k) for c, k, b in combos if b == background]
    if rng.random() < two_shapes:
        first = rng.choice(pairs)
        second = rng.choice([p for p in pairs if p[0] != first[0]])
        p1 = rng.choice(POSITIONS)
        c1, r1 = _cell(p1)
        # side-by-side small shapes could touch; diagonal neighbours are 28 px apart
        p2 = rng.choice([p for p in POSITIONS if abs(_cell(p)[0] - c1) + abs(_cell(p)[1] - r1) >= 2])
        shapes = tuple(Shape(k, c, "small", p, *_jitter(rng, "small")) for (c, k), p in ((first, p1), (second, p2)))
    else:
        colour, kind = rng.choice(pairs)
        size = rng.choice(SIZES)
        shapes = (Shape(kind, colour, size, rng.choice(POSITIONS), *_jitter(rng, size)),)
    return Scene(shapes, background)


# --- captions -------------------------------------------------------------------------------------

_KIND_WORDS = {"circle": ("circle", "circle", "disc", "dot"), "square": ("square", "square", "box"),
               "triangle": ("triangle",), "star": ("star",), "ring": ("ring", "ring", "donut"),
               "hexagon": ("hexagon",), "crescent": ("crescent", "crescent", "moon")}  # the last two: NOVEL_KINDS
_SIZE_WORDS = {"small": ("small", "small", "little", "tiny"), "large": ("large", "large", "big")}
_COLOUR_WORDS = {**{c: (c,) for c in PALETTE}, "grey": ("grey", "gray"), "purple": ("purple", "purple", "violet")}
_POSITION_WORDS = {
    "centre": ("in the centre", "in the center", "in the middle", "at the centre", "in the middle of the image"),
    "top": ("at the top", "near the top", "at the top centre", "at the top of the image"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom centre", "at the bottom of the image"),
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    **{f"{v} {h}": (f"in the {v} {h} corner", f"in the {u} {h} corner", f"at the {v} {h}", f"in the {v}-{h} corner",
                    f"{v} {h}")
       for v, u in (("top", "upper"), ("bottom", "lower")) for h in ("left", "right")},
}
_BG_AFTER = ("on a {} background", "on {}", "against a {} background", "with a {} background", ", {} background")
_PREFIXES = ("a picture of", "an image of", "a drawing of", "a simple illustration of")
P_NO_SIZE, P_NO_POSITION, P_NO_BACKGROUND = 0.25, 0.2, 0.2  # how often a caption leaves an attribute out


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _kind_word(kind: str, names: Mapping[str, str] | None, word: str | None = None) -> str:
    """``names[kind]`` when the caller renames the kind (e.g. a rare token), else ``word`` or the kind."""
    if names and kind in names:
        return names[kind]
    return word if word is not None else kind


def _shape_phrase(s: Shape, rng: random.Random, size: bool, position: bool,
                  names: Mapping[str, str] | None = None) -> str:
    words = [rng.choice(_SIZE_WORDS[s.size])] if size else []
    colour = rng.choice(_COLOUR_WORDS[s.colour])
    words += [colour, _kind_word(s.kind, names, rng.choice(_KIND_WORDS[s.kind]))]  # the same draws either way
    phrase = _article(" ".join(words))
    return f"{phrase} {rng.choice(_POSITION_WORDS[s.position])}" if position else phrase


def caption(scene: Scene, rng: random.Random, *, names: Mapping[str, str] | None = None) -> str:
    """A caption of ``scene`` from varied templates and synonyms; colour and kind are always named, size,
    position and background are sometimes left out. ``names`` maps a kind to the word or phrase to call it
    instead of its own words (``{"hexagon": "sks shape"}``: a rare token for personalisation); it changes
    only that word, not which template is drawn, so the same ``rng`` state gives the same caption otherwise."""
    size = rng.random() >= P_NO_SIZE
    position = rng.random() >= P_NO_POSITION
    bg = rng.choice(_COLOUR_WORDS[scene.background]) if rng.random() >= P_NO_BACKGROUND else None
    body = " and ".join(_shape_phrase(s, rng, size, position, names) for s in scene.shapes)
    form = rng.randrange(4)
    if form == 2:
        body = ("two shapes: " if len(scene.shapes) > 1 else rng.choice(_PREFIXES) + " ") + body
    elif form == 3 and len(scene.shapes) == 1:
        body = body.split(" ", 1)[1]  # "small blue box in the top left corner"
    if bg is None:
        return body
    if form == 1:
        return f"{bg} background with {body}"
    after = ", {} background" if form == 3 else rng.choice(_BG_AFTER)
    return body + ("" if after.startswith(",") else " ") + after.format(bg)


def describe(scene: Scene, *, names: Mapping[str, str] | None = None) -> str:
    """The canonical caption of a one-shape scene (the benchmark's prompt), e.g.
    "a large purple triangle at the bottom, grey background"; ``names`` renames kinds as in :func:`caption`
    (``describe(scene, names={"hexagon": "sks shape"})`` -> "a large purple sks shape at the bottom, ...")."""
    (s,) = scene.shapes
    kind = _kind_word(s.kind, names)
    return f"{_article(f'{s.size} {s.colour} {kind}')} {_POSITION_WORDS[s.position][0]}, {scene.background} background"


def _lookup(table: dict[str, tuple[str, ...]]) -> dict[str, str]:
    return {w: name for name, words in table.items() for w in words}


_COLOUR_OF, _KIND_OF, _SIZE_OF = _lookup(_COLOUR_WORDS), _lookup(_KIND_WORDS), _lookup(_SIZE_WORDS)
_COLOUR_RE = "|".join(sorted(_COLOUR_OF, key=len, reverse=True))
_BG_RE = re.compile(rf"(?:(?:on|against|with)\s+(?:an?\s+)?)?\b({_COLOUR_RE})\s+background\b|\bon\s+({_COLOUR_RE})\b")


def _position(words: list[str]) -> str | None:
    v = "top" if {"top", "upper"} & set(words) else "bottom" if {"bottom", "lower"} & set(words) else None
    h = "left" if "left" in words else "right" if "right" in words else None
    if v and h:
        return f"{v} {h}"
    if v or h:
        return v or h
    return "centre" if {"centre", "center", "middle"} & set(words) else None


def parse_caption(text: str, *, names: Mapping[str, str] | None = None) -> Scene:
    """Read a caption back into a partial :class:`Scene`: what the caption does not say is ``None``.
    ``names``: the kinds renamed in :func:`caption`, whose words are read as those kinds."""
    t = text.lower().replace("-", " ")
    for kind, word in (names or {}).items():
        t = re.sub(rf"(?<![a-z]){re.escape(word.lower().replace('-', ' '))}(?![a-z])", f" {kind} ", t)
    background = None
    m = _BG_RE.search(t)
    if m:
        background = _COLOUR_OF[m.group(1) or m.group(2)]
        t = t[:m.start()] + " " + t[m.end():]
    shapes = []
    for part in re.split(r"\band\b", t):
        words = re.findall(r"[a-z]+", part)
        kind = next((_KIND_OF[w] for w in words if w in _KIND_OF), None)
        if kind is None:
            continue
        shapes.append(Shape(kind, next((_COLOUR_OF[w] for w in words if w in _COLOUR_OF), None),
                            next((_SIZE_OF[w] for w in words if w in _SIZE_OF), None), _position(words)))
    return Scene(tuple(shapes), background)


# --- datasets -------------------------------------------------------------------------------------

@dataclass
class SceneData:
    """``images``: (N, 64, 64, 3) uint8; one caption and one scene per image."""

    images: np.ndarray
    captions: list[str] = field(default_factory=list)
    scenes: list[Scene] = field(default_factory=list)


def make_item(seed: int, index: int, *, exclude: Iterable[tuple[str, str, str]] = HELD_OUT
              ) -> tuple[np.ndarray, str, Scene]:
    """Item ``index`` of the dataset ``seed``: (64, 64, 3) uint8 image, caption, scene. Each item has its own
    generator, so items can be made in any order, on any number of processes, with the same result."""
    if seed < 0 or not 0 <= index < 2**32:
        raise ValueError(f"seed must be >= 0 and index in [0, 2**32), got seed={seed}, index={index}")
    rng = random.Random((seed << 32) | index)
    scene = sample_scene(rng, exclude=exclude)
    return np.asarray(render(scene)), caption(scene, rng), scene


def iter_dataset(n: int, seed: int, *, start: int = 0) -> Iterator[tuple[np.ndarray, str, Scene]]:
    """Items ``start .. start + n - 1`` of the dataset ``seed``, one at a time."""
    for i in range(start, start + n):
        yield make_item(seed, i)


def _chunk(args: tuple[int, int, int]) -> SceneData:
    seed, start, n = args
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    data = SceneData(images)
    for j, (image, text, scene) in enumerate(iter_dataset(n, seed, start=start)):
        images[j] = image
        data.captions.append(text)
        data.scenes.append(scene)
    return data


def dataset(n: int, seed: int, *, workers: int | None = None) -> SceneData:
    """The first ``n`` items of the dataset ``seed`` in memory (12 KiB an image), made on ``workers``
    processes (default: every CPU); the result does not depend on ``workers``."""
    workers = workers or os.cpu_count() or 1
    step = 2048
    jobs = [(seed, s, min(step, n - s)) for s in range(0, n, step)]
    if workers == 1 or len(jobs) == 1:
        parts = [_chunk(j) for j in jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_chunk, jobs))
    images = np.concatenate([p.images for p in parts]) if parts else np.empty((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return SceneData(images, [c for p in parts for c in p.captions], [s for p in parts for s in p.scenes])
