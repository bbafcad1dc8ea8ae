"""Image loading and eval-time preprocessing, numerically identical to transformers' BLIP image processor.

Two steps, kept separate so datasets and the CLI can report bad files before any model work:

- :func:`load_image` opens a file (or takes a PIL image), refuses anything unusable with an
  :class:`~vlbridge.errors.ImageError` that names the file, applies the EXIF orientation and converts to RGB.
- :class:`ImageProcessor` turns images into ``pixel_values`` ``[B, 3, H, W]`` float32 exactly as
  ``transformers.BlipImageProcessorPil`` does: Pillow resize of the uint8 RGB image, optional centre crop, then
  ``float64(x) * rescale_factor`` cast to float32, then ``(x - mean) / std`` in float32. Same operations in the same
  order, so the outputs agree bit for bit, not just to within resampling rounding.

Deliberate differences from transformers, all on inputs where transformers silently gives wrong pixels:

- 16-bit grayscale (``I;16*``, and ``I``, which is how some decoders open 16-bit files) is scaled to 8 bits
  (``round(v / 257)``, so 65535 → 255 and 32768 → 128); Pillow's own conversion clips everything above 255 to white.
- The EXIF orientation is applied, so a phone photo is seen upright.

Shared with transformers: transparency (an alpha band, or a palette/grey ``transparency`` entry) is composited onto
a white background rather than dropped, so transparent regions come out white, not whatever colour they hide.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vlbridge.errors import CheckpointError, ConfigError, ImageError, InputError

__all__ = [
    "MAX_PIXELS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ImageProcessor",
    "ImageProcessorConfig",
    "load_image",
    "to_rgb",
]

MAX_PIXELS: int = 64_000_000
"""Default limit on ``width * height`` (64 megapixels, e.g. 8000x8000). A decoded RGB image of this size takes
~190 MB; larger files are refused from their header, before decoding, rather than risk exhausting memory."""

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

ImageInput = str | os.PathLike | Image.Image | torch.Tensor

# Pillow's decompression-bomb check reads a process-wide setting; we switch it off while reading a header (our own
# max_pixels check replaces it, with a clearer message) and serialise those short windows so concurrent loads can
# never leave the setting switched off.
_PIL_LIMIT_LOCK = threading.Lock()
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_EXIF_ORIENTATION = 0x0112


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def load_image(source: str | os.PathLike | Image.Image, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open and check one image, apply its EXIF orientation and convert it to RGB.

    Any size from 1x1 up is accepted (the processor resizes it); only a zero width or height is refused.

    Args:
        source: A file path, or a PIL image (never modified: it is returned as is when already upright RGB,
            otherwise a converted copy is).
        max_pixels: Refuse images with more than this many pixels (``width * height``). For files this is checked
            on the header, before any pixel is decoded.

    Returns:
        A fully decoded RGB image.

    Raises:
        ImageError: The path is missing, a directory or an empty file; the file is not an image, is truncated or
            corrupt; the image has zero size or more than ``max_pixels`` pixels; or its mode cannot become RGB.
    """
    image = _open_checked(source, max_pixels=max_pixels)
    try:
        return to_rgb(image)
    except (ValueError, OSError) as e:
        raise ImageError(f"cannot convert image {_describe(source)} (mode {image.mode}) to RGB: {e}") from e


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any common Pillow mode to 8-bit RGB.

    - Transparency (``RGBA``, ``LA``, ``PA``, ``P``/``L``/``RGB`` with a ``transparency`` entry) is composited onto
      white, as transformers' ``convert_to_rgb`` does.
    - 16-bit grayscale (``I;16*``) and 32-bit integer ``I`` images are read as 16-bit values and scaled to 8 bits.
    - Everything else (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``F``, ...) uses Pillow's conversion.

    Args:
        image: A decoded PIL image.

    Returns:
        An RGB image (the same object if it already was RGB without transparency).
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_8bit(image)
    if image.mode in ("La", "RGBa"):  # premultiplied alpha (in-memory only); Pillow converts these only to LA/RGBA
        image = image.convert(image.mode[:-1] + "A")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _sixteen_bit_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grey → ``L`` (or ``LA`` when a grey value is marked transparent), scaling rather than clipping."""
    values = np.asarray(image).astype(np.int64).clip(0, 65535)  # [H, W]; mode I may hold negatives or > 16 bits
    grey = ((values + 128) // 257).astype(np.uint8)  # round(v / 257): 0 → 0, 32768 → 128, 65535 → 255
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey, alpha], axis=-1), mode="LA")
    return Image.fromarray(grey, mode="L")


def _describe(source: object) -> str:
    if isinstance(source, Image.Image):
        filename = getattr(source, "filename", "")
        return f"'{filename}'" if filename else f"<PIL image {source.mode} {source.width}x{source.height}>"
    return f"'{source}'"


def _why_missing(path: Path) -> str:
    """Why ``path.exists()`` is False, in words: missing, a broken symlink, a symlink loop, unreachable."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symlink loop"
        if path.is_symlink():
            return f"is a broken symlink (to {os.readlink(path)})"
        if e.errno not in (errno.ENOENT, None):
            return f"cannot be reached: {e.strerror}"
    return "does not exist"


