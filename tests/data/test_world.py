"""The synthetic world: deterministic, held-out pairs kept out, captions and VQA answers true to the facts."""

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlbridge.data.world import (
    COLOURS,
    QUESTION_TYPES,
    SHAPE_PLURALS,
    SHAPES,
    SIZES,
    SPLITS,
    WorldConfig,
    caption_facts,
    fact_accuracy,
    generate_world,
    world_vocabulary,
)
from vlbridge.errors import ConfigError

TINY = WorldConfig(seed=0, image_size=32, n_train=60, n_val=16, n_test=16, n_compositional=16, captions_per_image=3)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_world(tmp_path_factory.mktemp("world"), TINY, progress=False)


@pytest.fixture(scope="module")
def objects_by_id(world: dict[str, Path]) -> dict[str, list[dict]]:
    return {r["image_id"]: r["objects"] for split in SPLITS for r in read_jsonl(world[split])}


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------------
# Determinism and idempotence


def test_same_seed_same_bytes_other_seed_differs(world: dict[str, Path], tmp_path: Path) -> None:
    root = world["train"].parent
    again = generate_world(tmp_path / "again", TINY, progress=False)
    assert folder_bytes(again["train"].parent) == folder_bytes(root)

    other = generate_world(tmp_path / "other", WorldConfig(**{**TINY.__dict__, "seed": 1}), progress=False)
    for key in world:
        assert other[key].read_bytes() != world[key].read_bytes()
    assert (other["train"].parent / "images/train/000000.png").read_bytes() != (
        root / "images/train/000000.png"
    ).read_bytes()


def test_second_call_rewrites_nothing(tmp_path: Path) -> None:
    paths = generate_world(tmp_path, TINY, progress=False)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in files}
    assert generate_world(tmp_path, TINY, progress=False) == paths
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(files)


def test_other_config_or_damaged_manifest_regenerates(tmp_path: Path) -> None:
    generate_world(tmp_path, TINY, progress=False)
    smaller = WorldConfig(**{**TINY.__dict__, "n_train": 10})
    paths = generate_world(tmp_path, smaller, progress=False)
    assert len({r["image_id"] for r in read_jsonl(paths["train"])}) == 10
    assert len(list((tmp_path / "images/train").glob("*.png"))) == 10  # stale images removed
    assert json.loads((tmp_path / "world.json").read_text())["config"]["n_train"] == 10

    paths["vqa_val"].write_text("")  # a damaged world is not "complete"
    generate_world(tmp_path, smaller, progress=False)
    assert read_jsonl(paths["vqa_val"])


# ---------------------------------------------------------------------------------------------------------------------
# Held-out pairs


def test_held_out_pairs_only_in_compositional(world: dict[str, Path]) -> None:
    held_out = set(TINY.held_out_pairs())
    assert held_out == set(TINY.held_out_pairs())  # a fixed list for the seed
    assert 0.1 <= len(held_out) / (len(SHAPES) * len(COLOURS)) <= 0.2
    for split in ("train", "val", "test"):
        for record in read_jsonl(world[split]):
            assert not {(o["shape"], o["colour"]) for o in record["objects"]} & held_out
            for caption in record.get("captions", [record["caption"]]):
                assert not {(shape, colour) for _, colour, shape in caption_facts(caption)} & held_out
        for record in read_jsonl(world[f"vqa_{split}"]):  # not even named in a question
            assert not {(shape, colour) for _, colour, shape in caption_facts(record["question"])} & held_out
    for record in read_jsonl(world["compositional"]):
        assert {(o["shape"], o["colour"]) for o in record["objects"]} & held_out


def test_every_shape_and_colour_in_train(world: dict[str, Path]) -> None:
    objects = [o for r in read_jsonl(world["train"]) for o in r["objects"]]
    assert {o["shape"] for o in objects} == set(SHAPES)
    assert {o["colour"] for o in objects} == set(COLOURS)
    assert {o["size"] for o in objects} == set(SIZES)


def test_held_out_pairs_leave_every_shape_and_colour_for_many_seeds() -> None:
    for seed in range(50):
        held_out = WorldConfig(seed=seed).held_out_pairs()  # validation would raise otherwise
        assert len(held_out) == 7
    assert len({WorldConfig(seed=s).held_out_pairs() for s in range(5)}) > 1


# ---------------------------------------------------------------------------------------------------------------------
# Captions


