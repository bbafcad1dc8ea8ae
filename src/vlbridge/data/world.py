"""The embedded synthetic vision-language world: coloured shapes on a noisy dark background.

Every image holds 1 to ``max_objects`` objects, each a (shape, colour, size) placed in its own cell of a 3x3 grid,
so objects never overlap and every object has a position word pair (``left``/``centre``/``right``,
``top``/``middle``/``bottom``). Each image comes with several reference captions from a small grammar, a
canonical list of facts, and VQA questions of seven kinds whose answers follow from those facts.

Some (shape, colour) pairs are held out: they never appear, in pixels or in text, in the train / val / test
splits, and every image of the ``compositional`` split contains at least one of them. A model that learnt
"red" and "star" separately should still describe a red star.

Everything is a pure function of ``WorldConfig``: image ``i`` of a split is drawn from a random generator seeded by
``(seed, split, i)``, so the same config writes byte-identical files. The vocabulary is small, lowercase and has no
punctuation, so ``text.split()`` tokenises every caption, question and answer.

Layout written by :func:`generate_world`::

    out_dir/
      images/{train,val,test,compositional}/000123.png
      captions_train.jsonl          one record per caption: {"image", "caption", "image_id", "objects"}
      captions_{val,test,compositional}.jsonl
                                    one record per image: {"image", "caption", "captions", "image_id", "objects"}
      vqa_{train,val,test,compositional}.jsonl
                                    {"image", "question", "answers" (10 copies), "question_type", "image_id",
                                     "question_id", "focus" (the facts of the objects the answer depends on)}
      world.json                    the config, held-out pairs and content hashes; written last, so its presence
                                    means the world is complete
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from vlbridge.errors import ConfigError
from vlbridge.utils.io import write_bytes

# ----------------------------------------------------------------------------------------------------------------------
# The world's vocabulary of facts

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
    "diamond": "diamonds",
}
# Saturated, well separated hues that stay visible on a dark background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 100, 255),
    "yellow": (245, 225, 40),
    "purple": (165, 60, 225),
    "orange": (255, 140, 20),
    "cyan": (40, 220, 230),
    "white": (240, 240, 240),
}
SIZES: tuple[str, ...] = ("small", "medium", "large")
COLUMNS: tuple[str, ...] = ("left", "centre", "right")  # the `x` of an object
ROWS: tuple[str, ...] = ("top", "middle", "bottom")  # the `y` of an object
SPLITS: tuple[str, ...] = ("train", "val", "test", "compositional")

# Half-extent of an object as a fraction of half a grid cell: sizes grow 1 : 1.5 : 2.
_SIZE_FRACTION = {"small": 0.42, "medium": 0.63, "large": 0.84}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_FORMAT_VERSION = 2
_VQA_ANSWER_COPIES = 10  # VQA v2 stores ten human answers per question


# ----------------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class WorldConfig:
    """Everything that determines a world; the same config always writes the same bytes.

    Attributes:
        seed: Seed for the held-out pairs and for every image.
        image_size: Side of the square images in pixels.
        n_train: Number of training images (each gives ``captions_per_image`` caption records).
        n_val: Number of validation images.
        n_test: Number of in-distribution test images.
        n_compositional: Number of test images that each contain at least one held-out (shape, colour) pair.
        max_objects: Objects per image are drawn uniformly from ``1..max_objects`` (at most 9, one per grid cell).
        captions_per_image: Distinct reference captions per image.
        held_out_fraction: Fraction of all (shape, colour) pairs to hold out when ``held_out_combinations`` is None.
        held_out_combinations: Explicit (shape, colour) pairs to hold out; None picks them from the seed
            (see :meth:`held_out_pairs`).
    """

    seed: int = 0
    image_size: int = 64  # small, so the whole recipe trains on a CPU
    n_train: int = 4000
    n_val: int = 200
    n_test: int = 400
    n_compositional: int = 400
    max_objects: int = 3
    captions_per_image: int = 5  # as many as COCO
    held_out_fraction: float = 0.15
    held_out_combinations: tuple[tuple[str, str], ...] | None = None

    def __post_init__(self) -> None:
        if self.held_out_combinations is not None:  # YAML and JSON give lists of lists
            self.held_out_combinations = tuple((str(s), str(c)) for s, c in self.held_out_combinations)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError if a field is out of range."""
        if self.image_size < 16:
            raise ConfigError(f"world.image_size must be at least 16, got {self.image_size}")
        for name in ("n_train", "n_val", "n_test", "n_compositional"):
            if getattr(self, name) < 0:
                raise ConfigError(f"world.{name} must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.max_objects <= 9:
            raise ConfigError(f"world.max_objects must be in 1..9 (one object per grid cell), got {self.max_objects}")
        if not 1 <= self.captions_per_image <= 20:
            raise ConfigError(f"world.captions_per_image must be in 1..20, got {self.captions_per_image}")
        if not 0.0 <= self.held_out_fraction <= 0.5:
            raise ConfigError(f"world.held_out_fraction must be in [0, 0.5], got {self.held_out_fraction}")
        for shape, colour in self.held_out_combinations or ():
            if shape not in SHAPES or colour not in COLOURS:
                raise ConfigError(f"world.held_out_combinations: unknown (shape, colour) pair ({shape!r}, {colour!r})")
        held_out = self.held_out_pairs()
        if self.n_compositional > 0 and not held_out:
            raise ConfigError("world.n_compositional > 0 needs at least one held-out (shape, colour) pair")
        seen = {pair for pair in _all_pairs() if pair not in held_out}
        if {s for s, _ in seen} != set(SHAPES) or {c for _, c in seen} != set(COLOURS):
            raise ConfigError("world.held_out_combinations must leave every shape and every colour in training")

    def held_out_pairs(self) -> tuple[tuple[str, str], ...]:
        """The (shape, colour) pairs kept out of train / val / test, sorted.

        Unless given explicitly they are drawn from the seed, spread so that no colour loses more than
        ``ceil(k / n_colours)`` of its shapes and no shape more than ``ceil(k / n_shapes)`` of its colours: every
        shape and every colour stays well represented in training.
        """
        if self.held_out_combinations is not None:
            return tuple(sorted(set(self.held_out_combinations)))
        pairs = _all_pairs()
        k = round(self.held_out_fraction * len(pairs))
        shape_cap, colour_cap = math.ceil(k / len(SHAPES)), math.ceil(k / len(COLOURS))
        rng = random.Random(_derive_seed(self.seed, "held-out"))
        rng.shuffle(pairs)
        chosen: list[tuple[str, str]] = []
        for shape, colour in pairs:
            if len(chosen) == k:
                break
            if sum(s == shape for s, _ in chosen) < shape_cap and sum(c == colour for _, c in chosen) < colour_cap:
                chosen.append((shape, colour))
        return tuple(sorted(chosen))


def _all_pairs() -> list[tuple[str, str]]:
    return [(shape, colour) for shape in SHAPES for colour in COLOURS]


def _derive_seed(*parts: object) -> int:
    """A 64-bit seed from any parts, stable across processes and platforms (unlike `hash`)."""
    digest = hashlib.sha256(":".join(["vlbridge-world", *map(str, parts)]).encode()).digest()
    return int.from_bytes(digest[:8], "little")


# ----------------------------------------------------------------------------------------------------------------------
# Scenes: which objects, where


@dataclass(frozen=True)
class WorldObject:
    """One object of a scene: its facts, and where it is drawn (pixel centre and half-extent)."""

    shape: str
    colour: str
    size: str
    x: str  # column word: left / centre / right
    y: str  # row word: top / middle / bottom
    cx: float
    cy: float
    radius: float

    def facts(self) -> dict[str, str]:
        """The canonical facts written to the manifests."""
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "x": self.x, "y": self.y}


