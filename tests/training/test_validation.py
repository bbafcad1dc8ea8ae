"""Periodic cheap validation (`run.val_every`): held-out ITC recall (stage 1) and LM loss (stage 2) in log.csv."""

from __future__ import annotations

import csv
import math

import pytest

from training_data import (
    stage1_config,
    stage2_config,
    write_blip2_vision_model,
    write_caption_lm,
    write_images,
    write_vision_model,
)
from vlbridge.errors import ConfigError
from vlbridge.training.loop import train


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_stage1_logs_itc_recall_equal_to_the_final_evaluation(tmp_path):
    write_vision_model(tmp_path)
    write_images(tmp_path, 24, seed=0)
    val = write_images(tmp_path, 6, seed=1, name="val")
    cfg = stage1_config(tmp_path, **{"run.max_steps": 6, "run.log_every": 4})
    cfg.run.val_every, cfg.data.val, cfg.data.val_samples = 3, str(val), 100
    summary = train(cfg)
    logged = {int(r["step"]): r for r in rows(tmp_path / "run" / "log.csv")}
    assert [s for s, r in logged.items() if r.get("val_txt_r1")] == [3, 6]  # every 3 steps, on top of log_every
    assert 4 in logged and logged[4]["val_txt_r1"] == ""
    final = summary["eval"]["itc"]  # end-of-run ITC recall on the same 6 images
    for key in ("txt_r1", "txt_r5", "img_r1", "img_r5"):
        assert float(logged[6][f"val_{key}"]) == pytest.approx(final[key], abs=1e-4)


def test_stage2_logs_the_lm_loss(tmp_path):
    write_images(tmp_path, 24, seed=0)
    val = write_images(tmp_path, 6, seed=1, name="val")
    write_blip2_vision_model(tmp_path)
    write_caption_lm(tmp_path, steps=20)
    cfg = stage2_config(tmp_path, **{"run.max_steps": 4, "run.log_every": 10})
    cfg.run.val_every, cfg.data.val, cfg.data.val_samples = 2, str(val), 4
    train(cfg)
    logged = rows(tmp_path / "run2" / "log.csv")
    losses = [float(r["val_lm_loss"]) for r in logged if r.get("val_lm_loss")]
    assert [int(r["step"]) for r in logged] == [2, 4] and len(losses) == 2
    assert all(math.isfinite(x) and x > 0 for x in losses)


def test_val_every_needs_val_data(tmp_path):
    write_vision_model(tmp_path)
    write_images(tmp_path, 16, seed=0)
    cfg = stage1_config(tmp_path)
    cfg.run.val_every = 5
    with pytest.raises(ConfigError, match="needs data.val"):
        train(cfg)
