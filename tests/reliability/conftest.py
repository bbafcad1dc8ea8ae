"""Shared material for the fault-injection tests: one tiny image set and vision model."""

from __future__ import annotations

from pathlib import Path

import pytest

from training_data import stage1_config, write_images, write_vision_model


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """32 training images (16x16), a 2-layer CLIP vision model and the tiny stage-1 config as YAML."""
    from vlbridge.config import save_yaml

    root = tmp_path_factory.mktemp("reliability")
    write_images(root, 32, seed=0)
    write_vision_model(root)
    save_yaml(stage1_config(root), root / "s1.yaml")
    return root