def _sample_scene(
    rng: random.Random,
    config: WorldConfig,
    allowed: list[tuple[str, str]],
    required: list[tuple[str, str]],
) -> list[WorldObject]:
    """Draw 1..max_objects objects, each in its own grid cell and with a distinct (shape, colour) pair.

    Distinct pairs make "the red circle" a unique reference. ``required`` (the held-out pairs, for the compositional
    split) contributes one object; the rest come from ``allowed``.
    """
    n = rng.randint(1, config.max_objects)
    pairs = [rng.choice(required)] if required else []
    while len(pairs) < n:
        pair = rng.choice(allowed)
        if pair not in pairs:
            pairs.append(pair)
    cell = config.image_size / 3
    objects = []
    for (shape, colour), index in zip(pairs, rng.sample(range(9), n)):
        row, col = divmod(index, 3)
        size = rng.choice(SIZES)
        radius = _SIZE_FRACTION[size] * cell / 2
        slack = max(0.0, cell / 2 - radius - 0.5)  # jitter inside the cell, never into a neighbour
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        objects.append(WorldObject(shape, colour, size, COLUMNS[col], ROWS[row], cx, cy, radius))
    return sorted(objects, key=lambda o: (ROWS.index(o.y), COLUMNS.index(o.x)))  # reading order


