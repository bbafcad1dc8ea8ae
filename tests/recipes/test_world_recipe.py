"""The embedded default end to end, reduced: a small world, short stage-0 and bridge training, every stage real.

The assertions are about learning, measured on held-out images: retrieval well above chance, and captions and
answers well above what the frozen LM says without the image.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from vlbridge.config import from_dict, load_yaml, save_yaml, to_dict
from vlbridge.data.world import WorldConfig
from vlbridge.errors import ConfigError
from vlbridge.recipes.world import BRIDGES, BridgeTraining, WorldRecipe, run_world_recipe
from vlbridge.training.stage0_text import Stage0TextConfig
from vlbridge.training.stage0_vision import Stage0VisionConfig
from vlbridge.utils.threads import torch_threads

REDUCED = WorldRecipe(
    world=WorldConfig(n_train=800, n_val=40, n_test=80, n_compositional=40, captions_per_image=3),
    vision=Stage0VisionConfig(steps=120, batch_size=64, vision_layers=2, log_every=20),
    text=Stage0TextConfig(steps=300, batch_size=64, val_max_sequences=200, log_every=20),
    stage1=BridgeTraining(steps=100, batch_size=32, warmup_steps=10, lr=2e-3),
    stage2=BridgeTraining(steps=150, batch_size=32, warmup_steps=10, lr=2e-3),
    instruct=BridgeTraining(steps=150, batch_size=32, warmup_steps=10, lr=2e-3),
    compare=BridgeTraining(steps=20, batch_size=16, warmup_steps=5, lr=2e-3),  # the comparison's plumbing, not skill
    eval_images=80,
    gallery=4,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    with torch_threads(2):  # the recipe's stages use every thread torch is set to; the suite defaults to one
        return out, run_world_recipe(out, REDUCED, progress=False, verbose=False)


def test_learns_from_the_image(run: tuple[Path, dict]) -> None:
    _, result = run
    m = result["metrics"]["test"]
    # retrieval with the stage-1 model: many times chance (1/80)
    assert m["text_to_image_r1_itc"] > 5 * m["chance_r1"], m
    # the instruction-tuned model answers and describes better than the LM that cannot see the image
    assert m["vqa_accuracy"] > m["vqa_accuracy_blind"] + 0.05, m
    assert m["fact_f1"] > m["fact_f1_blind"] + 0.1, m
    # and the frozen LM really reads a record: with the true one it does far better than blind
    assert m["vqa_accuracy_oracle"] > m["vqa_accuracy_blind"] + 0.2, m


def test_report_is_self_contained(run: tuple[Path, dict]) -> None:
    out, result = run
    html = (out / "report.html").read_text()
    assert Path(result["report"]) == out / "report.html"
    for heading in ("Summary", "Held-out images", "Compositional split", "Visual question answering",
                    "Image-text retrieval", "Training curves"):  # fmt: skip
        assert heading in html
    assert html.count("data:image/png;base64,") >= 12  # gallery images, retrieval results, charts
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing fetched from elsewhere
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"] == result["metrics"]
    # every prediction is kept, per system
    predictions = json.loads((out / "evaluate" / "predictions_test.json").read_text())
    assert len(predictions["captions"]) == REDUCED.eval_images
    assert set(predictions["answers"][0]) >= {"question", "truth", "stage2", "instruct", "blind", "oracle"}


def test_bridges_are_compared(run: tuple[Path, dict]) -> None:
    out, result = run
    bridges = result["bridges"]
    assert list(bridges) == list(BRIDGES) == ["qformer", "qformer_instruct", "projector", "minigpt4"]
    keys = {"vqa_accuracy", "vqa_per_type", "fact_f1", "cider", "retrieval", "trainable_params", "visual_tokens",
            "train_s_per_step", "captions_per_s", "steps"}  # fmt: skip
    types = set(bridges["qformer"]["vqa_per_type"])
    assert len(types) >= 5, types
    for name, b in bridges.items():
        assert set(b) >= keys, (name, set(b))
        assert 0 <= b["vqa_accuracy"] <= 1 and 0 <= b["fact_f1"] <= 1 and b["cider"] >= 0, (name, b)
        assert set(b["vqa_per_type"]) == types and all(0 <= v <= 1 for v in b["vqa_per_type"].values()), name
        assert b["trainable_params"] > 0 and b["train_s_per_step"] > 0 and b["captions_per_s"] > 0, (name, b)
        assert b["steps"] == REDUCED.compare.steps and b["images"] == REDUCED.eval_images, (name, b)
    # 27 query outputs for the Q-Formers; every ViT token (patches + CLS) for the projector
    assert {bridges[n]["visual_tokens"] for n in ("qformer", "qformer_instruct", "minigpt4")} == {27}
    assert bridges["projector"]["visual_tokens"] > 27
    # MiniGPT-4 trains only the projection into the LM: far fewer parameters than a trainable Q-Former
    assert bridges["minigpt4"]["trainable_params"] < bridges["qformer"]["trainable_params"] / 10
    assert bridges["qformer_instruct"]["trainable_params"] == bridges["qformer"]["trainable_params"]
    # retrieval where the bridge has ITC heads: the frozen stage-1 Q-Former of MiniGPT-4
    assert bridges["minigpt4"]["retrieval"]["text_to_image_r1_itc"] == result["metrics"]["test"]["text_to_image_r1_itc"]
    assert all(bridges[n]["retrieval"] is None for n in ("qformer", "qformer_instruct", "projector"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bridges"] == json.loads(json.dumps(bridges))
    html = (out / "report.html").read_text()
    assert "Bridges compared" in html and "VQA accuracy by question type, per bridge" in html
    start = html.index('id="bridges-compared"')  # the heading itself, not the contents at the top
    section = html[start : html.index("<h2", start)]
    assert all(name in section for name in bridges) and "trainable params" in section and "captions / s" in section


def test_second_run_reuses_every_stage(run: tuple[Path, dict], tmp_path: Path) -> None:
    out, first = run
    moved = tmp_path / "moved"
    shutil.move(out, moved)  # a run folder keeps working elsewhere: nothing refers to where it was
    again = run_world_recipe(moved, REDUCED, progress=False, verbose=False)
    assert all(stage["cached"] for stage in again["stages"].values())
    assert again["metrics"] == first["metrics"]
    out = moved
    # a changed stage-2 setting redoes stage 2 and what follows it, nothing before; the comparison starts from
    # stage 1 (or from nothing), so it is kept
    changed = replace(REDUCED, stage2=replace(REDUCED.stage2, steps=2), instruct=replace(REDUCED.instruct, steps=2))
    partly = run_world_recipe(out, changed, progress=False, verbose=False)
    cached = {name: stage["cached"] for name, stage in partly["stages"].items()}
    assert cached == {"world": True, "stage0_vision": True, "stage0_text": True, "stage1": True,
                      "stage2": False, "instruct": False, "evaluate": False,
                      **{f"compare_{name}": True for name in BRIDGES}}  # fmt: skip
    assert partly["bridges"] == again["bridges"]


def test_recipe_round_trips_through_yaml(tmp_path: Path) -> None:
    save_yaml(REDUCED, tmp_path / "recipe.yaml")
    assert load_yaml(WorldRecipe, tmp_path / "recipe.yaml") == REDUCED
    assert from_dict(WorldRecipe, to_dict(WorldRecipe())) == WorldRecipe()
    # one field of a stage overridden: the stage's other fields keep their defaults
    partial = from_dict(WorldRecipe, {"stage1": {"lr": 0.002}})
    assert partial.stage1 == replace(WorldRecipe().stage1, lr=0.002)


def test_unknown_or_repeated_bridges_are_refused(tmp_path: Path) -> None:
    for bridges in (["qformer", "perceiver"], ["projector", "projector"]):
        with pytest.raises(ConfigError, match="bridges"):
            run_world_recipe(tmp_path, replace(REDUCED, bridges=bridges), verbose=False)


def test_a_blind_language_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="scene"):
        run_world_recipe(tmp_path, replace(REDUCED, text=replace(REDUCED.text, scene_fraction=0.0)), verbose=False)
