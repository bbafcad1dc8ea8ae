"""Non-finite losses and gradients: a step is skipped and counted, a streak stops the run with one line, and no
checkpoint, model or summary with a NaN is ever written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from reliability.faults import config, one_line_error
from training_data import stage2_config, write_blip2_vision_model, write_caption_lm
from vlbridge.config import save_yaml
from vlbridge.errors import TrainingError
from vlbridge.training import checkpoint as ckpt
from vlbridge.training.loop import train


def strict_json(path):
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def all_finite(folder) -> bool:
    tensors = load_file(str(folder / "trainable.safetensors"))
    tensors.update(load_file(str(folder / "optimizer.safetensors")))
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


DIVERGE = ["optim.lr=1000", "optim.warmup_steps=0", "optim.grad_clip=null", "run.save_every=1", "run.max_steps=10"]


def test_a_diverging_stage1_run_stops_with_one_line_and_writes_nothing_non_finite(world, tmp_path, capsys):
    run = tmp_path / "run"
    save_yaml(config(world, run), tmp_path / "c.yaml")
    line = one_line_error(capsys, ["train", str(tmp_path / "c.yaml"), *DIVERGE])
    assert "training diverged" in line and "optim.lr" in line
    assert not (run / "model").exists() and not (run / "summary.json").exists()
    folders = ckpt.step_folders(run)
    assert all(all_finite(f) for f in folders)
    if folders:  # `latest` names a folder that exists
        assert (run / (run / "latest").read_text()).is_dir()


def test_a_diverging_stage2_run_stops_too(tmp_path, capsys):
    write_images_for_stage2(tmp_path)
    cfg = stage2_config(tmp_path, **{"run.output_dir": str(tmp_path / "run2"), "run.max_steps": 10})
    save_yaml(cfg, tmp_path / "c.yaml")
    line = one_line_error(capsys, ["train", str(tmp_path / "c.yaml"), *DIVERGE])
    assert "training diverged" in line
    assert not (tmp_path / "run2" / "model").exists()
    assert all(all_finite(f) for f in ckpt.step_folders(tmp_path / "run2"))


def write_images_for_stage2(root):
    from training_data import write_images

    write_images(root, 16, seed=0)
    write_blip2_vision_model(root)
    write_caption_lm(root, steps=0)  # an untrained frozen LM is enough to diverge


def test_an_isolated_non_finite_gradient_is_skipped_and_counted(world, tmp_path, monkeypatch, capsys):
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def nan_at_third(params, max_norm, *args, **kwargs):
        calls["n"] += 1
        norm = real(params, max_norm, *args, **kwargs)
        if calls["n"] == 3:
            for p in params:
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
            return torch.tensor(float("nan"))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_at_third)
    run = tmp_path / "run"
    summary = train(config(world, run, **{"run.log_every": 1}))
    assert "update skipped" in capsys.readouterr().err
    assert summary["steps"] == 4 and summary["bad_steps"] == 1
    assert strict_json(run / "summary.json")["bad_steps"] == 1
    assert all(all_finite(f) for f in ckpt.step_folders(run))
    import vlbridge

    model = vlbridge.load(run / "model")
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_max_bad_steps_is_configurable(world, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(float("inf")))
    with pytest.raises(TrainingError, match="2 steps in a row"):
        train(config(world, tmp_path / "run", **{"optim.max_bad_steps": 2}))


def test_a_non_finite_model_is_never_saved(tmp_path, world):
    import vlbridge
    from vlbridge.errors import CheckpointError

    out = tmp_path / "run"
    train(config(world, out, **{"run.max_steps": 2}))
    model = vlbridge.load(out / "model")
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
    with pytest.raises(CheckpointError, match="non-finite"):
        model.save(tmp_path / "nan-model", format="native")
    assert not (tmp_path / "nan-model").exists()


def test_json_written_by_vlbridge_is_strict():
    from vlbridge.utils.io import dumps

    assert json.loads(dumps({"loss": float("nan"), "x": [float("inf"), 1.0]})) == {"loss": None, "x": [None, 1.0]}