# ----------------------------------------------------------------------------------------------------------------------
# Rendering: draw at 2x, downsample with LANCZOS for anti-aliased edges, then add sensor-like noise


def _render(objects: list[WorldObject], image_size: int, rng: random.Random, noise_rng: np.random.Generator) -> bytes:
    """Render a scene to PNG bytes."""
    side = 2 * image_size
    # Background: a random dark tint with a gentle linear gradient and a few faint lines, so it is not flat.
    tint = np.array([rng.randint(15, 70) for _ in range(3)], dtype=np.float32)
    angle, strength = rng.uniform(0, 2 * math.pi), rng.uniform(5, 25)
    ramp = np.linspace(-0.5, 0.5, side, dtype=np.float32)
    gradient = strength * (math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None])  # (side, side)
    background = np.clip(tint + gradient[..., None], 0, 255).astype(np.uint8)  # (side, side, 3)
    canvas = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.randint(1, 3)):
        light = tuple(int(min(255, t + rng.randint(25, 55))) for t in tint)
        ends = [(rng.uniform(0, side), rng.uniform(0, side)) for _ in range(2)]
        draw.line(ends, fill=light, width=rng.choice((1, 2)))
    for obj in objects:
        fill = tuple(max(0, min(255, v + rng.randint(-12, 12))) for v in COLOURS[obj.colour])
        _draw_shape(draw, obj.shape, 2 * obj.cx, 2 * obj.cy, 2 * obj.radius, fill)
    image = canvas.resize((image_size, image_size), Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + noise_rng.normal(0.0, rng.uniform(3.0, 8.0), size=pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, fill: tuple[int, ...]) -> None:
    """Draw one filled shape centred at (x, y) that fits in a circle of radius r."""
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        h = 0.82 * r  # a square of half-side r looks much bigger than a circle of radius r
        draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + 0.95 * r, y + 0.75 * r), (x - 0.95 * r, y + 0.75 * r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(x, y - r), (x + 0.7 * r, y), (x, y + r), (x - 0.7 * r, y)], fill=fill)
    elif shape == "star":
        points = []
        for k in range(10):  # five outer tips, five inner corners
            radius, theta = (r if k % 2 == 0 else 0.45 * r), -math.pi / 2 + k * math.pi / 5
            points.append((x + radius * math.cos(theta), y + radius * math.sin(theta)))
        draw.polygon(points, fill=fill)
    elif shape == "cross":
        w = 0.34 * r
        draw.rectangle((x - r, y - w, x + r, y + w), fill=fill)
        draw.rectangle((x - w, y - r, x + w, y + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Captions: a small grammar with several phrasings of the same facts

# Frames around the list of noun phrases. {list}: "a red circle and a small blue square at the top";
# {be}: is / are; {count}: one / two / ...; {noun}: object / objects.
_CAPTION_FRAMES: tuple[str, ...] = (
    "there is {list}",
    "an image showing {list}",
    "an image with {list}",
    "a picture of {list}",
    "{count} {noun} which {be} {list}",
    "{list} on a dark background",
    "a scene with {list}",
    "a dark background with {list}",
)
_RELATION_FRAME = "{a} {relation} {b}"  # only for scenes of two or more objects
_CAPTION_RELATIONS = ("to the left of", "to the right of", "above", "below")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _location_phrase(obj: WorldObject, rng: random.Random | None) -> str:
    """Where an object is, as a caption says it; the first phrasing when rng is None."""
    if obj.x == "centre" and obj.y == "middle":
        options = ["in the centre", "in the middle"]
    elif obj.y == "middle":
        options = [f"on the {obj.x}"]
    elif obj.x == "centre":
        options = [f"at the {obj.y}"]
    else:
        options = [f"at the {obj.y} {obj.x}", f"in the {obj.y} {obj.x} corner"]
    return options[0] if rng is None else rng.choice(options)


def _noun_phrase(obj: WorldObject, *, size: bool, location: bool, rng: random.Random | None) -> str:
    """E.g. "a small red circle at the top left": [size] colour shape [location]."""
    words = [obj.size, obj.colour, obj.shape] if size else [obj.colour, obj.shape]
    phrase = " ".join([_article(words[0]), *words])
    return f"{phrase} {_location_phrase(obj, rng)}" if location else phrase


def _join(phrases: list[str]) -> str:
    return " and ".join(phrases)


def _canonical_caption(objects: list[WorldObject]) -> str:
    """The first reference caption: every object with size and location, in reading order."""
    return _join([_noun_phrase(o, size=True, location=True, rng=None) for o in objects])


def _framed_caption(frame: str, objects: list[WorldObject], rng: random.Random) -> str:
    """Fill one frame with the objects in a random order, each with or without its size and location."""
    order = rng.sample(objects, len(objects))
    phrases = [_noun_phrase(o, size=rng.random() < 0.5, location=rng.random() < 0.4, rng=rng) for o in order]
    n = len(objects)
    return frame.format(
        list=_join(phrases),
        be="is" if n == 1 else "are",
        count=_NUMBER_WORDS[n],
        noun="object" if n == 1 else "objects",
    )


def _relation_caption(objects: list[WorldObject], rng: random.Random) -> str:
    """E.g. "a red circle to the left of a blue square and a green star"."""
    a, b, *rest = rng.sample(objects, len(objects))
    dx = COLUMNS.index(a.x) - COLUMNS.index(b.x)
    dy = ROWS.index(a.y) - ROWS.index(b.y)
    options = []
    if dx:
        options.append("to the left of" if dx < 0 else "to the right of")
    if dy:
        options.append("above" if dy < 0 else "below")
    phrases = [_noun_phrase(o, size=rng.random() < 0.5, location=False, rng=rng) for o in (a, b)]
    caption = _RELATION_FRAME.format(a=phrases[0], relation=rng.choice(options), b=phrases[1])
    if rest:
        caption += " and " + _join([_noun_phrase(o, size=rng.random() < 0.5, location=False, rng=rng) for o in rest])
    return caption


def _captions(objects: list[WorldObject], count: int, rng: random.Random) -> list[str]:
    """``count`` distinct captions: the canonical one first, then one per frame in random order."""
    captions = [_canonical_caption(objects)]
    frames: list[str | None] = list(_CAPTION_FRAMES) + ([None] if len(objects) > 1 else [])  # None: relation
    rng.shuffle(frames)
    attempts = 0
    while len(captions) < count and attempts < 50 * count:
        frame = frames[attempts % len(frames)]
        caption = _relation_caption(objects, rng) if frame is None else _framed_caption(frame, objects, rng)
        if caption not in captions:
            captions.append(caption)
        attempts += 1
    return captions


# ----------------------------------------------------------------------------------------------------------------------
# VQA: seven kinds of question, each answerable from the facts and never ambiguous

_QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("what colour is {ref}", "what is the colour of {ref}"),
    "shape": ("what shape is {ref}", "what is the shape of {ref}"),
    "count_all": ("how many objects are there", "how many objects are in the image"),
    "count_shape": ("how many {plural} are there", "how many {plural} are in the image"),
    "count_colour": ("how many {colour} objects are there",),
    "column": ("which column is {ref} in", "in which column is {ref}"),
    "row": ("which row is {ref} in", "in which row is {ref}"),
    "relation": ("is {a} {relation} {b}",),
    "exist": ("is there {np}", "is there {np} in the image", "does the image contain {np}"),
    "size": ("what size is {ref}", "how big is {ref}"),
}
QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "count", "position", "relation", "exist", "size")

