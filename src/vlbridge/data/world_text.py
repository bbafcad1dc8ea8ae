"""The world's text: captions from a small grammar, VQA questions of seven kinds, and the facts read back out of
a caption to score it (:func:`caption_facts`, :func:`fact_accuracy`, :func:`world_vocabulary`).
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Iterable, Mapping
from typing import Any

from vlbridge.data.world_facts import _NUMBER_WORDS, COLOURS, COLUMNS, ROWS, SHAPE_PLURALS, SHAPES, SIZES
from vlbridge.data.world_scenes import WorldObject

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
