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

This module holds :class:`WorldConfig` and :func:`generate_world`; :mod:`vlbridge.data.world_facts` the vocabulary
of facts, :mod:`vlbridge.data.world_scenes` the scenes and their pictures, :mod:`vlbridge.data.world_text` the
captions, the questions and the reading of facts back out of a caption. Their public names are importable from here.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from vlbridge.data.world_facts import (
    COLOURS,
    COLUMNS,
    ROWS,
    SHAPE_PLURALS,
    SHAPES,
    SIZES,
    SPLITS,
    _all_pairs,
    _derive_seed,
)
from vlbridge.data.world_scenes import WorldObject, _render, _sample_scene
from vlbridge.data.world_text import (
    QUESTION_TYPES,
    _captions,
    _questions,
    caption_facts,
    fact_accuracy,
    world_vocabulary,
)
from vlbridge.errors import ConfigError
from vlbridge.utils.io import write_bytes

__all__ = [
    "COLOURS",
    "COLUMNS",
    "QUESTION_TYPES",
    "ROWS",
    "SHAPES",
    "SHAPE_PLURALS",
    "SIZES",
    "SPLITS",
    "WorldConfig",
    "WorldObject",
    "caption_facts",
    "fact_accuracy",
    "generate_world",
    "world_vocabulary",
]

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
