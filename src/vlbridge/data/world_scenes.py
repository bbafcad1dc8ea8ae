"""The world's scenes: which objects go where (:func:`_sample_scene`), and their pictures (:func:`_render`)."""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from vlbridge.data.world_facts import _SIZE_FRACTION, COLOURS, COLUMNS, ROWS, SIZES

if TYPE_CHECKING:
    from vlbridge.data.world import WorldConfig


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
