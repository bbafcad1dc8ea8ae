"""Unusable data stops training with one line instead of looping; skip reports are per epoch; odd paths are
named for what they are."""

from __future__ import annotations

import json
import os

import pytest

from reliability.faults import config, one_line_error
from training_data import write_images
from vlbridge.config import save_yaml
from vlbridge.errors import ImageError, InputError
from vlbridge.training.loop import train


def manifest_of_broken_images(root, n):
    (root / "img").mkdir()
    lines = []
    for i in range(n):
        (root / "img" / f"{i}.png").write_bytes(b"\x89PNG broken")
        lines.append(json.dumps({"image": f"img/{i}.png", "caption": "nothing"}))
    (root / "bad.jsonl").write_text("\n".join(lines) + "\n")
    return root / "bad.jsonl"


def test_a_dataset_without_a_usable_image_stops_at_once(world, tmp_path, capsys):
    manifest = manifest_of_broken_images(tmp_path, 16)
    save_yaml(config(world, tmp_path / "run", **{"data.train": [str(manifest)]}), tmp_path / "c.yaml")
    line = one_line_error(capsys, ["train", str(tmp_path / "c.yaml"), "run.max_steps=100"])
    assert "epoch 0: no usable sample" in line and "/img/" in line and "Pillow" in line


def test_more_than_the_allowed_fraction_skipped_stops(world, tmp_path):
    write_images(tmp_path, 10, seed=5, corrupt=6)  # 6 of 16 broken
    for name in ("vision",):
        os.symlink(world / name, tmp_path / name)
    cfg = config(tmp_path, tmp_path / "run", **{"data.max_skip_fraction": 0.25, "data.batch_size": 4})
    from vlbridge.errors import TrainingError

    with pytest.raises(TrainingError, match="max_skip_fraction"):
        train(cfg)


def test_the_skip_report_is_per_epoch(world, tmp_path, capsys):
    write_images(tmp_path, 14, seed=5, corrupt=2)  # 16 records, 2 broken; batches of 4: 4 steps per epoch
    os.symlink(world / "vision", tmp_path / "vision")
    cfg = config(tmp_path, tmp_path / "run", **{"data.batch_size": 4, "run.max_steps": 12, "run.save_every": 100})
    summary = train(cfg)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 3 and all("skipped 2 samples" in line for line in lines), lines
    assert summary["skipped"]["skipped"] == 6  # the run's total: 3 epochs x 2


def test_a_manifest_that_is_a_folder_says_so(tmp_path):
    from vlbridge.data.datasets import read_caption_manifest

    (tmp_path / "m.jsonl").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        read_caption_manifest(tmp_path / "m.jsonl")


def test_a_symlink_loop_says_so(tmp_path):
    from vlbridge.data.images import load_image

    os.symlink(tmp_path / "b.png", tmp_path / "a.png")
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")
    with pytest.raises(ImageError, match="symlink loop"):
        load_image(tmp_path / "a.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "dangling.png")
    with pytest.raises(ImageError, match="broken symlink"):
        load_image(tmp_path / "dangling.png")


def test_training_rebuilds_a_feature_cache_damaged_where_the_quick_check_does_not_look(
    world, tmp_path, capsys, monkeypatch
):
    from vlbridge.data import feature_cache as fc

    cache = tmp_path / "cache"
    train(config(world, tmp_path / "a", **{"data.feature_cache": str(cache), "run.max_steps": 1}))
    (shard,) = [p for p in cache.glob("*/shard-*.bin")]
    original = shard.read_bytes()
    data = bytearray(original)
    data[len(data) // 2 + 11] ^= 0x40
    shard.write_bytes(bytes(data))
    # This shard is small enough for the sampled check to read all of it; in a large one a flipped byte may sit
    # between the samples. Make the quick check blind, so that only the full pass at train start can see it.
    real = fc.verify_digests
    monkeypatch.setattr(fc, "verify_digests", lambda root, d, full=False: real(root, d, full=True) if full else None)
    capsys.readouterr()
    train(config(world, tmp_path / "b", **{"data.feature_cache": str(cache), "run.max_steps": 1}))
    assert "rebuilding the feature cache" in capsys.readouterr().err
    from vlbridge.data.feature_cache import FeatureCache

    (root,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    FeatureCache.open(root).verify()  # the rebuilt cache is whole
    assert (root / shard.name).read_bytes() == original
