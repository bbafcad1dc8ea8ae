"""The synthetic world's vocabulary of facts (shapes, colours, sizes, grid positions) and its seeding."""

from __future__ import annotations

import hashlib

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


def _all_pairs() -> list[tuple[str, str]]:
    return [(shape, colour) for shape in SHAPES for colour in COLOURS]


def _derive_seed(*parts: object) -> int:
    """A 64-bit seed from any parts, stable across processes and platforms (unlike `hash`)."""
    digest = hashlib.sha256(":".join(["vlbridge-world", *map(str, parts)]).encode()).digest()
    return int.from_bytes(digest[:8], "little")