# Referring expressions: "the" [size] [colour] (shape | "object") [row phrase] [column phrase].
_ROW_PHRASES = {"top": "at the top", "middle": "in the middle row", "bottom": "at the bottom"}
_COLUMN_PHRASES = {"left": "on the left", "centre": "in the centre column", "right": "on the right"}
# Candidate attribute sets, shortest first. Distinct cells make ("y", "x") always unique, so one always fits.
_REFERENCE_ATTRIBUTES: tuple[tuple[str, ...], ...] = (
    ("shape",),
    ("colour",),
    ("size", "shape"),
    ("colour", "shape"),
    ("size", "colour"),
    ("shape", "x"),
    ("shape", "y"),
    ("colour", "x"),
    ("colour", "y"),
    ("size", "colour", "shape"),
    ("shape", "y", "x"),
    ("colour", "y", "x"),
    ("y", "x"),
)
# Relations between two objects: (phrase, axis, sign of index(a) - index(b) that makes it true).
_QUESTION_RELATIONS = (
    ("left of", "x", -1),
    ("to the left of", "x", -1),
    ("right of", "x", 1),
    ("to the right of", "x", 1),
    ("above", "y", -1),
    ("below", "y", 1),
)


def _refer(target: WorldObject, objects: list[WorldObject], exclude: set[str]) -> str | None:
    """The shortest "the ..." expression that picks out ``target`` alone, without the attributes in ``exclude``."""
    for attributes in _REFERENCE_ATTRIBUTES:
        if exclude.intersection(attributes):
            continue
        matches = [o for o in objects if all(getattr(o, a) == getattr(target, a) for a in attributes)]
        if len(matches) == 1:
            words = ["the"]
            words += [target.size] if "size" in attributes else []
            words += [target.colour] if "colour" in attributes else []
            words.append(target.shape if "shape" in attributes else "object")
            words += [_ROW_PHRASES[target.y]] if "y" in attributes else []
            words += [_COLUMN_PHRASES[target.x]] if "x" in attributes else []
            return " ".join(words)
    return None


