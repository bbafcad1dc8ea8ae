"""What a feature cache is keyed on: image paths, views and their seeds, the encoder's fingerprint, the settings.

See :mod:`vlbridge.data.feature_cache` for the format; :func:`feature_cache_key` is the folder name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from vlbridge.data.images import ImageProcessorConfig, load_image
from vlbridge.data.transforms import EvalTransform, TrainTransform, augmentation_seed
from vlbridge.errors import InputError
from vlbridge.utils.io import fast_checksum

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


def views_of(
    image: Any, path: str, views: Sequence[int], transform: Any, train_augment: bool, seed: int
) -> list[Tensor]:
    """The pixels of ``views`` of a loaded image: the eval transform (view 0 only), or seeded augmentations."""
    if not train_augment:
        if any(v != 0 for v in views):
            raise InputError(f"views {list(views)} requested, but without augmentation there is only view 0")
        return [transform(image)]
    return [transform(image, generator=torch.Generator().manual_seed(view_seed(seed, v, path))) for v in views]


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
    return views_of(load_image(path), canonical_path(path), [view], transform, train_augment, seed)[0]


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