def test_reference_captions_state_exactly_the_facts(world: dict[str, Path]) -> None:
    vocabulary = set(world_vocabulary())
    train_captions: dict[str, list[str]] = {}
    for record in read_jsonl(world["train"]):
        train_captions.setdefault(record["image_id"], []).append(record["caption"])
    assert all(len(set(c)) == len(c) == TINY.captions_per_image for c in train_captions.values())
    for split in SPLITS:
        for record in read_jsonl(world[split]):
            captions = record.get("captions", [record["caption"]])
            assert record["caption"] == captions[0]
            sizes = {(o["colour"], o["shape"]): o["size"] for o in record["objects"]}
            for caption in captions:
                assert fact_accuracy(caption, record["objects"]) == 1.0, caption
                for size, colour, shape in caption_facts(caption):
                    assert size in (None, sizes[(colour, shape)]), caption
                assert set(caption.split()) <= vocabulary, caption
    eval_record = read_jsonl(world["test"])[0]
    assert len(set(eval_record["captions"])) == TINY.captions_per_image


def test_fact_accuracy_scores_partial_captions() -> None:
    objects = [{"shape": "circle", "colour": "red"}, {"shape": "square", "colour": "blue"}]
    assert fact_accuracy("a red circle and a blue square", objects) == 1.0
    assert fact_accuracy("A red circle.", objects) == pytest.approx(2 / 3)  # precision 1, recall 1/2
    assert fact_accuracy("a red circle and a green star", objects) == pytest.approx(0.5)
    assert fact_accuracy("nothing to see", objects) == 0.0
    assert fact_accuracy("nothing", []) == 1.0
    assert caption_facts("two LARGE red stars, left") == {("large", "red", "star")}


# ---------------------------------------------------------------------------------------------------------------------
# VQA: every answer recomputed from the facts by an independent reading of the question

ROW = {"at the top": "top", "in the middle row": "middle", "at the bottom": "bottom"}
COLUMN = {"on the left": "left", "in the centre column": "centre", "on the right": "right"}
PLURALS = {plural: shape for shape, plural in SHAPE_PLURALS.items()}


def resolve(reference: str, objects: list[dict]) -> tuple[dict, dict]:
    """The single object a "the [size] [colour] shape|object [row] [column]" expression denotes, and its parts."""
    words = reference.split()
    assert words.pop(0) == "the", reference
    parts: dict[str, str] = {}
    if words[0] in SIZES:
        parts["size"] = words.pop(0)
    if words[0] in COLOURS:
        parts["colour"] = words.pop(0)
    noun = words.pop(0)
    if noun != "object":
        parts["shape"] = noun
    rest = " ".join(words)
    for phrases, key in ((ROW, "y"), (COLUMN, "x")):
        for phrase, value in phrases.items():
            if rest.startswith(phrase):
                parts[key], rest = value, rest[len(phrase) :].strip()
    assert rest == "" and parts, reference
    matches = [o for o in objects if all(o[k] == v for k, v in parts.items())]
    assert len(matches) == 1, f"ambiguous or empty reference {reference!r}"
    return matches[0], parts


def expected_answer(question_type: str, question: str, objects: list[dict]) -> str:
    if question_type in ("colour", "shape", "size"):
        noun = {"colour": "colour", "shape": "shape", "size": "(?:size|big)"}[question_type]
        match = re.fullmatch(rf"(?:what {noun} is|what is the {noun} of|how big is) (the .+)", question)
        target, parts = resolve(match.group(1), objects)
        assert question_type not in parts, question  # the question must not give its answer away
        return target[question_type]
    if question_type == "count":
        match = re.fullmatch(r"how many (\w+)(?: objects)? are (?:there|in the image)", question)
        word = match.group(1)
        if word == "objects":
            return str(len(objects))
        key, value = ("shape", PLURALS[word]) if word in PLURALS else ("colour", word)
        return str(sum(o[key] == value for o in objects))
    if question_type == "position":
        match = re.fullmatch(r"(?:which (column|row) is (the .+) in|in which (column|row) is (the .+))", question)
        axis, reference = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
        target, parts = resolve(reference, objects)
        assert not {"x", "y"} & set(parts), question
        return target["x" if axis == "column" else "y"]
    if question_type == "relation":
        relations = "to the left of|left of|to the right of|right of|above|below"
        match = re.fullmatch(rf"is (the .+?) ({relations}) (the .+)", question)
        (a, _), (b, _) = resolve(match.group(1), objects), resolve(match.group(3), objects)
        dx = ["left", "centre", "right"].index(a["x"]) - ["left", "centre", "right"].index(b["x"])
        dy = ["top", "middle", "bottom"].index(a["y"]) - ["top", "middle", "bottom"].index(b["y"])
        offset = {"above": -dy, "below": dy}.get(match.group(2), -dx if "left" in match.group(2) else dx)
        assert offset != 0, f"relation along an axis where the objects are level: {question!r}"
        return "yes" if offset > 0 else "no"
    if question_type == "exist":
        match = re.fullmatch(r"(?:is there|does the image contain) an? (\w+) (\w+)(?: in the image)?", question)
        present = {(o["colour"], o["shape"]) for o in objects}
        return "yes" if (match.group(1), match.group(2)) in present else "no"
    raise AssertionError(f"unknown question type {question_type!r}")