def _questions(
    objects: list[WorldObject],
    rng: random.Random,
    pairs: list[tuple[str, str]],
    focus: list[WorldObject],
) -> list[tuple[str, str, str, list[WorldObject]]]:
    """One question of each kind that fits the scene, as (question_type, question, answer, relevant objects).

    The relevant objects are those the answer depends on: the one referred to, the ones counted, the two compared,
    the one whose existence is asked about (none when the answer is "no").

    Args:
        objects: The scene.
        rng: The image's generator.
        pairs: (shape, colour) pairs the split may mention (absent pairs for "is there ..." come from here).
        focus: Objects to ask about when there is a choice (the held-out ones in the compositional split).
    """

    def pick(kind: str) -> str:
        return rng.choice(_QUESTION_TEMPLATES[kind])

    def target() -> WorldObject:
        return rng.choice(focus or objects)

    out: list[tuple[str, str, str, list[WorldObject]]] = []

    obj = target()
    if ref := _refer(obj, objects, {"colour"}):
        out.append(("colour", pick("colour").format(ref=ref), obj.colour, [obj]))

    obj = target()
    if ref := _refer(obj, objects, {"shape"}):
        out.append(("shape", pick("shape").format(ref=ref), obj.shape, [obj]))

    kind = rng.choice(("count_all", "count_all", "count_shape", "count_colour"))
    if kind == "count_all":
        out.append(("count", pick(kind), str(len(objects)), list(objects)))
    elif kind == "count_shape":  # sometimes a shape that is absent: the answer is "0"
        shape = rng.choice([o.shape for o in objects]) if rng.random() < 0.7 else rng.choice(SHAPES)
        counted = [o for o in objects if o.shape == shape]
        out.append(("count", pick(kind).format(plural=SHAPE_PLURALS[shape]), str(len(counted)), counted))
    else:
        colour = rng.choice([o.colour for o in objects]) if rng.random() < 0.7 else rng.choice(list(COLOURS))
        counted = [o for o in objects if o.colour == colour]
        out.append(("count", pick(kind).format(colour=colour), str(len(counted)), counted))

    obj = target()
    if ref := _refer(obj, objects, {"x", "y"}):
        if rng.random() < 0.5:
            out.append(("position", pick("column").format(ref=ref), obj.x, [obj]))
        else:
            out.append(("position", pick("row").format(ref=ref), obj.y, [obj]))

    if len(objects) > 1:  # a yes/no relation, the answer drawn first so yes and no are balanced
        a = target()
        b = rng.choice([o for o in objects if o is not a])
        offsets = {"x": COLUMNS.index(a.x) - COLUMNS.index(b.x), "y": ROWS.index(a.y) - ROWS.index(b.y)}
        want = rng.random() < 0.5
        options = [
            phrase
            for phrase, axis, sign in _QUESTION_RELATIONS
            if offsets[axis] != 0 and (offsets[axis] * sign > 0) == want
        ]
        ref_a, ref_b = _refer(a, objects, {"x", "y"}), _refer(b, objects, {"x", "y"})
        if ref_a and ref_b:
            question = pick("relation").format(a=ref_a, relation=rng.choice(options), b=ref_b)
            out.append(("relation", question, "yes" if want else "no", [a, b]))

    present = {(o.shape, o.colour) for o in objects}
    absent = [p for p in pairs if p not in present]
    # Hard negatives first: an absent pair that shares its shape or its colour with an object in the image.
    near = [p for p in absent if any(p[0] == s or p[1] == c for s, c in present)]
    if rng.random() < 0.5 and absent:
        shape, colour = rng.choice(near or absent)
        answer, relevant = "no", []
    else:
        obj = target()
        shape, colour, answer, relevant = obj.shape, obj.colour, "yes", [obj]
    noun_phrase = f"{_article(colour)} {colour} {shape}"
    out.append(("exist", pick("exist").format(np=noun_phrase), answer, relevant))

    obj = target()
    if ref := _refer(obj, objects, {"size"}):
        out.append(("size", pick("size").format(ref=ref), obj.size, [obj]))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Reading facts back out of text, to score generated captions


