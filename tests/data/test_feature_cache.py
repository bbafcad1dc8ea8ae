"""Frozen vision-feature cache: exactness against on-the-fly encoding, keys, atomic builds, skipping, dataset."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from torch.utils.data import DataLoader

from vlbridge.data.datasets import CaptionRecord, SkipReport, collate_skipping
from vlbridge.data.feature_cache import (
    CachedCaptionDataset,
    FeatureCache,
    canonical_path,
    encoder_fingerprint,
    feature_cache_key,
    view_pixels,
)
from vlbridge.data.images import ImageProcessorConfig, load_image
from vlbridge.data.transforms import EvalTransform, TrainTransform, augmentation_seed
from vlbridge.encoders.vision import FrozenVisionEncoder
from vlbridge.errors import InputError

CONFIG = ImageProcessorConfig(image_size=(32, 32))
SIZES = [(40, 30), (32, 32), (50, 64), (24, 36), (33, 47)]


def make_encoder(seed: int = 0, layer: int = -1) -> FrozenVisionEncoder:
    torch.manual_seed(seed)
    config = transformers.Blip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    model = transformers.Blip2VisionModel(config)
    with torch.no_grad():  # BLIP-2 initialises with std 1e-10: re-draw so features are far from zero
        for name, param in model.named_parameters():
            is_norm_weight = "norm" in name and name.endswith("weight")
            param.copy_(1 + 0.1 * torch.randn(param.shape) if is_norm_weight else 0.2 * torch.randn(param.shape))
    return FrozenVisionEncoder(model, layer=layer)


class CallCounter:
    """Counts encoder forward calls (and can fail on the n-th, to simulate a crash mid-build)."""

    def __init__(self, encoder: torch.nn.Module, fail_on: int | None = None) -> None:
        self.calls = 0
        self.fail_on = fail_on
        encoder.register_forward_pre_hook(self)

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        self.calls += 1
        if self.fail_on is not None and self.calls == self.fail_on:
            raise RuntimeError("simulated crash")


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB").save(path)
        paths.append(path)
    return paths


def encode(encoder: torch.nn.Module, pixels: torch.Tensor, dtype: torch.dtype, batch: int = 32) -> torch.Tensor:
    """On-the-fly features, rounded to the storage dtype, in the build's batches.

    A CPU encoder's float32 output depends on the batch composition in the last bit (GEMM blocking), so bit
    equality with the cache holds for the same batches; other batchings agree to within a storage ulp.
    """
    with torch.inference_mode():
        return torch.cat([encoder(chunk).to(dtype).float() for chunk in pixels.split(batch)])


def expected_eval(encoder: torch.nn.Module, paths: list[Path], dtype: torch.dtype, batch: int = 32) -> torch.Tensor:
    transform = EvalTransform(CONFIG)
    return encode(encoder, torch.stack([transform(load_image(p)) for p in paths]), dtype, batch)


def build(encoder, paths, directory, **kwargs) -> FeatureCache:
    kwargs.setdefault("transform_config", CONFIG)
    kwargs.setdefault("progress", False)
    return FeatureCache.build(encoder, paths, directory, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_eval_view_equals_on_the_fly(images, tmp_path, dtype):
    encoder = make_encoder()
    cache = build(encoder, images, tmp_path / "cache", dtype=dtype, batch_size=2)
    assert len(cache) == len(images) and cache.num_views == 1 and cache.dtype == dtype
    assert cache.feature_shape == (17, 32)
    expected = expected_eval(encoder, images, dtype, batch=2)  # the build's batches: [0, 1], [2, 3], [4]
    order = [3, 0, 4, 1, 2, 0]  # any order, repeats allowed
    got = cache.features([images[i] for i in order], 0)
    assert got.dtype == torch.float32 and got.shape == (6, 17, 32)
    assert torch.equal(got, expected[order])
    # one image at a time on the fly: float32 differs in the last bit, so at most one storage ulp apart
    ulp = 2**-10 if dtype == torch.float16 else 2**-7
    torch.testing.assert_close(got, expected_eval(encoder, images, dtype, batch=1)[order], rtol=ulp, atol=ulp)
    stored = cache.features([str(images[2])], [0], dtype=None)
    assert stored.dtype == dtype and torch.equal(stored.float(), expected[2:3])
    # any spelling of a path finds the same image
    relative = os.path.relpath(images[1])
    assert cache.has(relative) and relative in cache and torch.equal(cache.features([relative]), expected[1:2])
    raw = np.fromfile(cache.root / "shard-00000.bin", dtype="<u2")  # little-endian fp16 / bf16 bits
    assert raw.size == len(images) * 17 * 32


def test_augmented_views_equal_documented_seeding(images, tmp_path):
    encoder = make_encoder()
    kwargs = {"scale": (0.3, 1.0), "hflip": 0.5}
    cache = build(
        encoder, images, tmp_path / "cache", views=3, train_augment=True, seed=7, train_transform_kwargs=kwargs
    )
    assert cache.num_views == 3
    transform = TrainTransform(CONFIG, **kwargs)
    pixels = []
    for path in images:
        # the documented recipe, spelled out
        seeds = [augmentation_seed(7, "view", v, Path(os.path.abspath(path)).as_posix()) for v in range(3)]
        assert seeds == [cache.view_seed(path, v) for v in range(3)]
        pixels += [transform(load_image(path), generator=torch.Generator().manual_seed(s)) for s in seeds]
    assert torch.equal(
        pixels[4],
        view_pixels(images[1], 1, transform_config=CONFIG, train_augment=True, seed=7, train_transform_kwargs=kwargs),
    )
    expected = encode(encoder, torch.stack(pixels), torch.float16)  # one batch of 15 rows, as the build did
    got = cache.features([p for p in images for _ in range(3)], [0, 1, 2] * len(images))
    assert torch.equal(got, expected)
    assert not torch.equal(got[0], got[1])  # the views are different augmentations
    with pytest.raises(InputError, match="out of range"):
        cache.features([images[0]], 3)


def test_reopen_reuses_without_encoding(images, tmp_path):
    encoder = make_encoder()
    counter = CallCounter(encoder)
    first = FeatureCache.get_or_build(encoder, images, tmp_path, transform_config=CONFIG, progress=False, batch_size=2)
    assert counter.calls == 3
    again = FeatureCache.get_or_build(
        encoder, list(reversed(images)), tmp_path, transform_config=CONFIG, progress=False
    )  # order of the image list does not matter
    assert counter.calls == 3 and again.key == first.key
    assert torch.equal(again.features(images), first.features(images))
    opened = FeatureCache.open(tmp_path, first.key)
    assert opened.key == first.key and opened.paths == first.paths
    assert [p.name for p in tmp_path.iterdir() if p.name != "images"] == [first.key]  # no leftovers
    # build() always recomputes, replacing the folder in place
    rebuilt = FeatureCache.build(encoder, images, tmp_path, transform_config=CONFIG, progress=False, batch_size=2)
    assert counter.calls == 6 and rebuilt.key == first.key
    assert torch.equal(rebuilt.features(images), first.features(images))
    assert [p.name for p in tmp_path.iterdir() if p.name != "images"] == [first.key]


def test_key_changes_with_weights_preprocessing_settings_and_files(images, tmp_path):
    encoder = make_encoder()

    def key(enc=encoder, imgs=images, **kwargs):
        kwargs.setdefault("transform_config", CONFIG)
        return feature_cache_key(enc, imgs, **kwargs)

    base = key()
    assert key() == base and key(imgs=[str(p) for p in reversed(images)]) == base
    assert key(enc=make_encoder()) == base  # same weights, separately built

    other = make_encoder()
    with torch.no_grad():
        other.model.encoder.layers[1].mlp.fc1.weight[3, 5] += 1e-3  # one weight, deep inside
    keys = {
        "weights": key(enc=other),
        "layer": key(enc=make_encoder(layer=-2)),
        "size": key(transform_config=ImageProcessorConfig(image_size=(32, 32), resample=2)),
        "mean": key(transform_config=ImageProcessorConfig(image_size=(32, 32), mean=(0.5, 0.5, 0.5))),
        "dtype": key(dtype=torch.bfloat16),
        "augment": key(train_augment=True),
        "views": key(train_augment=True, views=2),
        "images": key(imgs=images[:-1]),
    }
    assert key(train_augment=True, seed=1) != keys["augment"]
    assert key(seed=1) == base  # the seed does not matter without augmentation
    st = images[0].stat()
    os.utime(images[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    keys["mtime"] = key()
    assert len(set(keys.values()) | {base}) == len(keys) + 1, keys

    # a cache built before the file changed is not reused
    counter = CallCounter(encoder)
    os.utime(images[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    old = FeatureCache.get_or_build(encoder, images, tmp_path / "c", transform_config=CONFIG, progress=False)
    assert old.key == base and counter.calls == 1
    Image.new("RGB", (20, 20), (255, 0, 0)).save(images[0])
    new = FeatureCache.get_or_build(encoder, images, tmp_path / "c", transform_config=CONFIG, progress=False)
    assert new.key != base and counter.calls == 2
    assert torch.equal(new.features(images[:1]), expected_eval(encoder, images, torch.float16)[:1])


def test_fingerprint_sees_every_byte_and_order():
    encoder = make_encoder()
    weight = encoder.model.encoder.layers[0].mlp.fc1.weight
    base = {mode: encoder_fingerprint(encoder, mode=mode) for mode in ("fast", "sha256")}
    with torch.no_grad():
        weight[20, 10] = torch.nextafter(weight[20, 10], torch.tensor(9.0))  # 1 ulp, mid-tensor
    assert all(encoder_fingerprint(encoder, mode=m) != base[m] for m in base)
    with torch.no_grad():
        weight[20, 10] = torch.nextafter(weight[20, 10], torch.tensor(-9.0))
    assert all(encoder_fingerprint(encoder, mode=m) == base[m] for m in base)
    with torch.no_grad():
        weight[[30, 31]] = weight[[31, 30]].clone()  # same multiset of values, other order
    assert encoder_fingerprint(encoder) != base["fast"]


def test_corrupt_and_missing_images_are_skipped_and_reported(images, tmp_path, caplog):
    images[1].write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    gone = images[0].parent / "gone.png"
    encoder = make_encoder()
    with caplog.at_level(logging.WARNING, logger="vlbridge.data.feature_cache"):
        cache = build(encoder, [*images, gone], tmp_path / "cache", batch_size=2)
    assert len(cache) == len(images) - 1
    assert not cache.has(images[1]) and not cache.has(gone)
    assert set(cache.missing) == {canonical_path(images[1]), canonical_path(gone)}
    assert "ImageError" in cache.missing[canonical_path(images[1])]
    report = cache.skip_report()
    assert isinstance(report, SkipReport) and report.count == 2 and report.samples == len(images) - 1
    assert "skipped 2 samples" in caplog.text
    good = [images[0], *images[2:]]
    # the build encoded [0], [2, 3], [4]: the batches of 2 minus the skipped images
    expected = torch.cat([expected_eval(encoder, group, torch.float16) for group in ([good[0]], good[1:3], good[3:])])
    assert torch.equal(cache.features(good), expected)
    with pytest.raises(InputError, match="skipped at build time"):
        cache.features([images[1]])
    with pytest.raises(InputError, match="other images"):
        cache.features([images[0].parent / "never-listed.png"])


def test_interrupted_build_leaves_nothing_readable(images, tmp_path):
    encoder = make_encoder()
    counter = CallCounter(encoder, fail_on=2)
    directory = tmp_path / "cache"
    key = feature_cache_key(encoder, images, transform_config=CONFIG)
    with pytest.raises(RuntimeError, match="simulated crash"):
        FeatureCache.get_or_build(encoder, images, directory, transform_config=CONFIG, progress=False, batch_size=2)
    assert list(directory.iterdir()) == []  # the temporary folder is gone
    with pytest.raises(InputError, match="no feature cache"):
        FeatureCache.open(directory, key)

    # A hard crash (no cleanup) leaves a temp folder: never read. A half-written key folder is not opened either.
    (directory / f".tmp-{key[:16]}-dead").mkdir()
    (directory / key).mkdir()
    (directory / key / "shard-00000.bin").write_bytes(b"\0" * 100)
    with pytest.raises(InputError, match="no feature cache"):
        FeatureCache.open(directory, key)
    counter.fail_on = None
    cache = FeatureCache.get_or_build(encoder, images, directory, transform_config=CONFIG, progress=False)
    assert cache.key == key and len(cache) == len(images)
    assert torch.equal(cache.features(images), expected_eval(encoder, images, torch.float16))

    # an index that is not marked complete, or shards of the wrong size, are refused
    index = json.loads((cache.root / "index.json").read_text())
    (cache.root / "index.json").write_text(json.dumps({**index, "complete": False}))
    with pytest.raises(InputError, match="incomplete"):
        FeatureCache.open(directory, key)
    (cache.root / "index.json").write_text(json.dumps(index))
    with open(cache.root / "shard-00000.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(InputError, match="bytes, expected"):
        FeatureCache.open(cache.root)


def test_cached_dataset_through_dataloader(images, tmp_path):
    images[4].write_bytes(b"garbage")
    encoder = make_encoder()
    cache = build(encoder, images, tmp_path / "cache", views=2, train_augment=True, seed=3)
    records = [CaptionRecord(p, f"caption {i} of {p.stem}", p.stem) for p in images for i in range(2)]
    dataset = CachedCaptionDataset(records, cache, seed=1)
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_skipping)
    seen: dict[int, int] = {}
    report = SkipReport()
    for batch in loader:
        report.update(batch)
        if batch["batch_size"] == 0:
            continue
        feats = batch["vision_feats"]
        assert feats.dtype == torch.float32 and feats.shape == (batch["batch_size"], 17, 32)
        paths = [records[i].image for i in batch["index"].tolist()]
        assert torch.equal(feats, cache.features(paths, batch["view"].tolist()))
        assert batch["text"] == [records[i].caption for i in batch["index"].tolist()]
        seen.update(zip(batch["index"].tolist(), batch["view"].tolist()))
    assert report.count == 2 and report.samples == 8 and report.paths == [str(images[4])]
    assert sorted(seen) == list(range(8))
    # cycle: the next epoch uses the other view of every item
    dataset.set_epoch(1)
    assert all(dataset.view_for(i) == 1 - v for i, v in seen.items())
    item = dataset[0]
    assert torch.equal(item["vision_feats"], cache.features([images[0]], item["view"])[0])
    assert dataset[9].reason.startswith("ImageError")

    random_views = CachedCaptionDataset(records, cache, view_selection="random")
    picks = {(e, i): (random_views.set_epoch(e), random_views.view_for(i))[1] for e in range(4) for i in range(8)}
    assert set(picks.values()) == {0, 1}

    # records whose image was never cached are skipped too
    stranger = CachedCaptionDataset([CaptionRecord(tmp_path / "x.png", "x", "x")], cache)
    assert stranger[0].reason == "not in the feature cache"


def test_memory_mapped_and_sharded(images, tmp_path):
    encoder = make_encoder()
    row_bytes = 17 * 32 * 2
    cache = build(encoder, images, tmp_path / "cache", views=2, train_augment=True, shard_bytes=5 * row_bytes)
    assert [s["rows"] for s in cache.info["shards"]] == [4, 4, 2]  # whole images per shard (2 views each)
    reopened = FeatureCache.open(cache.root)
    assert reopened._maps == {}  # opening reads the index only
    shard = reopened.shard(1)
    assert isinstance(shard, np.memmap) and shard.shape == (4, 17, 32) and not shard.flags.writeable
    transform = TrainTransform(CONFIG)
    pixels = [
        transform(load_image(p), generator=torch.Generator().manual_seed(cache.view_seed(p, v)))
        for p in images
        for v in range(2)
    ]
    expected = encode(encoder, torch.stack(pixels), torch.float16)[-1:]  # view 1 of the last image
    last = images[-1]
    assert torch.equal(reopened.features([last], 1), expected)
    # pickling (spawned DataLoader workers) carries the index, not the mapped features
    assert len(reopened._maps) == 2
    blob = pickle.dumps(reopened)
    assert len(blob) == len(pickle.dumps(FeatureCache.open(cache.root)))  # mapped shards add nothing
    assert torch.equal(pickle.loads(blob).features([last], 1), expected)


def test_invalid_settings(images, tmp_path):
    encoder = make_encoder()
    with pytest.raises(InputError, match="identical eval views"):
        build(encoder, images, tmp_path, views=2)
    with pytest.raises(InputError, match="fixed image size"):
        build(encoder, images, tmp_path, transform_config=ImageProcessorConfig(shortest_edge=32))
    with pytest.raises(InputError, match="dtype"):
        build(encoder, images, tmp_path, dtype=torch.int8)
    with pytest.raises(InputError, match="empty"):
        build(encoder, [], tmp_path)
    with pytest.raises(InputError, match="only view 0"):
        view_pixels(images[0], 1, transform_config=CONFIG)