def test_vqa_answers_follow_from_the_facts(world: dict[str, Path], objects_by_id: dict[str, list[dict]]) -> None:
    vocabulary = set(world_vocabulary())
    for split in SPLITS:
        for record in read_jsonl(world[f"vqa_{split}"]):
            answers = record["answers"]
            assert len(answers) == 10 and len(set(answers)) == 1
            objects = objects_by_id[record["image_id"]]
            assert answers[0] == expected_answer(record["question_type"], record["question"], objects), record
            # the focus (the objects the answer depends on) is part of the scene and enough to answer
            assert all(o in objects for o in record["focus"]), record
            assert answers[0] == expected_answer(record["question_type"], record["question"], record["focus"]), record
            assert set(record["question"].split()) | {answers[0]} <= vocabulary


def test_question_kinds_and_yes_no_balance(world: dict[str, Path]) -> None:
    records = [r for split in SPLITS for r in read_jsonl(world[f"vqa_{split}"])]
    assert set(Counter(r["question_type"] for r in records)) == set(QUESTION_TYPES)
    assert len(QUESTION_TYPES) >= 6
    for kind in ("exist", "relation"):
        answers = Counter(r["answers"][0] for r in records if r["question_type"] == kind)
        assert set(answers) == {"yes", "no"}
        assert 0.3 <= answers["yes"] / answers.total() <= 0.7, (kind, answers)
    per_image = Counter(r["image_id"] for r in records)
    assert min(per_image.values()) >= 6
    assert len({r["question_id"] for r in records}) == len(records)


# ---------------------------------------------------------------------------------------------------------------------
# Files


def test_manifests_are_jsonl_with_relative_paths_that_exist(world: dict[str, Path]) -> None:
    root = world["train"].parent
    assert set(world) == set(SPLITS) | {f"vqa_{s}" for s in SPLITS}
    for split in SPLITS:
        records = read_jsonl(world[split])
        expected = getattr(TINY, f"n_{split}") * (TINY.captions_per_image if split == "train" else 1)
        assert len(records) == expected
        for record in records + read_jsonl(world[f"vqa_{split}"]):
            image = record["image"]
            assert image.startswith(f"images/{split}/") and not Path(image).is_absolute()
            assert (root / image).is_file()
            assert record["image_id"] == f"{split}-{Path(image).stem}"
        for record in records:
            assert 1 <= len(record["objects"]) <= TINY.max_objects
            assert len({(o["x"], o["y"]) for o in record["objects"]}) == len(record["objects"])  # own grid cells
    meta = json.loads((root / "world.json").read_text())
    assert [tuple(p) for p in meta["held_out_combinations"]] == list(TINY.held_out_pairs())


def test_images_are_small_rgb_and_not_flat(world: dict[str, Path]) -> None:
    root = world["train"].parent
    image = Image.open(root / "images/train/000000.png")
    assert image.size == (TINY.image_size, TINY.image_size) and image.mode == "RGB"
    pixels = np.asarray(image, dtype=np.float32)
    assert pixels.std() > 2.0
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # noise and texture, not a flat fill


# ---------------------------------------------------------------------------------------------------------------------
# Config


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        WorldConfig(max_objects=10)
    with pytest.raises(ConfigError):
        WorldConfig(image_size=8)
    with pytest.raises(ConfigError):
        WorldConfig(held_out_combinations=[["hexagon", "red"]])
    with pytest.raises(ConfigError):
        WorldConfig(held_out_combinations=[], n_compositional=4)
    with pytest.raises(ConfigError):  # every circle held out: "circle" would never be seen in training
        WorldConfig(held_out_combinations=[("circle", c) for c in COLOURS])
    config = WorldConfig(held_out_combinations=[["star", "red"]])  # lists, as YAML gives them
    assert config.held_out_pairs() == (("star", "red"),)
