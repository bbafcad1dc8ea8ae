"""Damaged bytes in every file the feature cache and the native format write: refused with the file's name on
open (or rebuilt, for a cache), and found anywhere by a full verification."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from PIL import Image

import vlbridge
from reliability.faults import one_line_error
from vlbridge.data.feature_cache import FeatureCache
from vlbridge.data.images import ImageProcessorConfig
from vlbridge.encoders.vision import FrozenVisionEncoder
from vlbridge.errors import CheckpointError, InputError
from vlbridge.interop.native import verify_native

CONFIG = ImageProcessorConfig(image_size=(16, 16))


def encoder() -> FrozenVisionEncoder:
    torch.manual_seed(0)
    cfg = transformers.Blip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16, patch_size=4
    )
    model = transformers.Blip2VisionModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return FrozenVisionEncoder(model, layer=-1)


@pytest.fixture(scope="module")
def cache_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    images = []
    for i in range(12):
        path = root / f"{i}.png"
        Image.new("RGB", (16, 16), (20 * i, 100, 200 - 10 * i)).save(path)
        images.append(path)
    enc = encoder()
    # shard_bytes: about four images a shard, so there are several shards to damage
    cache = FeatureCache.build(enc, images, root / "cache", transform_config=CONFIG, progress=False, shard_bytes=4400)
    return enc, images, cache.root


@pytest.fixture()
def cache_copy(cache_source, tmp_path):
    enc, images, root = cache_source
    copy = tmp_path / "cache" / root.name
    shutil.copytree(root, copy)
    return enc, images, copy


def zero_shard(root):
    path = root / "shard-00001.bin"
    path.write_bytes(b"\0" * path.stat().st_size)


def swap_index_rows(root):
    index = json.loads((root / "index.json").read_text())
    a, b = list(index["images"])[:2]
    index["images"][a], index["images"][b] = index["images"][b], index["images"][a]
    (root / "index.json").write_text(json.dumps(index))


def truncate_shard(root):
    path = root / "shard-00000.bin"
    path.write_bytes(path.read_bytes()[:-100])


def garble_index(root):
    (root / "index.json").write_text('{"format": "vlbridge-feature-cache", "format_version": 2, "complete": true')


def random_bytes_at_start(root):
    path = root / "shard-00002.bin"
    data = bytearray(path.read_bytes())
    data[:64] = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8).tolist()
    path.write_bytes(bytes(data))


CACHE_FAULTS = [zero_shard, swap_index_rows, truncate_shard, garble_index, random_bytes_at_start]


@pytest.mark.parametrize("fault", CACHE_FAULTS, ids=[f.__name__ for f in CACHE_FAULTS])
def test_a_damaged_cache_is_refused_on_open_and_rebuilt(cache_copy, fault):
    enc, images, root = cache_copy
    good = FeatureCache.open(root).features(images)
    fault(root)
    with pytest.raises(InputError):
        FeatureCache.open(root)
    rebuilt = FeatureCache.get_or_build(enc, images, root.parent, transform_config=CONFIG, progress=False)
    assert torch.equal(rebuilt.features(images), good)


def test_a_flipped_byte_anywhere_is_found_by_full_verification(cache_copy):
    _, images, root = cache_copy
    path = root / "shard-00001.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2 + 7] ^= 0x10  # a place the cheap sampled check may not read
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="shard-00001.bin"):
        FeatureCache.open(root).verify()


# ----------------------------------------------------------------------------------------------------- native
@pytest.fixture(scope="module")
def native_source(tmp_path_factory):
    from factory import Sizes, build_checkpoint

    root = tmp_path_factory.mktemp("native")
    hf = build_checkpoint(root / "hf", family="opt", sizes=Sizes(image_size=32), seed=3)
    vlbridge.load(hf).save(root / "native", format="native")
    image = root / "cat.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(image)
    return root / "native", image


@pytest.fixture()
def native(native_source, tmp_path):
    source, image = native_source
    shutil.copytree(source, tmp_path / "m")
    return tmp_path / "m", image


def edit_meta(path, change):
    meta = json.loads((path / "vlbridge.json").read_text())
    change(meta)
    (path / "vlbridge.json").write_text(json.dumps(meta))


def set_key(key, value):
    def change(meta):
        meta["config"][key] = value

    return change


def shape_change(meta):
    meta["config"]["bridge"]["qformer"]["hidden_size"] += 6
    meta.pop("files")  # as if written so, not damaged


NATIVE_FAULTS = {
    "truncated weights": lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:999]),
    "zero-byte weights": lambda p: (p / "model.safetensors").write_bytes(b""),
    "invalid json": lambda p: (p / "vlbridge.json").write_text("{oops"),
    "json not an object": lambda p: (p / "vlbridge.json").write_text("[1, 2]"),
    "unknown config key": lambda p: edit_meta(p, set_key("no_such_setting", 1)),
    "wrong config type": lambda p: edit_meta(p, set_key("qformer", "big")),
    "shape change": lambda p: edit_meta(p, shape_change),
    "corrupt tokenizer": lambda p: (p / "tokenizer" / "tokenizer.json").write_text("{not json"),
    "corrupt tokenizer, no checksums": lambda p: (
        edit_meta(p, lambda meta: meta.pop("files")),
        (p / "tokenizer" / "tokenizer.json").write_text("{not json"),
    ),
}


@pytest.mark.parametrize("fault", list(NATIVE_FAULTS))
def test_a_damaged_native_checkpoint_is_one_line(native, fault, capsys):
    path, image = native
    NATIVE_FAULTS[fault](path)
    with pytest.raises(CheckpointError):
        vlbridge.load(path)
    line = one_line_error(capsys, ["caption", "--model", str(path), str(image)])
    assert str(path) in line


def test_native_full_verification_finds_a_flipped_byte(native):
    path, _ = native
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 + 3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        verify_native(path)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        vlbridge.load(path, verify=True)
