"""`vlbridge train` and `vlbridge eval` from YAML through the command line; shipped configs parse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training_data import stage1_config, write_images, write_vision_model
from vlbridge.cli import main
from vlbridge.config import load_yaml, save_yaml
from vlbridge.training.recipe import TrainConfig

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_parse(path):
    cfg = load_yaml(TrainConfig, path)
    assert cfg.model.vision


def test_train_then_eval_from_the_command_line(tmp_path, capsys):
    write_images(tmp_path, 24, seed=0)
    write_images(tmp_path, 6, seed=1, name="val")
    write_vision_model(tmp_path)
    save_yaml(stage1_config(tmp_path), tmp_path / "stage1.yaml")
    code = main(["train", str(tmp_path / "stage1.yaml"), "run.max_steps=3", f"run.output_dir={tmp_path / 'run'}"])
    assert code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 3
    (tmp_path / "eval.yaml").write_text(
        f"model: {tmp_path / 'run' / 'model'}\ndata: {tmp_path / 'val.jsonl'}\nk: 4\noutput: {tmp_path / 'r.json'}\n"
    )
    assert main(["eval", str(tmp_path / "eval.yaml")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert 0 <= report["metrics"]["itm"]["img_r1"] <= 1


def test_unknown_override_is_one_clear_line(tmp_path, capsys):
    save_yaml(stage1_config(tmp_path), tmp_path / "stage1.yaml")
    assert main(["train", str(tmp_path / "stage1.yaml"), "optim.lrr=1"]) == 1
    err = capsys.readouterr().err
    assert "did you mean" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
