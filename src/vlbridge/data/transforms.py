"""Image transforms for training (RandomResizedCrop + flip) and evaluation (resize only).

Both produce exactly what :class:`~vlbridge.data.images.ImageProcessor` produces numerically: the geometric part
(crop, flip, resize) is done with Pillow, then the processor rescales and normalises with the same numbers, so a
model never sees train/eval pixel statistics that differ.

Augmentation is reproducible: every random draw comes from a ``torch.Generator`` the caller passes in (or builds
from an integer seed). Datasets derive that seed from ``(seed, epoch, sample, view)`` with
:func:`augmentation_seed`, so a given sample looks the same in a given epoch whichever worker or rank loads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import torch
from PIL import Image

from vlbridge.data.images import ImageProcessor, ImageProcessorConfig, to_rgb
from vlbridge.errors import InputError

__all__ = [
    "EvalTransform",
    "TrainTransform",
    "augmentation_seed",
    "random_resized_crop_box",
]

_MASK64 = (1 << 64) - 1


def augmentation_seed(*parts: int | str) -> int:
    """A stable 63-bit seed mixed from integers and strings, e.g. ``(base_seed, epoch, index, view)``.

    Python's ``hash`` is salted per process for strings, so it would give different seeds in different DataLoader
    workers; this uses BLAKE2b instead, which is the same everywhere.

    Args:
        *parts: Integers (any sign/size) or strings (e.g. a webdataset shard URL and sample key).

    Returns:
        A non-negative integer < 2**63, suitable for ``torch.Generator.manual_seed``.
    """
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        # Type-tag and length-prefix each part so ("ab", "c") and ("a", "bc") differ.
        raw = part.encode("utf-8") if isinstance(part, str) else (int(part) & _MASK64).to_bytes(8, "little")
        h.update((b"s" if isinstance(part, str) else b"i") + len(raw).to_bytes(4, "little") + raw)
    return int.from_bytes(h.digest(), "little") >> 1


def _as_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    """``None`` means torch's global RNG; an int is a seed for a fresh CPU generator."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise InputError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")


