"""Tests for vlbridge.data.images: parity with transformers' BLIP processor, and one test per bad input."""

from __future__ import annotations

import io
import json
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlbridge.data.images import (
    MAX_PIXELS,
    ImageProcessor,
    ImageProcessorConfig,
    load_image,
)
from vlbridge.errors import CheckpointError, ConfigError, ImageError, InputError

# transformers' processor, PIL backend (torchvision is not installed, and the PIL backend is the reference anyway).
blip_pil = pytest.importorskip("transformers.models.blip.image_processing_pil_blip")


def _random_rgb(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _hf_pixel_values(images: list[Image.Image], **kwargs) -> torch.Tensor:
    return blip_pil.BlipImageProcessorPil(**kwargs)(images, return_tensors="pt").pixel_values


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _one_bit_png(width: int, height: int, *, real_pixels: bool) -> bytes:
    """A 1-bit greyscale PNG built by hand, so no 100-megapixel array is ever allocated.

    With ``real_pixels`` the IDAT holds valid (all-black) rows, compressed from ~12 MB of zeros to a few KB; without,
    it holds a token byte string, as only the header should ever be read.
    """
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))  # bit depth 1, greyscale
    raw = bytes(height * (1 + (width + 7) // 8)) if real_pixels else b"\0"  # each row: filter byte + packed bits
    return b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", zlib.compress(raw, 9)) + _png_chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------------------------
# Parity with transformers
# ---------------------------------------------------------------------------------------------------------------


def test_parity_with_transformers_default_config(tmp_path: Path) -> None:
    # Odd, non-square sizes, up- and down-sampling, and a batch containing a file path.
    images = [_random_rgb(37, 53, seed=1), _random_rgb(301, 199, seed=2), _random_rgb(7, 5, seed=3)]
    images[1].save(tmp_path / "b.png")
    ours = ImageProcessor()([images[0], tmp_path / "b.png", images[2]])
    ref = _hf_pixel_values(images, size={"height": 224, "width": 224})
    assert ours.shape == (3, 3, 224, 224) and ours.dtype == torch.float32
    # Same Pillow resize on the same uint8 image, same float64 rescale and float32 normalise: bit-identical.
    assert torch.equal(ours, ref)


def test_parity_with_transformers_custom_size_mean_std_and_round_trip(tmp_path: Path) -> None:
    images = [_random_rgb(123, 77, seed=4), _random_rgb(50, 301, seed=5)]
    config = ImageProcessorConfig(
        image_size=(160, 192), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), resample=Image.Resampling.BILINEAR
    )
    ours = ImageProcessor(config)(images)
    ref = _hf_pixel_values(
        images, size={"height": 160, "width": 192}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3], resample=2
    )
    assert ours.shape == (2, 3, 160, 192)
    assert torch.equal(ours, ref)

    # to_hf_dict is accepted by transformers as is, and gives the same pixels; from_hf_dict gives the config back.
    hf_dict = json.loads(json.dumps(config.to_hf_dict()))
    assert hf_dict["image_processor_type"] == "BlipImageProcessor"
    assert torch.equal(_hf_pixel_values(images, **hf_dict), ours)
    assert ImageProcessorConfig.from_hf_dict(hf_dict) == config

    # from_pretrained: preprocessor_config.json, and transformers 5's processor_config.json nesting.
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "preprocessor_config.json").write_text(json.dumps(hf_dict))
    assert ImageProcessorConfig.from_pretrained(tmp_path / "a") == config
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "processor_config.json").write_text(json.dumps({"image_processor": hf_dict, "x": 1}))
    assert ImageProcessorConfig.from_pretrained(tmp_path / "b") == config
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        ImageProcessorConfig.from_pretrained(tmp_path)


