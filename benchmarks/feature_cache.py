"""Stage-1 input preparation: recomputing a frozen ViT-B/16 every epoch vs reading its features from the cache.

Stage 1 needs, per batch, the frozen vision encoder's features ``[B, 197, 768]``. Without a cache every epoch
decodes the images, augments and normalises them and runs the encoder; with :class:`vlbridge.data.feature_cache.
FeatureCache` that is done once (the *build*) and every epoch only reads fp16 rows from memory-mapped shards. Timed
on synthetic PNG photos with a ViT-B/16-sized ``Blip2VisionModel`` (random weights), batch 16, 2 CPU threads:

- (a) on the fly: ``CaptionDataset`` (load + ``TrainTransform``) through a DataLoader, then the fp32 encoder,
  and the same with the encoder in bf16 for reference;
- build: ``FeatureCache.build`` (same loading and augmentation, fp32 encoder, fp16 storage, written to disk);
- (b) cached: ``CachedCaptionDataset`` through a DataLoader (``collate_skipping``), with the shards in the page
  cache (warm) and after evicting them with ``posix_fadvise(DONTNEED)`` (cold; a no-op on tmpfs);
- reopen: ``FeatureCache.get_or_build`` finding the cache (weights fingerprint + a stat per image).

The amortised ratio for E epochs is ``E * a / (build + E * b)``.

    python benchmarks/feature_cache.py            # 64 images, batch 16 (about 3 minutes on 2 cores)
    python benchmarks/feature_cache.py --quick    # 8 images, batch 4 (under a minute)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from torch.utils.data import DataLoader

from vlbridge.data.datasets import CaptionDataset, CaptionRecord, collate_skipping
from vlbridge.data.feature_cache import CachedCaptionDataset, FeatureCache
from vlbridge.data.images import ImageProcessorConfig
from vlbridge.data.transforms import TrainTransform
from vlbridge.encoders.vision import FrozenVisionEncoder

VIT_B16 = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=16
)


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Photo-like PNGs (smooth gradients plus noise, 384x288 to 512x384), so decoding costs what real files cost."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = (384, 288) if i % 2 else (512, 384)
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / f"img{i:04d}.png"
        Image.fromarray(pixels, mode="RGB").save(path)
        paths.append(path)
    return paths


def epoch_on_the_fly(loader: DataLoader, encoder: torch.nn.Module) -> tuple[float, float]:
    """One epoch: returns (total seconds, seconds spent loading + preprocessing)."""
    load = 0.0
    start = time.perf_counter()
    t = start
    with torch.inference_mode():
        for batch in loader:
            load += time.perf_counter() - t
            encoder(batch["pixel_values"])
            t = time.perf_counter()
    return time.perf_counter() - start, load


def epoch_cached(loader: DataLoader) -> float:
    start = time.perf_counter()
    for batch in loader:
        batch["vision_feats"].sum()  # touch the data
    return time.perf_counter() - start


def evict(cache: FeatureCache) -> None:
    """Drop the shards from the page cache (clean pages only, so fsync first; the build already did)."""
    for info in cache.info["shards"]:
        fd = os.open(cache.root / info["file"], os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def median_time(fn: Callable[[], float], repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 images, batch 4")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--views", type=int, default=1, help="augmented views stored per image (build cost x views)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    n_images = args.images or (8 if args.quick else 64)
    batch = args.batch or (4 if args.quick else 16)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = transformers.Blip2VisionModel(transformers.Blip2VisionConfig(**VIT_B16))
    encoder = FrozenVisionEncoder(model)
    encoder_bf16 = copy.deepcopy(encoder).to(torch.bfloat16)
    config = ImageProcessorConfig(image_size=(224, 224))
    transform = TrainTransform(config)

    with tempfile.TemporaryDirectory(prefix="vlbridge-bench-cache-") as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        paths = write_images(root / "images", n_images)
        records = [CaptionRecord(p, f"a photo number {i}", p.stem) for i, p in enumerate(paths)]

        fly = DataLoader(CaptionDataset(records, transform), batch_size=batch, collate_fn=collate_skipping)
        with torch.inference_mode():  # warm-up: one batch each
            first = next(iter(fly))["pixel_values"]
            encoder(first)
            encoder_bf16(first)
        fly_total, fly_load = epoch_on_the_fly(fly, encoder)
        bf16_total, bf16_load = epoch_on_the_fly(fly, encoder_bf16)

        t = time.perf_counter()
        cache = FeatureCache.build(
            encoder, paths, root / "cache", transform_config=config, views=args.views, train_augment=True,
            batch_size=batch * args.views, progress=False,
        )  # fmt: skip
        build = time.perf_counter() - t
        t = time.perf_counter()
        reopened = FeatureCache.get_or_build(
            encoder, paths, root / "cache", transform_config=config, views=args.views, train_augment=True
        )
        reopen = time.perf_counter() - t
        assert reopened.key == cache.key

        dataset = CachedCaptionDataset(records, reopened)
        cached_loader = DataLoader(dataset, batch_size=batch, collate_fn=collate_skipping)
        epoch_cached(cached_loader)  # warm-up
        warm = median_time(lambda: epoch_cached(cached_loader), 5)

        def cold_epoch() -> float:
            evict(reopened)
            fresh = CachedCaptionDataset(records, FeatureCache.open(reopened.root))
            return epoch_cached(DataLoader(fresh, batch_size=batch, collate_fn=collate_skipping))

        cold = median_time(cold_epoch, 3)
        shard_mb = sum(i["rows"] for i in reopened.info["shards"]) * np.prod(reopened.feature_shape) * 2 / 2**20

    per_batch = max(1, -(-n_images // batch))
    print(
        f"\nStage-1 input preparation, 1 epoch = {n_images} images in {per_batch} batches of {batch}; "
        f"ViT-B/16 {tuple(reopened.feature_shape)} features, {args.threads} threads, views={args.views}, "
        f"cache {shard_mb:.1f} MB fp16\n"
    )
    fly_note = f"load+augment {fly_load:.2f} s, encoder {fly_total - fly_load:.2f} s"
    bf16_note = f"load+augment {bf16_load:.2f} s, encoder {bf16_total - bf16_load:.2f} s"
    rows = [
        ("(a) on the fly, fp32 encoder", fly_total, fly_note),
        ("(a) on the fly, bf16 encoder", bf16_total, bf16_note),
        ("cache build (once, fp32 encoder)", build, f"{build / (n_images * args.views) * 1e3:.0f} ms per image-view"),
        ("cache reopen (get_or_build hit)", reopen, "weights fingerprint + stat of every image"),
        ("(b) cached epoch, warm page cache", warm, "median of 5"),
        ("(b) cached epoch, cold (evicted)", cold, "median of 3"),
    ]
    print(f"| {'step':<36} | {'seconds':>9} | {'ms / batch':>10} | notes")
    print(f"|{'-' * 38}|{'-' * 11}|{'-' * 12}|{'-' * 50}")
    for name, seconds, note in rows:
        ms = "" if name.startswith("cache ") else f"{seconds / per_batch * 1e3:10.2f}"
        print(f"| {name:<36} | {seconds:9.3f} | {ms:>10} | {note}")

    print("\nSpeed-up of input preparation, cached (warm) vs on the fly; E epochs include the one build:")
    print(f"| {'':<26} | {'vs fp32 encoder':>15} | {'vs bf16 encoder':>15} |")
    print(f"|{'-' * 28}|{'-' * 17}|{'-' * 17}|")
    print(f"| {'per epoch (build excluded)':<26} | {fly_total / warm:14.0f}x | {bf16_total / warm:14.0f}x |")
    for epochs in (1, 5, 20):
        amortised = build + epochs * warm
        label = f"E = {epochs} incl. build"
        print(f"| {label:<26} | {epochs * fly_total / amortised:14.2f}x | {epochs * bf16_total / amortised:14.2f}x |")
    goal = fly_total / warm
    verdict = "met" if goal >= 5 else "NOT met"
    print(f"\nper-epoch ratio {goal:.0f}x (cold page cache: {fly_total / cold:.0f}x); goal >= 5x: {verdict}")


if __name__ == "__main__":
    main()