def _lookup() -> tuple[dict[str, str], set[str], set[str]]:
    shapes = {s: s for s in SHAPES} | {p: s for s, p in SHAPE_PLURALS.items()}
    return shapes, set(COLOURS), set(SIZES)


_SHAPE_WORDS, _COLOUR_WORDS, _SIZE_WORDS = _lookup()
_STRIP = string.punctuation


def caption_facts(text: str) -> set[tuple[str | None, str, str]]:
    """The (size or None, colour, shape) mentions in a caption: every shape word right after a colour word.

    Tolerant of case and punctuation, so it also reads captions generated by a model.

    >>> caption_facts("A small red circle, and a blue square at the top.") == {
    ...     ("small", "red", "circle"), (None, "blue", "square")}
    True
    """
    tokens = [t.strip(_STRIP) for t in text.lower().split()]
    facts = set()
    for i, token in enumerate(tokens):
        shape = _SHAPE_WORDS.get(token)
        if shape is None or i == 0 or tokens[i - 1] not in _COLOUR_WORDS:
            continue
        size = tokens[i - 2] if i >= 2 and tokens[i - 2] in _SIZE_WORDS else None
        facts.add((size, tokens[i - 1], shape))
    return facts


def fact_accuracy(pred_caption: str, objects: Iterable[Mapping[str, Any] | WorldObject]) -> float:
    """F1 between the (colour, shape) pairs a caption mentions and those in the image.

    Args:
        pred_caption: A generated (or reference) caption.
        objects: The image's facts: manifest ``"objects"`` dicts or :class:`WorldObject` s.

    Returns:
        F1 in [0, 1]; 1.0 when both sets are empty.
    """
    truth = {(o["colour"], o["shape"]) if isinstance(o, Mapping) else (o.colour, o.shape) for o in objects}
    predicted = {(colour, shape) for _, colour, shape in caption_facts(pred_caption)}
    if not truth and not predicted:
        return 1.0
    hits = len(truth & predicted)
    if hits == 0:
        return 0.0
    precision, recall = hits / len(predicted), hits / len(truth)
    return 2 * precision * recall / (precision + recall)