def test_parity_with_transformers_clip_style_shortest_edge_and_center_crop() -> None:
    # A CLIP preprocessor_config.json: resize the short side, keep aspect, centre-crop (also a crop larger than the
    # resized image, which transformers zero-pads).
    images = [_random_rgb(90, 61, seed=6), _random_rgb(40, 97, seed=7)]
    clip_dict = {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": 48},
        "do_center_crop": True,
        "crop_size": {"height": 52, "width": 44},
        "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    config = ImageProcessorConfig.from_hf_dict(clip_dict)
    assert config.shortest_edge == 48 and config.crop_size == (52, 44) and config.output_size == (52, 44)
    ours = ImageProcessor(config)(images)
    ref = _hf_pixel_values(images, size={"shortest_edge": 48}, do_center_crop=True, crop_size=clip_dict["crop_size"])
    assert ours.shape == (2, 3, 52, 44)
    assert torch.equal(ours, ref)
    # Old configs: bare int size; and settings we cannot reproduce are refused, not dropped.
    assert ImageProcessorConfig.from_hf_dict({"size": 384}).image_size == (384, 384)
    with pytest.raises(ConfigError, match="longest_edge"):
        ImageProcessorConfig.from_hf_dict({"size": {"shortest_edge": 10, "longest_edge": 20}})


def test_transparent_images_are_composited_onto_white_like_transformers() -> None:
    rgba = Image.fromarray(np.random.default_rng(8).integers(0, 256, (33, 41, 4), dtype=np.uint8), mode="RGBA")
    assert torch.equal(ImageProcessor()(rgba), _hf_pixel_values([rgba], size={"height": 224, "width": 224}))


# ---------------------------------------------------------------------------------------------------------------
# Batching and tensor inputs
# ---------------------------------------------------------------------------------------------------------------


def test_single_items_lists_and_pixel_value_tensors() -> None:
    processor = ImageProcessor(ImageProcessorConfig(image_size=(32, 48)))
    image = _random_rgb(20, 30)
    single = processor(image)
    assert single.shape == (1, 3, 32, 48)
    assert torch.equal(processor([image]), single)  # a list of one is not squeezed
    # Tensors are taken as preprocessed pixel_values: [3, H, W] gains a batch dim, [B, 3, H, W] is concatenated.
    assert torch.equal(processor(single[0]), single)
    assert processor([single[0], torch.zeros(2, 3, 32, 48, dtype=torch.float16), image]).shape == (4, 3, 32, 48)
    with pytest.raises(InputError, match="empty"):
        processor([])
    with pytest.raises(InputError, match=r"\[3, 32, 48\]"):
        processor(torch.zeros(1, 3, 224, 224))  # wrong spatial size for this config
    with pytest.raises(InputError, match="shape"):
        processor(torch.zeros(1, 1, 32, 48))
    with pytest.raises(InputError, match="dtype"):
        processor(torch.zeros(3, 32, 48, dtype=torch.uint8))
    with pytest.raises(InputError, match="ndarray"):
        processor(np.zeros((32, 48, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# Bad files: each fails with an ImageError naming the path
# ---------------------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match="does not exist") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="directory") as info:
        ImageProcessor()([tmp_path])
    assert str(tmp_path) in str(info.value)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()
    with pytest.raises(ImageError, match="empty") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n" * 10)
    with pytest.raises(ImageError, match="not an image") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_truncated_jpeg(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    _random_rgb(64, 64).save(buffer, format="JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt") as info:
        load_image(path)  # the header is intact: only a full decode finds the damage
    assert str(path) in str(info.value)


def test_image_over_pixel_limit_is_refused_from_its_header(tmp_path: Path) -> None:
    # A valid 10000x10000 (100-megapixel) PNG of a few KB: refused before decoding (which would take 100 MB+), and
    # without Pillow's DecompressionBombWarning (100M > its 89M limit) getting in first.
    path = tmp_path / "huge.png"
    path.write_bytes(_one_bit_png(10_000, 10_000, real_pixels=True))
    assert path.stat().st_size < 100_000
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match="more than the limit of 64,000,000") as info:
            load_image(path)
    assert time.perf_counter() - start < 1.0
    assert str(path) in str(info.value) and "10000x10000" in str(info.value)
    # Beyond twice Pillow's limit Pillow would raise its own DecompressionBombError; ours comes first.
    header_only = tmp_path / "huger.png"
    header_only.write_bytes(_one_bit_png(30_000, 30_000, real_pixels=False))
    with pytest.raises(ImageError, match="limit"):
        ImageProcessor(max_pixels=MAX_PIXELS)([header_only])
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own setting is restored


def test_one_by_one_image_is_accepted_and_resized(tmp_path: Path) -> None:
    # Tiny images are allowed (only zero-size ones are not): resizing a 1x1 image gives a flat image of its colour.
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (255, 0, 128)).save(path)
    assert load_image(path).size == (1, 1)
    pixel_values = ImageProcessor()([path])
    assert pixel_values.shape == (1, 3, 224, 224)
    config = ImageProcessorConfig()
    expected = (torch.tensor([255.0, 0.0, 128.0]) / 255 - torch.tensor(config.mean)) / torch.tensor(config.std)
    torch.testing.assert_close(pixel_values[0, :, 0, 0], expected)
    assert torch.equal(pixel_values, pixel_values[:, :, :1, :1].expand_as(pixel_values))


# ---------------------------------------------------------------------------------------------------------------
# Modes and orientation
# ---------------------------------------------------------------------------------------------------------------


def test_cmyk_jpeg(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (32, 16), (255, 0, 0, 0))  # left: cyan
    cmyk.paste((0, 0, 0, 0), (16, 0, 32, 16))  # right: paper white
    path = tmp_path / "cmyk.jpg"
    cmyk.save(path, quality=95)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (32, 16)
    rgb = np.asarray(image).astype(int)
    assert np.abs(rgb[8, 4] - [0, 255, 255]).max() <= 8
    assert np.abs(rgb[8, 28] - [255, 255, 255]).max() <= 8


def test_la_png(tmp_path: Path) -> None:
    grey = np.full((8, 8), 100, dtype=np.uint8)
    alpha = np.zeros((8, 8), dtype=np.uint8)
    alpha[:, 4:] = 128  # left transparent, right half-opaque
    path = tmp_path / "la.png"
    Image.fromarray(np.stack([grey, alpha], axis=-1), mode="LA").save(path)
    rgb = np.asarray(load_image(path)).astype(int)
    assert (rgb[:, :4] == 255).all()  # transparent → white background
    expected = round(100 * 128 / 255 + 255 * 127 / 255)  # 177: alpha-blended onto white
    assert np.abs(rgb[:, 4:] - expected).max() <= 1


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    indices = np.zeros((6, 6), dtype=np.uint8)
    indices[:3] = 1  # top rows: palette entry 1 (red); bottom rows: entry 0, marked transparent (black underneath)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    path = tmp_path / "p.png"
    image.save(path, transparency=0)
    rgb = np.asarray(load_image(path))
    assert (rgb[:3] == [255, 0, 0]).all()
    assert (rgb[3:] == 255).all()
    # Without transparency the palette colours are kept as they are.
    image.save(path)
    assert (np.asarray(load_image(path))[3:] == 0).all()


def test_sixteen_bit_greyscale_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # Pillow opens it as 16-bit
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (1, 4, 3)
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255]  # Pillow's own convert would give [0, 255, 255, 255]
    assert (rgb == rgb[..., :1]).all()
    # Mode "I" (32-bit int, how some decoders open 16-bit files) is read the same way.
    assert np.asarray(load_image(Image.fromarray(values.astype(np.int32))))[0, :, 0].tolist() == [0, 1, 128, 255]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # 48 wide x 24 tall: left half red, right half blue, a green block in the top-left corner.
    pixels = np.zeros((24, 48, 3), dtype=np.uint8)
    pixels[:, :24] = [255, 0, 0]
    pixels[:, 24:] = [0, 0, 255]
    pixels[:8, :8] = [0, 255, 0]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "phone.jpg"
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
    image = load_image(path)
    assert image.size == (24, 48)  # (width, height): transposed
    upright = np.rot90(pixels, k=-1).astype(int)  # clockwise
    loaded = np.asarray(image).astype(int)
    assert np.abs(loaded - upright).mean() < 4  # JPEG noise only
    assert np.abs(loaded[3, 20] - [0, 255, 0]).max() < 40  # the green corner went to the top-right
    assert np.abs(loaded[40, 12] - [0, 0, 255]).max() < 40  # blue, formerly on the right, is now at the bottom


def test_grey_and_one_bit_and_convert_rgb_off(tmp_path: Path) -> None:
    grey = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8), mode="L")
    assert np.asarray(load_image(grey))[0].tolist() == [[0] * 3, [77] * 3, [255] * 3]
    one_bit = grey.convert("1")
    assert np.asarray(load_image(one_bit))[0, :, 0].tolist() == [0, 0, 255]
    processor = ImageProcessor(ImageProcessorConfig(do_convert_rgb=False))
    with pytest.raises(ImageError, match="not RGB"):
        processor(grey)
