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

**Modules.** This one reads (:class:`FeatureCache`, :class:`CachedCaptionDataset`);
:mod:`vlbridge.data.feature_cache_keys` says what a cache is keyed on (paths, views, seeds, the encoder's
fingerprint) and :mod:`vlbridge.data.feature_cache_build` builds one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from vlbridge.data.datasets import CaptionRecord, SkippedSample, SkipReport
from vlbridge.data.feature_cache_build import _build, _ShardWriter, _tables_digest  # noqa: F401 (_ShardWriter: tests)
from vlbridge.data.feature_cache_keys import (
    _BY_NAME,
    DEFAULT_SHARD_BYTES,
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    _digest,
    _key_material,
    _Spec,
    _unique_paths,
    canonical_path,
    encoder_fingerprint,
    feature_cache_key,
    view_pixels,
    view_seed,
)
from vlbridge.data.images import ImageProcessorConfig
from vlbridge.data.transforms import augmentation_seed
from vlbridge.errors import InputError
from vlbridge.utils.io import verify_digests

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