def world_vocabulary() -> list[str]:
    """Every word that captions, questions and answers can use, sorted (for training a tokenizer)."""
    texts: list[str] = [*SHAPES, *SHAPE_PLURALS.values(), *COLOURS, *SIZES, *COLUMNS, *ROWS, *_NUMBER_WORDS]
    texts += [str(d) for d in range(10)] + ["yes", "no", "a", "an", "the", "and", "object", "objects", "is", "are"]
    texts += [*_CAPTION_FRAMES, _RELATION_FRAME, *_CAPTION_RELATIONS, "in the middle", "corner"]
    texts += [t for templates in _QUESTION_TEMPLATES.values() for t in templates]
    texts += [*_ROW_PHRASES.values(), *_COLUMN_PHRASES.values(), *(p for p, _, _ in _QUESTION_RELATIONS)]
    words = set()
    for text in texts:
        words.update(re.sub(r"\{\w+\}", " ", text).split())
    return sorted(words)


# ----------------------------------------------------------------------------------------------------------------------
# Writing a world to disk


def _manifest_names() -> dict[str, str]:
    """{returned key: file name}: the caption manifest under the split's name, the VQA one under vqa_<split>."""
    names = {split: f"captions_{split}.jsonl" for split in SPLITS}
    names |= {f"vqa_{split}": f"vqa_{split}.jsonl" for split in SPLITS}
    return names


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_complete(out_dir: Path, config: WorldConfig) -> bool:
    """Whether ``out_dir`` holds a finished world for exactly this config, with its manifests unchanged."""
    try:
        meta = json.loads((out_dir / "world.json").read_text())
    except (OSError, ValueError):
        return False
    if meta.get("format_version") != _FORMAT_VERSION or meta.get("config") != json.loads(json.dumps(asdict(config))):
        return False
    for name, digest in meta.get("manifest_sha256", {}).items():
        path = out_dir / name
        if not path.is_file() or _sha256(path) != digest:
            return False
    for split in SPLITS:
        folder = out_dir / "images" / split
        count = sum(1 for _ in folder.glob("*.png")) if folder.is_dir() else 0
        if count != getattr(config, f"n_{split}"):
            return False
    return len(meta.get("manifest_sha256", {})) == len(_manifest_names())


