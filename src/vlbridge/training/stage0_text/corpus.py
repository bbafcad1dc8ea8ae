"""The stage-0 LM's text: every caption and question of a world split, alone or after its scene record.

The scene record (:func:`scene_text`) is a fixed-length, 27-word table, ``size colour shape`` for each of the nine
grid cells in reading order, ``empty empty empty`` where there is nothing. A caption follows the record of the whole
scene; a question follows the record of just the objects its answer depends on (the manifest's ``focus``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vlbridge.utils.io import read_jsonl

VQA_PROMPT = "Question: {} Answer:"  # the decoder-LLM VQA template of BLIP-2; stage 2 uses the same
EMPTY_CELL = "empty"  # the scene record's word for a grid cell with no object
SCENE_LENGTH = 27  # 9 grid cells x (size, colour, shape): the soft prompt of the world recipe has as many queries


def _caption_texts(records: Sequence[dict[str, Any]]) -> list[str]:
    """Every caption of a manifest: the ``captions`` list where present (eval splits), else ``caption``."""
    texts: list[str] = []
    for record in records:
        texts += record.get("captions") or [record["caption"]]
    return texts


def _vqa_texts(records: Sequence[dict[str, Any]]) -> list[str]:
    """``"Question: {q} Answer: {a}"`` with the most common reference answer."""
    texts = []
    for record in records:
        answers = record["answers"]
        answer = max(dict.fromkeys(answers), key=answers.count)  # the majority answer, first on ties
        texts.append(f"{VQA_PROMPT.format(record['question'])} {answer}")
    return texts


def load_world_texts(world_dir: str | os.PathLike, split: str = "train") -> dict[str, list[str]]:
    """The text an LM learns from one split of a world, without any image.

    Args:
        world_dir: A folder written by :func:`vlbridge.data.world.generate_world`.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"compositional"``.

    Returns:
        ``{"captions": [...], "vqa": ["Question: ... Answer: ...", ...]}``.
    """
    world_dir = Path(world_dir)
    return {
        "captions": _caption_texts(read_jsonl(world_dir / f"captions_{split}.jsonl")),
        "vqa": _vqa_texts(read_jsonl(world_dir / f"vqa_{split}.jsonl")),
    }


def scene_text(objects: Sequence[Mapping[str, str]]) -> str:
    """The scene record of a list of object facts: ``size colour shape`` per grid cell in reading order.

    >>> scene_text([{"shape": "star", "colour": "red", "size": "large", "x": "centre", "y": "middle"}]).split()[12:15]
    ['large', 'red', 'star']
    """
    from vlbridge.data.world import COLUMNS, ROWS

    cells = [[EMPTY_CELL] * 3 for _ in range(len(ROWS) * len(COLUMNS))]
    for obj in objects:
        cell = ROWS.index(obj["y"]) * len(COLUMNS) + COLUMNS.index(obj["x"])
        cells[cell] = [obj["size"], obj["colour"], obj["shape"]]
    return " ".join(word for cell in cells for word in cell)


def load_scene_texts(world_dir: str | os.PathLike, split: str = "train") -> dict[str, list[tuple[str, str]]]:
    """``(scene record, text)`` pairs of one split: every caption with its image's record, every question with the
    record of the objects its answer depends on (its ``focus``, where the manifest has one; else the whole scene).

    Returns:
        ``{"captions": [(scene, caption), ...], "vqa": [(scene, "Question: ... Answer: ..."), ...]}``.
    """
    world_dir = Path(world_dir)
    captions = read_jsonl(world_dir / f"captions_{split}.jsonl")
    scenes = {r["image_id"]: scene_text(r["objects"]) for r in captions}
    questions = [r for r in read_jsonl(world_dir / f"vqa_{split}.jsonl") if r.get("image_id") in scenes]
    return {
        "captions": [(scenes[r["image_id"]], text) for r in captions for text in _caption_texts([r])],
        "vqa": [(question_scene(r, scenes), text) for r, text in zip(questions, _vqa_texts(questions))],
    }


def question_scene(record: Mapping[str, Any], scenes: Mapping[str, str]) -> str:
    """The record a question is read with: its ``focus`` objects when given, else its image's whole scene."""
    return scene_text(record["focus"]) if "focus" in record else scenes[record["image_id"]]


def world_fingerprint(world_dir: Path) -> str:
    """SHA-256 over the manifests stage 0 reads, so a changed world retrains the LM."""
    digest = hashlib.sha256()
    for name in ("captions_train.jsonl", "vqa_train.jsonl", "captions_val.jsonl", "vqa_val.jsonl"):
        path = world_dir / name
        digest.update(name.encode())
        digest.update(path.read_bytes() if path.is_file() else b"<missing>")
    return digest.hexdigest()
