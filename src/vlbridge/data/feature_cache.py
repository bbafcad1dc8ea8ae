"""A disk cache of frozen vision-encoder features, so stage-1 training never runs the vision encoder.

Stage 1 (Q-Former pre-training) reads the *frozen* image encoder's output ``[N, Dv]`` per image. It never changes,
so :meth:`FeatureCache.build` computes it once per ``(image, view)`` and stores it on disk; training then reads rows
from memory-mapped shards (:class:`CachedCaptionDataset`) instead of decoding, resizing and encoding every image
every epoch.

**Views.** With ``train_augment=False`` there is one view, the eval transform (resize + normalise, exactly
:class:`~vlbridge.data.transforms.EvalTransform`). With ``train_augment=True`` there are ``views`` augmented views
per image, each a :class:`~vlbridge.data.transforms.TrainTransform` whose generator is seeded, independently of the
epoch, from the base seed, the view number and the image path::

    generator = torch.Generator().manual_seed(augmentation_seed(seed, "view", view, canonical_path(path)))
    pixels = TrainTransform(transform_config, **train_transform_kwargs)(load_image(path), generator=generator)

where ``canonical_path(path) == Path(os.path.abspath(path)).as_posix()``. :func:`view_pixels` does exactly this,
so a trainer (or a test) can recompute any cached view. A training run then picks one stored view per epoch
(:class:`CachedCaptionDataset`), so ``views`` is the number of distinct augmentations an image ever gets.

**Exactness.** A stored row is ``encoder(pixels).to(dtype)`` of those pixels, bit for bit, for the batch the build
encoded (``batch_size // views`` images, skipped images left out, in the order of ``images``). On a CPU the float32
output of a transformer depends on the batch composition in the last bit (GEMM blocking), so against a different
batching the cached features agree to within one storage ulp, not bit for bit.

**Layout.** ``directory/<key>/index.json`` plus ``shard-00000.bin``, ... : raw little-endian row-major arrays
``[rows, N, Dv]`` of float16 (``<f2``) or bfloat16 (stored as its ``<u2`` bits and viewed back as bfloat16 by
torch), at most ``shard_bytes`` (256 MiB) each. The views of one image are consecutive rows of one shard; the
index maps each image's canonical path to ``[shard, first row]`` and lists the images that could not be read under
``"missing"`` with the reason. Shards are opened with :class:`numpy.memmap`, lazily: opening a cache reads only
the index, and a batch reads only its own rows.

**Keys.** ``key`` is the SHA-256 of a canonical JSON of everything that determines the stored numbers (see
:func:`feature_cache_key`): the encoder's weights (:func:`encoder_fingerprint`), class, model config and layer
choice; the preprocessing config; views, augmentation settings and seed; the storage dtype; and each image's
canonical path, size and modification time (ns). Any change gives a different key, hence a different folder: a
stale cache is never read, it is simply not found. :meth:`FeatureCache.get_or_build` reuses a folder whose key
matches and builds one otherwise.

**Atomicity.** A build writes into ``directory/.tmp-<key>-...`` and renames it to ``directory/<key>`` only after
every shard and the index are written and fsynced. An exception (including Ctrl-C) removes the temporary folder; a
hard crash can leave one behind, but it is never read (only ``<key>`` folders with a complete index are opened)
and may be deleted at any time. Under ``torch.distributed``, build on one rank, ``barrier()``, then
:meth:`FeatureCache.open` (or ``get_or_build``) everywhere.

**Bad images.** An unreadable image does not stop the build: it is recorded under ``"missing"``
(:meth:`FeatureCache.skip_report`), logged, and :class:`CachedCaptionDataset` returns a
:class:`~vlbridge.data.datasets.SkippedSample` for its captions, which :func:`~vlbridge.data.datasets.collate_skipping`
drops and reports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vlbridge.data.datasets import CaptionRecord, SkippedSample, SkipReport
from vlbridge.data.images import ImageProcessorConfig, load_image
from vlbridge.data.transforms import EvalTransform, TrainTransform, augmentation_seed
from vlbridge.errors import ImageError, InputError
from vlbridge.utils.io import fast_checksum, file_digest, replace_dir, verify_digests

__all__ = [
    "CachedCaptionDataset",
    "FeatureCache",
    "canonical_path",
    "encoder_fingerprint",
    "feature_cache_key",
    "view_pixels",
    "view_seed",
]

logger = logging.getLogger(__name__)

FORMAT = "vlbridge-feature-cache"
FORMAT_VERSION = 2  # 2: per-shard checksums and a checksum of the image table
# Bump when the way pixels are produced from files changes (transforms, seeding) so old caches are not reused.
PIPELINE_VERSION = 1
INDEX_FILE = "index.json"
DEFAULT_SHARD_BYTES = 256 * 2**20

_STORAGE: dict[torch.dtype, tuple[str, str]] = {  # torch dtype -> (name in the index, numpy storage dtype)
    torch.float16: ("float16", "<f2"),
    torch.bfloat16: ("bfloat16", "<u2"),  # numpy has no bfloat16: its bits, viewed back by torch
    torch.float32: ("float32", "<f4"),
}
_BY_NAME = {name: (dtype, np.dtype(storage)) for dtype, (name, storage) in _STORAGE.items()}

# Model-config entries that never change the features (bookkeeping, or set per call by the encoder wrapper).
_CONFIG_IGNORED = {
    "transformers_version",
    "_name_or_path",
    "name_or_path",
    "_commit_hash",
    "architectures",
    "torch_dtype",
    "dtype",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "use_return_dict",
}


# --------------------------------------------------------------------------------------------------------------------
# Paths, seeds and views
# --------------------------------------------------------------------------------------------------------------------


def canonical_path(path: str | os.PathLike) -> str:
    """The string that identifies an image in a cache (and seeds its views): absolute, normalised, ``/``-separated.

    Args:
        path: An image path (relative paths are resolved against the current directory; symlinks are kept).

    Returns:
        ``Path(os.path.abspath(path)).as_posix()``.
    """
    return Path(os.path.abspath(os.fspath(path))).as_posix()


def view_seed(seed: int, view: int, path: str | os.PathLike) -> int:
    """Seed of the generator that produces augmented view ``view`` of image ``path``.

    Args:
        seed: The cache's base seed.
        view: View number, ``0 <= view < views``.
        path: The image path (canonicalised with :func:`canonical_path`).

    Returns:
        ``augmentation_seed(seed, "view", view, canonical_path(path))``.
    """
    return augmentation_seed(seed, "view", view, canonical_path(path))


def _make_transform(
    config: ImageProcessorConfig, train_augment: bool, train_transform_kwargs: Mapping[str, Any] | None
) -> EvalTransform | TrainTransform:
    if train_augment:
        return TrainTransform(config, **dict(train_transform_kwargs or {}))
    return EvalTransform(config)


def view_pixels(
    path: str | os.PathLike,
    view: int = 0,
    *,
    transform_config: ImageProcessorConfig,
    train_augment: bool = False,
    seed: int = 0,
    train_transform_kwargs: Mapping[str, Any] | None = None,
) -> Tensor:
    """The ``[3, H, W]`` pixels a cache built with these settings stores (encoded) as view ``view`` of ``path``.

    Args:
        path: The image file.
        view: View number (must be 0 without augmentation).
        transform_config: Preprocessing settings.
        train_augment: Whether views are ``TrainTransform`` augmentations (else the eval transform).
        seed: Base seed of the augmentations.
        train_transform_kwargs: Keyword arguments of ``TrainTransform`` (``scale``, ``ratio``, ``hflip``).

    Returns:
        Float32 pixels.

    Raises:
        ImageError: The image cannot be read.
    """
    transform = _make_transform(transform_config, train_augment, train_transform_kwargs)
    return _ViewImages._pixels_of(load_image(path), canonical_path(path), [view], transform, train_augment, seed)[0]


# --------------------------------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------------------------------


def encoder_fingerprint(encoder: nn.Module, *, mode: Literal["fast", "sha256"] = "fast") -> str:
    """A hex digest of an encoder's state (every tensor of its ``state_dict``: parameters and buffers).

    For every tensor, in ``state_dict`` order, its name, dtype and shape are hashed, then its contents:

    - ``"fast"`` (default): the first and last 4096 bytes, plus wrapping-sum checksums over *all* its bytes (64
      column sums and a position-weighted row sum of its 8-byte words, see :func:`vlbridge.utils.io.fast_checksum`).
      Every byte is read,
      so any changed weight, and any reordering of weights, changes the digest (barring mod-2**64 coincidences:
      this guards against stale caches, not adversaries), at ~4 GB/s on one core: ~0.1 s for a ViT-B/16
      (344 MB fp32, measured), ~0.5 s for a 2 GB ViT-g.
    - ``"sha256"``: a cryptographic hash of all the bytes; ~1 GB/s (measured 1.1 GB/s), paid on every
      :meth:`FeatureCache.get_or_build`.

    Layers a :class:`~vlbridge.encoders.vision.FrozenVisionEncoder` dropped are not in its ``state_dict`` and so do
    not count. Tensors on an accelerator are copied to the CPU one at a time.

    Args:
        encoder: The module.
        mode: ``"fast"`` or ``"sha256"``.

    Returns:
        A 64-character hex string.
    """
    if mode not in ("fast", "sha256"):
        raise InputError(f"fingerprint mode must be 'fast' or 'sha256', got {mode!r}")
    h = hashlib.sha256(f"{mode}\0".encode())
    for name, tensor in encoder.state_dict().items():
        t = tensor.detach()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        raw = t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        if mode == "sha256":
            h.update(memoryview(raw))
        else:
            h.update(raw[:4096].tobytes())
            h.update(raw[-4096:].tobytes())
            h.update(fast_checksum(raw))
    return h.hexdigest()


def _encoder_description(encoder: nn.Module) -> dict[str, Any]:
    """What besides its tensors decides the encoder's output: class, layer choice and model config."""
    cls = type(encoder)
    desc: dict[str, Any] = {"class": f"{cls.__module__}.{cls.__qualname__}"}
    for attr in ("layer", "index"):  # FrozenVisionEncoder: requested and resolved hidden-state index
        value = getattr(encoder, attr, None)
        if isinstance(value, int):
            desc[attr] = value
    model = getattr(encoder, "model", encoder)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        desc["model_class"] = type(model).__name__
        desc["model_config"] = {k: v for k, v in sorted(config.to_dict().items()) if k not in _CONFIG_IGNORED}
    return desc