def _make_example(
    config: WorldConfig, split: str, index: int, held_out: list[tuple[str, str]]
) -> tuple[bytes, list[dict[str, Any]], list[dict[str, Any]]]:
    """Image ``index`` of ``split``: its PNG bytes, caption manifest records and VQA manifest records."""
    seed = _derive_seed(config.seed, split, index)
    rng = random.Random(seed)
    if split == "compositional":  # one held-out object, the rest anything; questions mostly about the held-out ones
        pairs, required = _all_pairs(), held_out
    else:  # held-out pairs are never drawn, nor named in a caption or question
        pairs, required = [p for p in _all_pairs() if p not in held_out], []
    objects = _sample_scene(rng, config, pairs, required)
    png = _render(objects, config.image_size, rng, np.random.default_rng(seed))

    image, image_id = f"images/{split}/{index:06d}.png", f"{split}-{index:06d}"
    facts = [o.facts() for o in objects]
    captions = _captions(objects, config.captions_per_image, rng)
    if split == "train":  # one record per caption, as a training set wants
        caption_records = [{"image": image, "caption": c, "image_id": image_id, "objects": facts} for c in captions]
    else:  # one record per image with every reference, as caption metrics want
        caption_records = [
            {"image": image, "caption": captions[0], "captions": captions, "image_id": image_id, "objects": facts}
        ]
    focus = [o for o in objects if (o.shape, o.colour) in required]
    vqa_records = [
        {
            "image": image,
            "question": question,
            "answers": [answer] * _VQA_ANSWER_COPIES,
            "question_type": kind,
            "image_id": image_id,
            "question_id": f"{image_id}-{k}",
            "focus": [o.facts() for o in relevant],
        }
        for k, (kind, question, answer, relevant) in enumerate(_questions(objects, rng, pairs, focus))
    ]
    return png, caption_records, vqa_records


def generate_world(out_dir: str | Path, config: WorldConfig | None = None, *, progress: bool = True) -> dict[str, Path]:
    """Write the world's PNG images and JSONL manifests.

    Idempotent: when ``out_dir`` already holds a complete world for the same config (its ``world.json``, written
    last and atomically, matches and the manifests are unchanged) nothing is rewritten.

    Args:
        out_dir: Folder to write into (created if missing).
        config: The world; defaults to ``WorldConfig()``.
        progress: Show a progress bar.

    Returns:
        ``{split: captions manifest}`` for train / val / test / compositional, plus ``{"vqa_<split>": vqa manifest}``.
    """
    config = config or WorldConfig()
    config.validate()
    out_dir = Path(out_dir)
    paths = {key: out_dir / name for key, name in _manifest_names().items()}
    if _is_complete(out_dir, config):
        return paths

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "world.json").unlink(missing_ok=True)  # from here on the folder is incomplete
    held_out = list(config.held_out_pairs())
    content = hashlib.sha256()
    total = config.n_train + config.n_val + config.n_test + config.n_compositional
    bar = tqdm(total=total, desc="generating world", unit="img", disable=not progress)
    for split in SPLITS:
        folder = out_dir / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.png"):  # left by an earlier, different world
            if re.fullmatch(r"\d{6,}\.png", stale.name):
                stale.unlink()
        captions_lines, vqa_lines = [], []
        for index in range(getattr(config, f"n_{split}")):
            png, captions, questions = _make_example(config, split, index, held_out)
            (out_dir / captions[0]["image"]).write_bytes(png)
            content.update(png)
            captions_lines += captions
            vqa_lines += questions
            bar.update()
        for key, lines in ((split, captions_lines), (f"vqa_{split}", vqa_lines)):
            data = "".join(json.dumps(line) + "\n" for line in lines).encode()
            write_bytes(paths[key], data)
            content.update(data)
    bar.close()

    meta = {
        "format_version": _FORMAT_VERSION,
        "config": asdict(config),
        "held_out_combinations": [list(p) for p in held_out],
        "vocabulary_size": len(world_vocabulary()),
        "manifest_sha256": {path.name: _sha256(path) for path in paths.values()},
        "content_sha256": content.hexdigest(),
    }
    write_bytes(out_dir / "world.json", (json.dumps(meta, indent=2) + "\n").encode())
    return paths
