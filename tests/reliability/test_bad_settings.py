"""Zero, negative and out-of-range settings are refused at load, in one line, before any work or any file."""

from __future__ import annotations

import pytest

from reliability.faults import config, one_line_error
from vlbridge.config import save_yaml

BAD = [
    "data.batch_size=0",
    "data.batch_size=-3",
    "optim.accumulate=0",
    "run.save_every=0",
    "run.log_every=0",
    "optim.lr=-1",
    "optim.lr=0",
    "optim.lr=.nan",
    "run.max_steps=0",
    "run.max_steps=-5",
    "run.epochs=0",
    "optim.warmup_steps=-1",
    "optim.min_lr=1",  # above optim.lr
    "optim.grad_clip=0",
    "optim.betas=[0.9, 1.5]",
    "optim.max_bad_steps=0",
    "data.max_skip_fraction=2",
    "data.hflip=-0.5",
    "data.max_text_length=0",
    "data.num_workers=-1",
    "run.val_every=0",
    "data.val_samples=0",
    "run.eval_k=0",
]


@pytest.mark.parametrize("override", BAD)
def test_bad_setting_is_one_line_naming_the_key(world, tmp_path, capsys, override):
    save_yaml(config(world, tmp_path / "run"), tmp_path / "c.yaml")
    line = one_line_error(capsys, ["train", str(tmp_path / "c.yaml"), override])
    assert override.split("=")[0] in line
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_null_max_steps_means_epochs(world, tmp_path):
    from vlbridge.training.loop import train

    summary = train(config(world, tmp_path / "run", **{"run.max_steps": None, "run.epochs": 1}))
    assert summary["steps"] == 4  # 32 images / batch 8


def test_a_text_length_past_the_qformer_positions_is_one_line(world, tmp_path, capsys):
    save_yaml(config(world, tmp_path / "run"), tmp_path / "c.yaml")
    line = one_line_error(capsys, ["train", str(tmp_path / "c.yaml"), "data.max_text_length=100000"])
    assert "max_text_length=100000" in line and "positions" in line


def test_a_stage2_example_past_the_llm_positions_is_refused():
    from types import SimpleNamespace

    from vlbridge.errors import ConfigError
    from vlbridge.inference.prefix import IMAGE
    from vlbridge.training.tasks import _check_batch_fits

    model = SimpleNamespace(num_visual_tokens=4)
    fits = {"prompt_ids": [[IMAGE] + [1] * 30], "target_ids": [[2] * 30]}
    _check_batch_fits(fits, model, 64, 32)  # 4 + 60 = 64: fits exactly
    with pytest.raises(ConfigError, match="lower data.max_text_length"):
        _check_batch_fits({"prompt_ids": [[IMAGE] + [1] * 31], "target_ids": [[2] * 30]}, model, 64, 32)