def _image_entry(path: str) -> list[Any]:
    try:
        st = os.stat(path)
    except OSError:
        return [path, None, None]  # missing: it will be skipped, and the key changes once it appears
    return [path, st.st_size, st.st_mtime_ns]


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Validated settings of a build (everything but the encoder and the images)."""

    transform_config: ImageProcessorConfig
    views: int
    train_augment: bool
    seed: int
    dtype: torch.dtype
    train_transform_kwargs: dict[str, Any]

    @classmethod
    def make(
        cls,
        transform_config: ImageProcessorConfig,
        views: int,
        train_augment: bool,
        seed: int,
        dtype: torch.dtype,
        train_transform_kwargs: Mapping[str, Any] | None,
    ) -> _Spec:
        if not isinstance(transform_config, ImageProcessorConfig):
            raise InputError(f"transform_config must be an ImageProcessorConfig, got {type(transform_config).__name__}")
        if transform_config.output_size is None:
            raise InputError(
                "feature caching needs a fixed image size: set do_resize with image_size, or do_center_crop"
            )
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise InputError(f"views must be a positive integer, got {views!r}")
        if views > 1 and not train_augment:
            raise InputError(f"views={views} without train_augment would store {views} identical eval views")
        if train_transform_kwargs and not train_augment:
            raise InputError("train_transform_kwargs are given but train_augment is False")
        if dtype not in _STORAGE:
            raise InputError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
        kwargs = dict(train_transform_kwargs or {})
        if train_augment:
            TrainTransform(transform_config, **kwargs)  # validates the arguments now, not in a worker
        return cls(transform_config, views, bool(train_augment), int(seed), dtype, kwargs)

    def describe(self) -> dict[str, Any]:
        desc: dict[str, Any] = {
            "transform_config": dataclasses.asdict(self.transform_config),
            "views": self.views,
            "train_augment": self.train_augment,
            "dtype": _STORAGE[self.dtype][0],
        }
        if self.train_augment:  # the seed and the augmentation settings matter only then
            t = TrainTransform(self.transform_config, **self.train_transform_kwargs)
            desc["augmentation"] = {"scale": t.scale, "ratio": t.ratio, "hflip": t.hflip, "seed": self.seed}
        return desc


def _unique_paths(images: Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence):
        raise InputError(f"images must be a sequence of paths, got {type(images).__name__}")
    paths = list(dict.fromkeys(canonical_path(p) for p in images))
    if not paths:
        raise InputError("no images given (empty list)")
    return paths


def _key_material(
    encoder: nn.Module, paths: Sequence[str], spec: _Spec, fingerprint: Literal["fast", "sha256"]
) -> dict[str, Any]:
    images = json.dumps([_image_entry(p) for p in sorted(paths)]).encode()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "pipeline_version": PIPELINE_VERSION,
        "encoder": {**_encoder_description(encoder), "weights": encoder_fingerprint(encoder, mode=fingerprint)},
        **spec.describe(),
        "images": {"count": len(paths), "sha256": hashlib.sha256(images).hexdigest()},
    }


def _digest(material: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def feature_cache_key(
    encoder: nn.Module,
    images: Sequence[str | os.PathLike],
    *,
    transform_config: ImageProcessorConfig,
    views: int = 1,
    train_augment: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    train_transform_kwargs: Mapping[str, Any] | None = None,
    fingerprint: Literal["fast", "sha256"] = "fast",
) -> str:
    """The key (folder name) a cache of these images and settings has; arguments as in :meth:`FeatureCache.build`.

    It is the SHA-256 of a sorted-keys JSON of: format and pipeline versions; the encoder's class, ``layer``,
    model config (minus bookkeeping entries) and :func:`encoder_fingerprint`; the preprocessing config; ``views``,
    ``train_augment`` and (with augmentation only) the seed, scale, ratio and flip probability; the storage dtype;
    and the SHA-256 of the sorted list of ``[canonical path, size, mtime_ns]`` of the images. The order of
    ``images`` does not matter.

    Returns:
        64 hex characters.
    """
    spec = _Spec.make(transform_config, views, train_augment, seed, dtype, train_transform_kwargs)
    return _digest(_key_material(encoder, _unique_paths(images), spec, fingerprint))


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

    @staticmethod
    def _pixels_of(
        image: Any, path: str, views: Sequence[int], transform: Any, train_augment: bool, seed: int
    ) -> list[Tensor]:
        if not train_augment:
            if any(v != 0 for v in views):
                raise InputError(f"views {list(views)} requested, but without augmentation there is only view 0")
            return [transform(image)]
        return [transform(image, generator=torch.Generator().manual_seed(view_seed(seed, v, path))) for v in views]

    def __getitem__(self, i: int) -> tuple[int, Tensor] | SkippedSample:
        path = self.paths[i]
        try:
            image = load_image(path)
            views = range(self.spec.views)
            pixels = self._pixels_of(image, path, views, self.transform, self.spec.train_augment, self.spec.seed)
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


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------


class FeatureCache:
    """Frozen-encoder features of a fixed list of images (and views), memory-mapped from disk.

    Create one with :meth:`build`, :meth:`get_or_build` or :meth:`open`. Reading is thread- and fork-safe; pickling
    (to spawned DataLoader workers) carries only the index, and shards are re-mapped on first use.
    """

    def __init__(self, root: str | os.PathLike, index: Mapping[str, Any]) -> None:
        """Wrap an already-validated folder and its index (use :meth:`open`)."""
        self.root = Path(root)
        self._index = dict(index)
        self._images: dict[str, list[int]] = self._index["images"]
        self._missing: dict[str, str] = self._index["missing"]
        self._dtype, self._storage = _BY_NAME[self._index["dtype"]]
        self._shape = tuple(self._index["feature_shape"] or ())
        self._maps: dict[int, np.memmap] = {}

    # ---------------------------------------------------------------------------------------------------- creation
    @classmethod
    def build(
        cls,
        encoder: nn.Module,
        images: Sequence[str | os.PathLike],
        directory: str | os.PathLike,
        *,
        transform_config: ImageProcessorConfig,
        views: int = 1,
        train_augment: bool = False,
        seed: int = 0,
        dtype: torch.dtype = torch.float16,
        batch_size: int = 32,
        num_workers: int = 0,
        progress: bool = True,
        train_transform_kwargs: Mapping[str, Any] | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        fingerprint: Literal["fast", "sha256"] = "fast",
    ) -> FeatureCache:
        """Encode every image (every view) once and store the features under ``directory/<key>``.

        Always recomputes; an existing folder with the same key is replaced (atomically). Use
        :meth:`get_or_build` to reuse one.

        Args:
            encoder: The frozen encoder (``FrozenVisionEncoder`` or any module ``pixels [B,3,H,W] -> [B, ...]``);
                run in eval mode under ``inference_mode`` on the device of its parameters.
            images: Image paths; duplicates (after :func:`canonical_path`) are stored once.
            directory: Parent folder of the cache folders (created if needed).
            transform_config: Preprocessing; must give a fixed output size.
            views: Views per image (> 1 needs ``train_augment``).
            train_augment: Views are seeded ``TrainTransform`` augmentations (see the module docstring) rather than
                the single eval view.
            seed: Base seed of the augmentations.
            dtype: Storage dtype: ``torch.float16`` (default), ``torch.bfloat16`` or ``torch.float32``.
            batch_size: Encoder batch, in image-views.
            num_workers: DataLoader workers decoding and transforming images.
            progress: Show a tqdm progress bar.
            train_transform_kwargs: ``TrainTransform`` keyword arguments (``scale``, ``ratio``, ``hflip``).
            shard_bytes: Maximum shard size (a shard always holds at least one image's views).
            fingerprint: How the encoder weights enter the key (:func:`encoder_fingerprint`).

        Returns:
            The opened cache.

        Raises:
            InputError: Invalid settings, or an encoder whose output shape varies.
        """
        spec = _Spec.make(transform_config, views, train_augment, seed, dtype, train_transform_kwargs)
        paths = _unique_paths(images)
        material = _key_material(encoder, paths, spec, fingerprint)
        key = _digest(material)
        root = _build(
            encoder, paths, Path(directory), key, material, spec,
            batch_size=batch_size, num_workers=num_workers, progress=progress, shard_bytes=shard_bytes,
        )  # fmt: skip
        return cls.open(root)

    @classmethod
    def get_or_build(
        cls,
        encoder: nn.Module,
        images: Sequence[str | os.PathLike],
        directory: str | os.PathLike,
        *,
        transform_config: ImageProcessorConfig,
        views: int = 1,
        train_augment: bool = False,
        seed: int = 0,
        dtype: torch.dtype = torch.float16,
        batch_size: int = 32,
        num_workers: int = 0,
        progress: bool = True,
        train_transform_kwargs: Mapping[str, Any] | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        fingerprint: Literal["fast", "sha256"] = "fast",
    ) -> FeatureCache:
        """Open the cache of exactly these images and settings if a complete one exists, else :meth:`build` it.

        The key is recomputed (weights fingerprint and a ``stat`` of every image), so a cache of other weights,
        settings or since-modified files is never reused. A damaged folder with the right key is rebuilt.
        Arguments as in :meth:`build` (``batch_size``, ``num_workers``, ``progress`` and ``shard_bytes`` only
        matter when building).

        Returns:
            The opened cache.
        """
        spec = _Spec.make(transform_config, views, train_augment, seed, dtype, train_transform_kwargs)
        paths = _unique_paths(images)
        material = _key_material(encoder, paths, spec, fingerprint)
        key = _digest(material)
        directory = Path(directory)
        if (directory / key).is_dir():
            try:
                return cls.open(directory, key)
            except InputError as exc:
                logger.warning("feature cache %s is damaged (%s); rebuilding it", directory / key, exc)
        root = _build(
            encoder, paths, directory, key, material, spec,
            batch_size=batch_size, num_workers=num_workers, progress=progress, shard_bytes=shard_bytes,
        )  # fmt: skip
        return cls.open(root)

    @classmethod
    def open(cls, directory: str | os.PathLike, key: str | None = None) -> FeatureCache:
        """Open a complete cache: ``directory/key``, or ``directory`` itself when ``key`` is None.

        Reads only the index and ``stat``s the shards (their sizes must match the index); no feature is read.

        Raises:
            InputError: No cache there, an incomplete or foreign folder, a key mismatch, or shards of wrong size.
        """
        root = Path(directory) if key is None else Path(directory) / key
        index_path = root / INDEX_FILE
        if not index_path.is_file():
            raise InputError(f"no feature cache at {root} (no {INDEX_FILE})")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"feature cache index {index_path} is unreadable: {exc}") from exc
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise InputError(f"{index_path} is not a vlbridge feature cache index")
        if index.get("format_version") != FORMAT_VERSION:
            raise InputError(
                f"feature cache {root} has format version {index.get('format_version')}, not {FORMAT_VERSION}"
            )
        if not index.get("complete"):
            raise InputError(f"feature cache {root} is incomplete")
        if index.get("key") != root.name:
            raise InputError(f"feature cache folder {root} holds key {index.get('key')!r}, not its own name")
        if index.get("dtype") not in _BY_NAME:
            raise InputError(f"feature cache {root} has unknown dtype {index.get('dtype')!r}")
        try:
            row_bytes = int(np.prod(index["feature_shape"] or [0])) * np.dtype(index["storage"]).itemsize
            tables_ok = index.get("tables_sha256") == _tables_digest(index["images"], index["missing"], index["shards"])
            shards = [(root / shard["file"], shard["rows"] * row_bytes) for shard in index["shards"]]
            checksums = index["checksums"]
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"feature cache index {index_path} is malformed ({type(exc).__name__}: {exc})") from exc
        if not tables_ok:
            raise InputError(f"feature cache index {index_path} does not match its checksum (edited or damaged)")
        for file, expected in shards:
            size = file.stat().st_size if file.is_file() else None
            if size != expected:
                raise InputError(f"feature cache shard {file} has {size} bytes, expected {expected}")
        problem = verify_digests(root, checksums)  # sampled blocks only: milliseconds
        if problem is not None:
            raise InputError(f"feature cache {root}: {problem}")
        return cls(root, index)

    def verify(self) -> None:
        """Check every byte of every shard against the checksums written at build time (~4 GB/s).

        :meth:`open` checks sizes and sampled blocks only; call this to rule out damage anywhere.

        Raises:
            InputError: A shard does not match.
        """
        problem = verify_digests(self.root, self._index["checksums"], full=True)
        if problem is not None:
            raise InputError(f"feature cache {self.root}: {problem}")

    # ---------------------------------------------------------------------------------------------------- properties
    @property
    def key(self) -> str:
        """The cache's key (its folder name)."""
        return self._index["key"]

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype."""
        return self._dtype

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one view's features, e.g. ``(N, Dv)`` (empty if no image could be read)."""
        return self._shape

    @property
    def num_views(self) -> int:
        """Views stored per image."""
        return int(self._index["views"])

    @property
    def train_augment(self) -> bool:
        return bool(self._index["train_augment"])

    @property
    def seed(self) -> int:
        return int(self._index["seed"])

    @property
    def paths(self) -> list[str]:
        """Canonical paths of the cached images, in build order."""
        return list(self._images)

    @property
    def missing(self) -> dict[str, str]:
        """Canonical path → reason, for the images that could not be read at build time."""
        return dict(self._missing)

    @property
    def info(self) -> dict[str, Any]:
        """The index's metadata (key material, build time, shards), without the per-image tables."""
        return {k: v for k, v in self._index.items() if k not in ("images", "missing")}

    def __len__(self) -> int:
        """Number of cached images (missing ones excluded)."""
        return len(self._images)

    def has(self, path: str | os.PathLike) -> bool:
        """Whether ``path``'s features are in the cache."""
        return canonical_path(path) in self._images

    __contains__ = has

    def skip_report(self) -> SkipReport:
        """The images skipped at build time, as a :class:`SkipReport` (``samples`` = cached images)."""
        report = SkipReport(samples=len(self._images))
        report.update(SkippedSample(path, reason) for path, reason in self._missing.items())
        return report

    def view_seed(self, path: str | os.PathLike, view: int) -> int:
        """Seed of view ``view`` of ``path`` (see :func:`view_seed`)."""
        return view_seed(self.seed, view, path)

    def __repr__(self) -> str:
        return (
            f"FeatureCache({str(self.root)!r}, images={len(self)}, missing={len(self._missing)}, "
            f"views={self.num_views}, shape={list(self._shape)}, dtype={self._index['dtype']})"
        )

    # ---------------------------------------------------------------------------------------------------- reading
    def shard(self, i: int) -> np.memmap:
        """Shard ``i`` as a read-only :class:`numpy.memmap` ``[rows, *feature_shape]`` of the storage dtype."""
        mm = self._maps.get(i)
        if mm is None:
            info = self._index["shards"][i]
            mm = np.memmap(self.root / info["file"], dtype=self._storage, mode="r", shape=(info["rows"], *self._shape))
            self._maps[i] = mm
        return mm

    def _location(self, path: str | os.PathLike, view: int) -> tuple[int, int]:
        key = canonical_path(path)
        where = self._images.get(key)
        if where is None:
            reason = self._missing.get(key)
            detail = f"it was skipped at build time ({reason})" if reason else "the cache was built for other images"
            raise InputError(f"image {key} is not in the feature cache: {detail}")
        if isinstance(view, bool) or not 0 <= view < self.num_views:
            raise InputError(f"view {view!r} is out of range for a cache of {self.num_views} view(s)")
        return where[0], where[1] + int(view)

    def features(
        self,
        paths: Sequence[str | os.PathLike],
        views: Sequence[int] | int = 0,
        *,
        dtype: torch.dtype | None = torch.float32,
    ) -> Tensor:
        """Features of a batch of images, one view each.

        Args:
            paths: Image paths (any spelling of the same file works: they are canonicalised).
            views: One view for all, or one per path.
            dtype: Output dtype (default float32); ``None`` or the storage dtype returns the stored values as is.

        Returns:
            ``[B, *feature_shape]`` (``[B, N, Dv]``), a fresh tensor not backed by the cache files.

        Raises:
            InputError: A path that is not cached, a view out of range, or mismatched lengths.
        """
        if isinstance(paths, (str, os.PathLike)):
            raise InputError("features() takes a list of paths; wrap a single path in a list")
        paths = list(paths)
        views = [views] * len(paths) if isinstance(views, int) else list(views)
        if len(views) != len(paths):
            raise InputError(f"got {len(views)} views for {len(paths)} paths")
        out = np.empty((len(paths), *self._shape), dtype=self._storage)
        by_shard: dict[int, tuple[list[int], list[int]]] = {}
        for position, (path, view) in enumerate(zip(paths, views)):
            shard, row = self._location(path, view)
            rows, positions = by_shard.setdefault(shard, ([], []))
            rows.append(row)
            positions.append(position)
        for shard, (rows, positions) in by_shard.items():
            order = np.argsort(rows, kind="stable")  # read each shard front to back
            out[np.asarray(positions)[order]] = self.shard(shard)[np.asarray(rows)[order]]
        return self._to_torch(out, dtype)

    def _to_torch(self, array: np.ndarray, dtype: torch.dtype | None) -> Tensor:
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        if self._dtype == torch.bfloat16:
            tensor = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(array)
        return tensor if dtype is None or dtype == tensor.dtype else tensor.to(dtype)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = {}  # a pickled memmap would carry its whole contents; re-map lazily instead
        return state


# --------------------------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------------------------


class CachedCaptionDataset(Dataset):
    """:class:`~vlbridge.data.datasets.CaptionDataset`'s counterpart that reads encoder features from a cache.

    Item ``i`` is ``{"vision_feats": [N, Dv] float32, "text", "image_id", "index", "view"}``, or a
    :class:`~vlbridge.data.datasets.SkippedSample` when the record's image is not in the cache (unreadable at build
    time, or not part of it); use :func:`~vlbridge.data.datasets.collate_skipping` as ``collate_fn``.
    ``__getitems__`` reads a whole DataLoader batch with one :meth:`FeatureCache.features` call.

    Which stored view an item uses in epoch ``e`` (``V = cache.num_views``):

    - ``"cycle"`` (default): ``(e + augmentation_seed(seed, "offset", i)) % V``: every view once per ``V`` epochs,
      with captions (even of the same image) starting at different views.
    - ``"random"``: ``augmentation_seed(seed, "pick", e, i) % V``: a seeded independent draw per epoch.

    The choice depends only on ``(seed, epoch, index)``, so it is the same in every worker and rank.
    """

    def __init__(
        self,
        records: Sequence[CaptionRecord],
        cache: FeatureCache,
        *,
        view_selection: Literal["cycle", "random"] = "cycle",
        seed: int = 0,
    ) -> None:
        """Wrap records.

        Args:
            records: Caption records (several may share an image).
            cache: Features of their images.
            view_selection: ``"cycle"`` or ``"random"`` (see the class docstring).
            seed: Seed of the view choice.
        """
        if view_selection not in ("cycle", "random"):
            raise InputError(f"view_selection must be 'cycle' or 'random', got {view_selection!r}")
        self.records = list(records)
        self.cache = cache
        self.view_selection = view_selection
        self.seed = int(seed)
        self.epoch = 0
        self._paths = [canonical_path(r.image) for r in self.records]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that decides the views (call before each epoch's DataLoader iterator)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def view_for(self, index: int) -> int:
        """The view item ``index`` uses in the current epoch."""
        views = self.cache.num_views
        if views == 1:
            return 0
        if self.view_selection == "cycle":
            return (self.epoch + augmentation_seed(self.seed, "offset", index)) % views
        return augmentation_seed(self.seed, "pick", self.epoch, index) % views

    def _skipped(self, index: int) -> SkippedSample:
        path = self._paths[index]
        reason = self.cache._missing.get(path)
        return SkippedSample(str(self.records[index].image), reason or "not in the feature cache")

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any] | SkippedSample]:
        """A batch of items, with the features read in one call."""
        indices = [int(i) for i in indices]
        for i in indices:
            if not -len(self) <= i < len(self):
                raise IndexError(f"index {i} out of range for a dataset of {len(self)}")
        indices = [i % len(self) for i in indices]
        present = [i for i in indices if self._paths[i] in self.cache._images]
        views = [self.view_for(i) for i in present]
        feats = self.cache.features([self._paths[i] for i in present], views) if present else None
        row = {i: k for k, i in enumerate(present)}
        out: list[dict[str, Any] | SkippedSample] = []
        for i in indices:
            if i not in row:
                out.append(self._skipped(i))
                continue
            record = self.records[i]
            k = row[i]
            out.append(
                {"vision_feats": feats[k], "text": record.caption, "image_id": record.image_id,
                 "label": getattr(record, "label", None), "index": i, "view": views[k]}
            )  # fmt: skip
        return out
