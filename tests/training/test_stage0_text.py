"""Stage 0, text side: the world tokenizer and the blind OPT language model, saved in transformers format."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from vlbridge.data.world import WorldConfig, generate_world, world_vocabulary
from vlbridge.errors import ConfigError, InputError
from vlbridge.training.stage0_baselines import blind_baseline, scene_oracle
from vlbridge.training.stage0_text import (
    IMAGE_TOKEN,
    SCENE_LENGTH,
    Stage0TextConfig,
    build_tokenizer,
    load_scene_texts,
    load_world_texts,
    scene_text,
    train_language_model,
)

TINY_WORLD = WorldConfig(n_train=80, n_val=8, n_test=16, n_compositional=8, image_size=32)
TINY_LM = Stage0TextConfig(
    hidden_size=32,
    num_layers=1,
    num_heads=4,
    ffn_dim=64,
    steps=40,
    batch_size=16,
    lr=3e-3,
    warmup_steps=5,
    log_every=5,
    val_max_sequences=64,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world")
    generate_world(root, TINY_WORLD, progress=False)
    return root


@pytest.fixture(scope="module")
def trained(world: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("stage0_text")
    return out, train_language_model(world, out, config=TINY_LM, progress=False)


def test_loss_decreases_and_result_is_recorded(trained: tuple[Path, dict]) -> None:
    out, result = trained
    curve = [point["loss"] for point in result["loss_curve"]]
    assert len(curve) == TINY_LM.steps // TINY_LM.log_every
    assert curve[-1] < curve[0] - 1.0, curve
    assert result["cached"] is False
    assert 1.0 < result["val_perplexity"] < result["vocab_size"]
    assert result["val_caption_perplexity"] > 1.0 and result["val_vqa_perplexity"] > 1.0
    assert 1.0 < result["val_perplexity_shifted"] < result["vocab_size"]
    saved = json.loads((out / "stage0_text.json").read_text())
    assert saved["config"]["steps"] == TINY_LM.steps
    assert saved["val_loss"] == pytest.approx(result["val_loss"])
    assert saved["time_s"]["total"] > 0


def test_saved_folder_loads_with_transformers(trained: tuple[Path, dict]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, result = trained
    tokenizer = AutoTokenizer.from_pretrained(out / "lm")
    model = AutoModelForCausalLM.from_pretrained(out / "lm").eval()
    assert model.config.model_type == "opt"
    assert model.config.vocab_size % 8 == 0 and model.config.vocab_size >= len(tokenizer)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        0,
        1,
        1,
        2,
    )
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == result["image_token_id"] == 3 < model.config.vocab_size
    assert IMAGE_TOKEN in tokenizer.all_special_tokens
    generation = model.generation_config
    assert (generation.eos_token_id, generation.pad_token_id, generation.bos_token_id) == (1, 0, 1)
    assert generation.do_sample is False

    batch = tokenizer(["there is a red circle", "<image><image>a blue square"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
    assert batch["input_ids"][1, :3].tolist() == [1, image_id, image_id]  # BOS, then the placeholders


def test_tokenizer_covers_the_world_and_the_prompt(trained: tuple[Path, dict]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained[0] / "lm")
    ids = tokenizer("Question: what colour is the circle Answer:").input_ids
    assert tokenizer.unk_token_id not in ids
    assert ids[0] == tokenizer.bos_token_id  # OPT-style: </s> prepended, nothing appended
    assert ids[-1] != tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "question : what colour is the circle answer :"
    for word in world_vocabulary():  # one token per world word, even the ones this tiny world never uses
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    assert tokenizer.unk_token_id not in tokenizer("A photo of a ZEBRA, 42!").input_ids  # lowercased, no <unk>


def test_tokenizer_is_deterministic(world: Path) -> None:
    texts = load_world_texts(world)["captions"][:200]
    first, second = build_tokenizer(texts), build_tokenizer(texts)
    assert first.get_vocab() == second.get_vocab()


def test_hf_blip2_processor_reuses_the_image_token(trained: tuple[Path, dict]) -> None:
    import numpy as np
    from transformers import AutoTokenizer, Blip2Processor

    try:
        from transformers import BlipImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import BlipImageProcessor as ImageProcessor

    tokenizer = AutoTokenizer.from_pretrained(trained[0] / "lm")
    size = len(tokenizer)
    processor = Blip2Processor(ImageProcessor(size={"height": 32, "width": 32}), tokenizer, num_query_tokens=4)
    ids = processor(images=np.zeros((32, 32, 3), dtype=np.uint8), text="Question: what shape Answer:")["input_ids"]
    assert ids[0][:5] == [3, 3, 3, 3, 1]
    assert len(tokenizer) == size  # no new token was added


def test_cached_rerun_does_not_retrain(trained: tuple[Path, dict], world: Path, tmp_path: Path) -> None:
    out, result = trained
    weights = out / "lm" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again = train_language_model(world, out, config=TINY_LM, progress=False)
    assert again["cached"] is True
    assert again["val_loss"] == result["val_loss"] and again["loss_curve"] == result["loss_curve"]
    assert weights.stat().st_mtime_ns == mtime
    threads = train_language_model(world, out, config=replace(TINY_LM, num_threads=None), progress=False)
    assert threads["cached"] is True  # the thread count does not change what is trained

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    changed = train_language_model(world, copy, config=replace(TINY_LM, steps=3, log_every=1), progress=False)
    assert changed["cached"] is False and len(changed["loss_curve"]) == 3
    assert json.loads((copy / "stage0_text.json").read_text())["config"]["steps"] == 3


def test_blind_baseline(trained: tuple[Path, dict], world: Path) -> None:
    out, _ = trained
    result = blind_baseline(out / "lm", world / "vqa_val.jsonl", world / "captions_val.jsonl", batch_size=16)
    vqa, captions = result["vqa"], result["captions"]
    questions = (world / "vqa_val.jsonl").read_text().splitlines()
    assert 0.0 <= vqa["accuracy"] <= 1.0
    assert all(0.0 <= value <= 1.0 for value in vqa["per_type"].values())
    assert vqa["count"] == len(questions) == len(vqa["predictions"])
    assert all(isinstance(p["answer"], str) for p in vqa["predictions"])
    assert captions["count"] == TINY_WORLD.n_val == len(captions["predictions"])
    assert len({p["image_id"] for p in captions["predictions"]}) == TINY_WORLD.n_val
    assert {p["caption"] for p in captions["predictions"]} == {captions["caption"]}  # blind: one caption for all
    assert 0.0 <= captions["fact_f1"] <= 1.0

    # Train captions come one record per caption: still one prediction per image.
    per_caption = blind_baseline(out / "lm", world / "vqa_val.jsonl", world / "captions_train.jsonl", limit=5)
    assert per_caption["captions"]["count"] == 5 and per_caption["vqa"]["count"] == 5


def test_scene_record_layout() -> None:
    star = {"shape": "star", "colour": "red", "size": "large", "x": "right", "y": "top"}
    dot = {"shape": "circle", "colour": "blue", "size": "small", "x": "left", "y": "bottom"}
    words = scene_text([dot, star]).split()  # order of the objects does not matter: cells are in reading order
    assert len(words) == SCENE_LENGTH == 27
    assert words[6:9] == ["large", "red", "star"]  # row top, column right: cell 2
    assert words[18:21] == ["small", "blue", "circle"]  # row bottom, column left: cell 6
    assert words.count("empty") == 21
    assert scene_text([]) == " ".join(["empty"] * 27)


def test_scene_texts_pair_captions_with_the_scene_and_questions_with_their_focus(world: Path) -> None:
    pairs = load_scene_texts(world, "val")
    captions = [json.loads(line) for line in (world / "captions_val.jsonl").read_text().splitlines()]
    questions = [json.loads(line) for line in (world / "vqa_val.jsonl").read_text().splitlines()]
    assert len(pairs["captions"]) == sum(len(r["captions"]) for r in captions)
    assert pairs["captions"][0] == (scene_text(captions[0]["objects"]), captions[0]["captions"][0])
    assert len(pairs["vqa"]) == len(questions)
    for (record, text), question in zip(pairs["vqa"], questions):
        assert record == scene_text(question["focus"]) and question["question"] in text


def test_scene_oracle_reads_a_record_per_image(trained: tuple[Path, dict], world: Path) -> None:
    out, _ = trained
    result = scene_oracle(out / "lm", world / "vqa_val.jsonl", world / "captions_val.jsonl", batch_size=16)
    assert result["captions"]["caption"] is None and result["captions"]["count"] == TINY_WORLD.n_val
    assert 0.0 <= result["vqa"]["accuracy"] <= 1.0
    assert all("question" not in p["caption"].split() for p in result["captions"]["predictions"])


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Stage0TextConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ConfigError):
        Stage0TextConfig(caption_fraction=1.5)
    with pytest.raises(InputError, match="not a world folder"):
        train_language_model(tmp_path, tmp_path / "out", config=TINY_LM, progress=False)
