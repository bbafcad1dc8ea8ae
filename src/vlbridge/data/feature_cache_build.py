"""Building a feature cache: every image view through the frozen encoder, into raw shards and a checksummed
index, in a temporary folder that is swapped in whole (see :mod:`vlbridge.data.feature_cache`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vlbridge.data.datasets import SkippedSample, SkipReport
from vlbridge.data.feature_cache_keys import (
    _STORAGE,
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    _make_transform,
    _Spec,
    views_of,
)
from vlbridge.data.images import load_image
from vlbridge.errors import ImageError, InputError
from vlbridge.utils.io import file_digest, replace_dir

logger = logging.getLogger("vlbridge.data.feature_cache")


# --------------------------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _ViewImages(Dataset):
    """Item ``i``: ``(i, pixels [views, 3, H, W])`` for image ``paths[i]``, or a SkippedSample."""

    def __init__(self, paths: Sequence[str], spec: _Spec) -> None:
        self.paths = list(paths)
        self.spec = spec
        self.transform = _make_transform(spec.transform_config, spec.train_augment, spec.train_transform_kwargs)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Tensor] | SkippedSample:
        path = self.paths[i]
        try:
            image = load_image(path)
            views = range(self.spec.views)
            pixels = views_of(image, path, views, self.transform, self.spec.train_augment, self.spec.seed)
        except (ImageError, OSError) as exc:
            logger.debug("feature cache: skipping %s: %s", path, exc)
            return SkippedSample(path, _reason(exc))
        return i, torch.stack(pixels)


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


def _to_numpy(features: Tensor, storage: np.dtype) -> np.ndarray:
    """Features already in the storage dtype → little-endian numpy array of the stored bits."""
    features = features.detach().cpu().contiguous()
    if features.dtype == torch.bfloat16:
        return features.view(torch.int16).numpy().view(np.uint16).astype(storage, copy=False)
    return features.numpy().astype(storage, copy=False)


class _ShardWriter:
    """Appends blocks of ``views`` rows to raw shard files of at most ``shard_bytes`` (at least one image each)."""

    def __init__(self, folder: Path, storage: np.dtype, views: int, shard_bytes: int) -> None:
        self.folder = folder
        self.storage = storage
        self.views = views
        self.shard_bytes = shard_bytes
        self.shards: list[dict[str, Any]] = []
        self.row_shape: tuple[int, ...] | None = None
        self.rows_per_shard = 0
        self._file: Any = None

    def write(self, block: np.ndarray) -> tuple[int, int]:
        """Store ``block`` ``[views, *row_shape]``; returns ``(shard, first row)``."""
        if self.row_shape is None:
            self.row_shape = tuple(block.shape[1:])
            row_bytes = int(np.prod(self.row_shape)) * self.storage.itemsize
            self.rows_per_shard = max(1, self.shard_bytes // (row_bytes * self.views)) * self.views
        elif tuple(block.shape[1:]) != self.row_shape:
            raise InputError(f"encoder output shape changed from {list(self.row_shape)} to {list(block.shape[1:])}")
        if self._file is None or self.shards[-1]["rows"] + self.views > self.rows_per_shard:
            self._close_current()
            name = f"shard-{len(self.shards):05d}.bin"
            self._file = open(self.folder / name, "wb")  # noqa: SIM115 - closed in _close_current
            self.shards.append({"file": name, "rows": 0})
        shard = self.shards[-1]
        row = shard["rows"]
        self._file.write(np.ascontiguousarray(block).tobytes())
        shard["rows"] += self.views
        return len(self.shards) - 1, row

    def _close_current(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> None:
        self._close_current()


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _device_of(module: nn.Module) -> torch.device:
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _tables_digest(images: Mapping[str, Any], missing: Mapping[str, Any], shards: Any) -> str:
    """SHA-256 of the index's tables, so a hand-edited or damaged index (two rows swapped) is refused."""
    return hashlib.sha256(json.dumps([images, missing, shards], sort_keys=True).encode()).hexdigest()


def _build(
    encoder: nn.Module,
    paths: list[str],
    directory: Path,
    key: str,
    material: dict[str, Any],
    spec: _Spec,
    *,
    batch_size: int,
    num_workers: int,
    progress: bool,
    shard_bytes: int,
) -> Path:
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if shard_bytes < 1:
        raise InputError(f"shard_bytes must be >= 1, got {shard_bytes}")
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=directory))
    start = time.perf_counter()
    try:
        storage = np.dtype(_STORAGE[spec.dtype][1])
        writer = _ShardWriter(tmp, storage, spec.views, shard_bytes)
        loader = DataLoader(
            _ViewImages(paths, spec),
            batch_size=max(1, batch_size // spec.views),  # batch_size counts encoded rows (image-views)
            num_workers=num_workers,
            collate_fn=_as_list,
        )
        index: dict[str, list[int]] = {}
        missing: dict[str, str] = {}
        device = _device_of(encoder)
        try:
            with (
                torch.inference_mode(),
                _eval_mode(encoder),
                tqdm(total=len(paths), desc="caching vision features", unit="img", disable=not progress) as bar,
            ):
                for batch in loader:
                    good = [item for item in batch if not isinstance(item, SkippedSample)]
                    missing.update((item.path, item.reason) for item in batch if isinstance(item, SkippedSample))
                    if good:
                        pixels = torch.cat([p for _, p in good]).to(device)
                        features = _to_numpy(encoder(pixels).to(spec.dtype), storage)
                        if features.shape[0] != pixels.shape[0]:
                            raise InputError(f"encoder returned {features.shape[0]} rows for {pixels.shape[0]} images")
                        for k, (i, _) in enumerate(good):
                            index[paths[i]] = list(writer.write(features[k * spec.views : (k + 1) * spec.views]))
                    bar.update(len(batch))
        finally:
            writer.close()
        _write_json(
            tmp / INDEX_FILE,
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "key": key,
                "complete": True,
                "dtype": _STORAGE[spec.dtype][0],
                "storage": storage.str,
                "feature_shape": list(writer.row_shape) if writer.row_shape is not None else None,
                "views": spec.views,
                "train_augment": spec.train_augment,
                "seed": spec.seed,
                "train_transform_kwargs": spec.train_transform_kwargs,
                "shards": writer.shards,
                "images": index,
                "missing": missing,
                "checksums": {
                    shard["file"]: {
                        "size": (tmp / shard["file"]).stat().st_size,
                        "sample": file_digest(tmp / shard["file"]),
                        "full": file_digest(tmp / shard["file"], full=True),
                    }
                    for shard in writer.shards
                },
                "tables_sha256": _tables_digest(index, missing, writer.shards),
                "key_material": material,
                "build_seconds": round(time.perf_counter() - start, 3),
            },
        )
        final = directory / key
        replace_dir(tmp, final)  # readers that already opened the old shards keep them (POSIX) until they close
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if missing:
        report = SkipReport()
        report.update(SkippedSample(p, r) for p, r in missing.items())
        report.samples = len(index)
        logger.warning("feature cache %s: %s", key[:16], report.summary())
    return final