def random_resized_crop_box(
    width: int,
    height: int,
    *,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | int | None = None,
) -> tuple[int, int, int, int]:
    """Sample a crop box the way torchvision's ``RandomResizedCrop.get_params`` does.

    Up to 10 attempts draw an area fraction uniformly from ``scale`` and an aspect ratio log-uniformly from
    ``ratio``; the first box that fits inside the image wins. If none fits (very elongated images), fall back to
    the largest centred crop whose aspect ratio lies within ``ratio``.

    Args:
        width: Image width in pixels.
        height: Image height in pixels.
        scale: Range of the crop's area as a fraction of the image's area.
        ratio: Range of the crop's width/height aspect ratio.
        generator: Source of randomness (a generator, an int seed, or None for torch's global RNG).

    Returns:
        ``(left, top, crop_width, crop_height)`` in pixels.
    """
    if width <= 0 or height <= 0:
        raise InputError(f"image size must be positive, got {width}x{height}")
    gen = _as_generator(generator)
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=gen).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen).item())
            return left, top, w, h
    # Fallback: centre crop, clamped to the allowed aspect-ratio range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class EvalTransform:
    """Deterministic eval-time transform: one PIL image → ``[3, H, W]`` float32, identical to ``ImageProcessor``.

    Accepts (and ignores) a ``generator`` argument so datasets can call train and eval transforms the same way.
    """

    def __init__(self, config: ImageProcessorConfig) -> None:
        self.config = config
        self.processor = ImageProcessor(config)

    def __call__(self, image: Image.Image, generator: torch.Generator | int | None = None) -> torch.Tensor:
        """Resize (if configured), rescale and normalise one image.

        Args:
            image: A PIL image (converted to RGB if the config says so).
            generator: Ignored; present for signature compatibility with :class:`TrainTransform`.

        Returns:
            A ``[3, H, W]`` float32 tensor.
        """
        return self.processor([image])[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


class TrainTransform:
    """Training augmentation: RandomResizedCrop + horizontal flip, then the eval processor's rescale/normalise.

    The crop box follows torchvision's algorithm (:func:`random_resized_crop_box`); cropping and resizing use Pillow
    with the config's ``resample`` filter (BLIP-2/LAVIS use bicubic). Unlike torchvision, randomness comes from an
    explicit generator, so the same ``(generator seed, image)`` always gives the same tensor.

    Flipping mirrors the image but not the caption: captions that say "left"/"right" become wrong. Datasets where
    that matters (RefCOCO-style grounding, spatial VQA) should set ``hflip=0``.
    """

    def __init__(
        self,
        config: ImageProcessorConfig,
        *,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
    ) -> None:
        """Build the transform.

        Args:
            config: The eval processor's config; its output size (``image_size``, or ``crop_size`` for CLIP-style
                configs) is the crop's size and its rescale/normalise settings are applied unchanged.
            scale: Range of the crop's area as a fraction of the image's area (paper/LAVIS: 0.5-1.0).
            ratio: Range of the crop's aspect ratio (width/height).
            hflip: Probability of a horizontal flip; 0 disables flipping.
        """
        if not (0.0 < scale[0] <= scale[1] <= 1.0):
            raise InputError(f"scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        if not (0.0 < ratio[0] <= ratio[1]):
            raise InputError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
        if not (0.0 <= hflip <= 1.0):
            raise InputError(f"hflip must be a probability in [0, 1], got {hflip}")
        self.config = config
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = float(hflip)
        height, width = _output_size(config)
        self.size = (width, height)  # PIL order
        # The geometry is done here, so the processor must not resize or crop again; everything else stays identical.
        self.processor = ImageProcessor(dataclasses.replace(config, do_resize=False, do_center_crop=False))

    def augment(self, image: Image.Image, generator: torch.Generator | int | None = None) -> Image.Image:
        """The geometric part only: random crop, resize to the output size, maybe flip.

        Args:
            image: A PIL image.
            generator: Source of randomness (a generator, an int seed, or None for torch's global RNG).

        Returns:
            A PIL image of the output size.
        """
        gen = _as_generator(generator)
        if self.config.do_convert_rgb:
            image = to_rgb(image)  # alpha onto white, as the processor does
        left, top, w, h = random_resized_crop_box(
            image.width, image.height, scale=self.scale, ratio=self.ratio, generator=gen
        )
        # crop-then-resize (not resize(box=...)) so edge pixels match torchvision's resized_crop exactly.
        out = image.crop((left, top, left + w, top + h)).resize(self.size, resample=self.config.resample)
        # Always draw, even when hflip is 0 or 1, so the RNG stream does not depend on the flip setting.
        if torch.rand(1, generator=gen).item() < self.hflip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return out

    def __call__(self, image: Image.Image, generator: torch.Generator | int | None = None) -> torch.Tensor:
        """Augment one image and convert it to a normalised tensor.

        Args:
            image: A PIL image (converted to RGB if the config says so).
            generator: Source of randomness (a generator, an int seed, or None for torch's global RNG).

        Returns:
            A ``[3, H, W]`` float32 tensor.
        """
        return self.processor([self.augment(image, generator)])[0]

    def __repr__(self) -> str:
        size = self.size[::-1]  # (height, width)
        return f"{type(self).__name__}(size={size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip})"


def _output_size(config: ImageProcessorConfig) -> tuple[int, int]:
    """``(height, width)`` of the training crop: what the eval processor outputs for this config.

    CLIP-style configs (shortest-edge resize + centre crop) give their crop size; a shortest-edge resize without a
    crop has no fixed output size, so training uses a square of that edge.
    """
    if config.output_size is not None:
        return config.output_size
    if config.shortest_edge is not None:
        return config.shortest_edge, config.shortest_edge
    return config.image_size