def _check_size(size: tuple[int, int], what: str, max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"image {what} has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            f"image {what} is {width}x{height} = {width * height:,} pixels, more than the limit of {max_pixels:,} "
            "(pass a larger max_pixels to load it anyway)"
        )


def _open_checked(source: str | os.PathLike | Image.Image, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Everything :func:`load_image` does except the RGB conversion: checks, full decode, EXIF orientation."""
    if isinstance(source, Image.Image):
        what = _describe(source)
        _check_size(source.size, what, max_pixels)
        try:
            source.load()  # an Image.open()ed file is decoded lazily; fail here, with its name
            if source.getexif().get(_EXIF_ORIENTATION, 1) in range(2, 9):
                return ImageOps.exif_transpose(source)  # a transposed copy; the caller's image is left alone
            return source
        except Exception as e:  # any decoder failure means the same to the user
            raise ImageError(f"cannot decode image {what}: {e}") from e
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(f"expected an image path or a PIL image, got {type(source).__name__}")

    path = Path(source)
    what = _describe(source)
    if not path.exists():
        raise ImageError(f"image file {what} {_why_missing(path)}")
    if path.is_dir():
        raise ImageError(f"image path {what} is a directory, not a file")
    if path.stat().st_size == 0:
        raise ImageError(f"image file {what} is empty (0 bytes)")

    with _PIL_LIMIT_LOCK:
        saved_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # reading the header only; our own check follows at once
        try:
            image = Image.open(path)
        except UnidentifiedImageError as e:
            raise ImageError(f"file {what} is not an image in a format Pillow can read") from e
        except Exception as e:  # OSError (permissions...), or a plugin's own ValueError on a mangled header
            raise ImageError(f"cannot open image file {what}: {e}") from e
        finally:
            Image.MAX_IMAGE_PIXELS = saved_limit

    with image:
        _check_size(image.size, what, max_pixels)
        try:
            # A full decode here, so a truncated or corrupt file fails now with its name rather than deep inside
            # a batch. (Unless the caller set ImageFile.LOAD_TRUNCATED_IMAGES, which makes Pillow pad with grey.)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
        except Image.DecompressionBombError as e:  # a frame or tile of a multi-part file exceeds Pillow's limit
            raise ImageError(f"image {what} has a part larger than Pillow's MAX_IMAGE_PIXELS: {e}") from e
        except Exception as e:  # OSError, SyntaxError, struct.error... all mean corrupt
            raise ImageError(f"image file {what} is truncated or corrupt: {e}") from e
        return image  # leaving the `with` closes the file (multi-frame files keep it open otherwise); pixels stay


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------------


def _pair(value: Any, name: str) -> tuple[int, int]:
    """An HF size entry (``{"height", "width"}`` or an int for a square) or a 2-sequence → ``(height, width)``."""
    if isinstance(value, dict):
        if set(value) != {"height", "width"}:
            raise ConfigError(f"{name} must have keys 'height' and 'width', got {sorted(value)}")
        value = (value["height"], value["width"])
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not (isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)):
        raise ConfigError(f"{name} must be two positive integers (height, width), got {value!r}")
    return int(value[0]), int(value[1])


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        value = (value,) * 3
    if not (isinstance(value, Sequence) and len(value) == 3):
        raise ConfigError(f"{name} must be three numbers (one per RGB channel), got {value!r}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


@dataclass
class ImageProcessorConfig:
    """How raw images become ``pixel_values``; mirrors the fields of a transformers ``preprocessor_config.json``.

    Two resize styles, as in transformers:

    - BLIP / SigLIP / ViT: resize straight to ``image_size`` (aspect ratio not kept).
    - CLIP: ``shortest_edge`` set → resize so the shorter side has that length (aspect kept), then
      ``do_center_crop`` to ``crop_size``.
    """

    image_size: tuple[int, int] = (224, 224)  # (height, width) of the resize when shortest_edge is None
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = Image.Resampling.BICUBIC  # a PIL resampling value (3 = bicubic), as HF stores it
    rescale_factor: float = 1 / 255
    shortest_edge: int | None = None  # CLIP style: resize the shorter side to this, keeping the aspect ratio
    do_center_crop: bool = False
    crop_size: tuple[int, int] | None = None  # (height, width); required when do_center_crop
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    # False: images must already be RGB (an error otherwise), as when a pipeline converts them itself.
    do_convert_rgb: bool = True

    def __post_init__(self) -> None:
        # Accept lists (from YAML/JSON) and validate, so a bad config fails here rather than mid-batch.
        self.image_size = _pair(self.image_size, "image_size")
        self.mean = _triple(self.mean, "mean")
        self.std = _triple(self.std, "std")
        if any(s == 0 for s in self.std):
            raise ConfigError(f"std must be non-zero, got {self.std}")
        try:
            self.resample = int(Image.Resampling(int(self.resample)))
        except (ValueError, TypeError) as e:
            valid = ", ".join(f"{r.value} ({r.name})" for r in Image.Resampling)
            raise ConfigError(f"resample must be a PIL resampling value: {valid}; got {self.resample!r}") from e
        if self.shortest_edge is not None and not (isinstance(self.shortest_edge, int) and self.shortest_edge > 0):
            raise ConfigError(f"shortest_edge must be a positive integer, got {self.shortest_edge!r}")
        if self.crop_size is not None:
            self.crop_size = _pair(self.crop_size, "crop_size")
        if self.do_center_crop and self.crop_size is None:
            raise ConfigError("do_center_crop is set but crop_size is not")

    @property
    def output_size(self) -> tuple[int, int] | None:
        """``(height, width)`` of every output image, or None where it depends on the input's size."""
        if self.do_center_crop:
            return self.crop_size
        if self.do_resize and self.shortest_edge is None:
            return self.image_size
        return None

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ImageProcessorConfig:
        """Read a transformers image-processor dict (the contents of ``preprocessor_config.json``).

        Understands BlipImageProcessor, CLIPImageProcessor, SiglipImageProcessor and ViTImageProcessor dicts. Keys
        that don't affect the pixels (``image_processor_type``, ``processor_class``, ...) are ignored; settings this
        processor cannot reproduce raise instead of being silently dropped. Missing keys take this class's
        defaults. A bare integer ``size`` (old configs) means the shortest edge when ``do_center_crop`` is set (old
        CLIP) and a square otherwise (old ViT/BLIP), as in those classes.

        Args:
            d: The dict.

        Returns:
            The config.

        Raises:
            ConfigError: A size form or option that is not supported (``longest_edge``, padding, ``crop_pct``...).
        """
        for key in ("do_pad", "do_flip_channel_order", "do_reduce_labels"):
            if d.get(key):
                raise ConfigError(f"image processor option {key}=True is not supported")
        if d.get("crop_pct") is not None:
            raise ConfigError("image processor option crop_pct is not supported")

        kwargs: dict[str, Any] = {}
        do_center_crop = bool(d.get("do_center_crop", False))
        size = d.get("size")
        if isinstance(size, dict) and "shortest_edge" in size:
            if set(size) != {"shortest_edge"}:
                raise ConfigError(f"image processor size {size} is not supported (only shortest_edge alone)")
            kwargs["shortest_edge"] = size["shortest_edge"]
        elif isinstance(size, int) and not isinstance(size, bool) and do_center_crop:
            kwargs["shortest_edge"] = size
        elif size is not None:
            kwargs["image_size"] = _pair(size, "size")
        if d.get("crop_size") is not None:
            kwargs["crop_size"] = _pair(d["crop_size"], "crop_size")

        renames = {"image_mean": "mean", "image_std": "std", "resample": "resample", "rescale_factor": "rescale_factor"}
        kwargs.update({ours: d[theirs] for theirs, ours in renames.items() if d.get(theirs) is not None})
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if d.get(flag) is not None:
                kwargs[flag] = bool(d[flag])
        return cls(do_center_crop=do_center_crop, **kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``preprocessor_config.json`` dict that transformers loads as a ``BlipImageProcessor``.

        Returns:
            JSON-serialisable dict; ``from_hf_dict(to_hf_dict())`` gives back an equal config.
        """
        if self.shortest_edge is not None:
            size = {"shortest_edge": self.shortest_edge}
        else:
            size = {"height": self.image_size[0], "width": self.image_size[1]}
        d: dict[str, Any] = {
            "image_processor_type": "BlipImageProcessor",
            "do_resize": self.do_resize,
            "size": size,
            "resample": self.resample,
            "do_center_crop": self.do_center_crop,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_convert_rgb": self.do_convert_rgb,
        }
        if self.crop_size is not None:
            d["crop_size"] = {"height": self.crop_size[0], "width": self.crop_size[1]}
        return d

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ImageProcessorConfig:
        """Read the image-processor settings of a local checkpoint.

        Args:
            path: A checkpoint folder holding ``preprocessor_config.json``, or ``processor_config.json`` with an
                ``image_processor`` entry (transformers ≥ 5 writes that); or the path of either JSON file.

        Returns:
            The config.

        Raises:
            CheckpointError: Neither file (nor the entry) is there.
            ConfigError: The file is not valid JSON or holds unsupported settings.
        """
        path = Path(path)
        candidates = [path] if path.is_file() else [path / "preprocessor_config.json", path / "processor_config.json"]
        for file in candidates:
            if not file.is_file():
                continue
            try:
                d = json.loads(file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{file} is not valid JSON: {e}") from e
            if not isinstance(d, dict):
                raise ConfigError(f"{file} does not hold a JSON object")
            if isinstance(d.get("image_processor"), dict):  # processor_config.json nests it
                return cls.from_hf_dict(d["image_processor"])
            if file.name != "processor_config.json":
                return cls.from_hf_dict(d)
        raise CheckpointError(
            f"no image processor settings in {path}: expected preprocessor_config.json, or processor_config.json "
            "with an 'image_processor' entry"
        )


class ImageProcessor:
    """Images (paths, PIL images) → ``pixel_values`` ``[B, 3, H, W]`` float32, as transformers' BLIP processor.

    Float tensors pass through as already-preprocessed ``pixel_values`` (``[3, H, W]`` or ``[B, 3, H, W]``), so
    every API that takes images also takes the output of a previous call.
    """

    def __init__(self, config: ImageProcessorConfig | None = None, *, max_pixels: int = MAX_PIXELS) -> None:
        """Set up the processor.

        Args:
            config: Resize/normalise settings; defaults to BLIP-2's (224x224, bicubic, CLIP mean/std).
            max_pixels: Pixel limit passed to :func:`load_image`.
        """
        self.config = config if config is not None else ImageProcessorConfig()
        self.max_pixels = max_pixels
        c = self.config
        self._mean = np.asarray(c.mean, dtype=np.float32)[:, None, None]  # [3, 1, 1]
        self._std = np.asarray(c.std, dtype=np.float32)[:, None, None]

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Preprocess one image or a list of them.

        Args:
            images: A path, PIL image or tensor, or a non-empty sequence of them (tensors may be ``[B, 3, H, W]``
                and are concatenated along the batch).

        Returns:
            ``pixel_values`` ``[B, 3, H, W]`` float32, B = number of images (1 for a single one).

        Raises:
            InputError: Empty list, unsupported type, a tensor of the wrong shape/dtype, or outputs of different
                sizes that cannot be stacked (no resize configured).
            ImageError: An image file is unusable (see :func:`load_image`).
        """
        if isinstance(images, (str, os.PathLike, Image.Image, torch.Tensor)):
            images = [images]
        if not isinstance(images, Sequence):
            raise InputError(f"expected an image or a sequence of images, got {type(images).__name__}")
        if len(images) == 0:
            raise InputError("no images given (empty list)")
        batches = [self._one(item) for item in images]  # each [n, 3, H, W]
        shapes = {tuple(b.shape[1:]) for b in batches}
        if len(shapes) > 1:
            raise InputError(
                f"images have different sizes after preprocessing {sorted(shapes)}; set do_resize to batch them"
            )
        return torch.cat(batches, dim=0) if len(batches) > 1 else batches[0]

    def _one(self, item: ImageInput) -> torch.Tensor:
        """One input → ``[n, 3, H, W]`` float32 (n = 1 except for a batched tensor)."""
        if isinstance(item, torch.Tensor):
            return self._check_pixel_values(item)
        if not isinstance(item, (str, os.PathLike, Image.Image)):
            raise InputError(f"expected an image path, PIL image or pixel_values tensor, got {type(item).__name__}")
        c = self.config
        image = _open_checked(item, max_pixels=self.max_pixels)
        if c.do_convert_rgb:
            try:
                image = to_rgb(image)
            except (ValueError, OSError) as e:
                raise ImageError(f"cannot convert image {_describe(item)} (mode {image.mode}) to RGB: {e}") from e
        elif image.mode != "RGB":
            raise ImageError(f"image {_describe(item)} is mode {image.mode}, not RGB, and do_convert_rgb is off")

        if c.do_resize:
            image = image.resize(self._resize_size(image.size), resample=c.resample)  # PIL takes (width, height)
        if c.do_center_crop:
            assert c.crop_size is not None  # checked by the config
            crop_h, crop_w = c.crop_size
            # Same offsets as transformers' center_crop; Pillow fills any part outside a small image with zeros,
            # which is what transformers pads with.
            left, top = (image.width - crop_w) // 2, (image.height - crop_h) // 2
            image = image.crop((left, top, left + crop_w, top + crop_h))

        pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)  # [H, W, 3] → [3, H, W]
        if c.do_rescale:
            # transformers multiplies in float64 and then casts; doing the same keeps the results bit-identical.
            pixels = (pixels.astype(np.float64) * c.rescale_factor).astype(np.float32)
        pixels = pixels.astype(np.float32, copy=False)
        if c.do_normalize:
            pixels = (pixels - self._mean) / self._std
        return torch.from_numpy(np.ascontiguousarray(pixels))[None]  # [1, 3, H, W]

    def _resize_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """Input ``(width, height)`` → resize target ``(width, height)``, with transformers' rounding (truncation)."""
        c = self.config
        if c.shortest_edge is None:
            return c.image_size[1], c.image_size[0]
        width, height = size
        short, long = min(width, height), max(width, height)
        new_long = int(c.shortest_edge * long / short)
        return (c.shortest_edge, new_long) if width <= height else (new_long, c.shortest_edge)

    def _check_pixel_values(self, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point():
            raise InputError(
                f"a tensor is taken as preprocessed float pixel_values, got dtype {tensor.dtype}; "
                "pass raw images as PIL images or file paths"
            )
        if tensor.dim() == 3:
            tensor = tensor[None]  # [3, H, W] → [1, 3, H, W]
        expected = self.config.output_size
        ok = tensor.dim() == 4 and tensor.shape[1] == 3 and tensor.shape[0] > 0
        if ok and expected is not None:
            ok = tuple(tensor.shape[2:]) == expected
        if not ok:
            size = "H, W" if expected is None else f"{expected[0]}, {expected[1]}"
            raise InputError(
                f"pixel_values tensor has shape {list(tensor.shape)}; expected [3, {size}] or [B, 3, {size}]"
            )
        return check_finite(tensor.to(torch.float32))


def check_finite(pixels: torch.Tensor) -> torch.Tensor:
    """``pixels`` itself; NaN or infinite pixel values (which would poison every output) are refused.

    Raises:
        InputError: The tensor holds a NaN or an infinity.
    """
    if pixels.is_floating_point() and not bool(torch.isfinite(pixels).all()):
        bad = int((~torch.isfinite(pixels)).sum())
        raise InputError(f"pixel_values contain {bad} NaN or infinite values; pass finite preprocessed pixels")
    return pixels
