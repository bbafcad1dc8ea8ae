"""`"auto"` settings resolved from the machine (device, cores) and the run length."""

from __future__ import annotations

import pytest
import torch
import yaml

from training_data import stage1_config, write_images, write_vision_model
from vlbridge.config import from_dict, load_yaml
from vlbridge.training import defaults as D
from vlbridge.training.recipe import TrainConfig


def auto_config(**sections) -> TrainConfig:
    raw = {"run": {"device": "cpu"}, **sections}
    return from_dict(TrainConfig, raw)


def test_the_shipped_defaults_are_auto():
    cfg = TrainConfig()
    assert (cfg.run.precision, cfg.data.num_workers, cfg.optim.warmup_steps) == ("auto", "auto", "auto")


@pytest.mark.parametrize(
    ("cores", "world", "cache", "expected"),
    [(2, 1, False, 0), (1, 1, False, 0), (16, 1, False, 8), (8, 1, False, 4), (16, 4, False, 2), (16, 1, True, 0)],
)
def test_workers_follow_the_cores(cores, world, cache, expected):
    data = {"feature_cache": "runs/cache"} if cache else {}
    cfg, choices = D.resolve_defaults(auto_config(data=data), total_steps=100, world=world, cores=cores)
    assert cfg.data.num_workers == expected
    assert [c.key for c in choices] == ["run.precision", "data.num_workers", "optim.warmup_steps"]


@pytest.mark.parametrize(("steps", "warmup"), [(300, 15), (5, 1), (10_000, 500), (1_000_000, 2000)])
def test_warmup_follows_the_run_length(steps, warmup):
    cfg, _ = D.resolve_defaults(auto_config(), total_steps=steps, cores=2)
    assert cfg.optim.warmup_steps == warmup


def test_precision_follows_the_device(monkeypatch):
    cfg, _ = D.resolve_defaults(auto_config(), total_steps=10, cores=2)
    assert cfg.run.precision == "fp32"  # CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    cfg, _ = D.resolve_defaults(auto_config(run={"device": "cuda"}), total_steps=10, cores=2)
    assert cfg.run.precision == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    cfg, _ = D.resolve_defaults(auto_config(run={"device": "cuda:0"}), total_steps=10, cores=2)
    assert cfg.run.precision == "fp32"


def test_explicit_values_are_kept_and_nothing_is_printed(capsys):
    cfg = auto_config(run={"device": "cpu", "precision": "bf16"}, data={"num_workers": 3}, optim={"warmup_steps": 7})
    resolved, choices = D.resolve_defaults(cfg, total_steps=1000, cores=64)
    assert choices == [] and resolved == cfg
    D.apply_defaults(cfg, total_steps=1000)
    assert capsys.readouterr().err == ""


def test_a_run_prints_its_choices_and_saves_them_resolved(tmp_path, capsys):
    from vlbridge.training.loop import train

    write_vision_model(tmp_path)
    write_images(tmp_path, 16, seed=0)
    cfg = stage1_config(tmp_path, **{"run.max_steps": 2})
    cfg.data.num_workers, cfg.optim.warmup_steps, cfg.run.precision = "auto", "auto", "auto"
    train(cfg)
    err = capsys.readouterr().err
    assert "settings chosen for this machine" in err
    assert "optim.warmup_steps=1" in err and "run.precision=fp32" in err
    saved = load_yaml(TrainConfig, tmp_path / "run" / "config.yaml")
    assert saved.optim.warmup_steps == 1 and saved.run.precision == "fp32"
    assert isinstance(saved.data.num_workers, int)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optim"]["warmup_steps"] == 1
