"""Fixtures of the HTTP service tests: one tiny combined model, an index over a few images, running servers."""

from __future__ import annotations

from pathlib import Path

import pytest

import vlbridge
from vlbridge.index import ImageIndex, build_index
from vlbridge.serving import ServeSettings, create_app

from serve_support import ServerThread, combined_checkpoint, noise_image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return combined_checkpoint(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="session")
def model(model_dir):
    return vlbridge.load(model_dir)


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    for i in range(6):
        noise_image(i).save(root / ("sub" if i % 2 else ".") / f"img{i}.png")
    return root


@pytest.fixture(scope="session")
def index(model, photos, tmp_path_factory) -> ImageIndex:
    out = tmp_path_factory.mktemp("index") / "idx"
    build_index(photos, model, out, batch_size=4, progress=False)
    return ImageIndex(out, model)


@pytest.fixture(scope="module")
def server(model, index):
    """The default server (with the index); small pixel limit so a test image can exceed it."""
    settings = ServeSettings(max_pixels=250_000, max_wait_ms=20)
    with ServerThread(create_app(model, index, settings)) as s:
        yield s
