"""Train/eval image transforms: crop-box sampling, reproducibility, flipping, parity with the eval processor."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from vlbridge.data.images import ImageProcessor, ImageProcessorConfig
from vlbridge.data.transforms import EvalTransform, TrainTransform, augmentation_seed, random_resized_crop_box
from vlbridge.errors import InputError

CONFIG = ImageProcessorConfig(image_size=(32, 48))  # non-square (height, width) to catch PIL's (w, h) order


def _image(width: int = 80, height: int = 60, seed: int = 0) -> Image.Image:
    """Random RGB noise: every crop and flip changes the pixels."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


@pytest.mark.parametrize("size", [(640, 480), (300, 300), (200, 500), (37, 23)])
def test_crop_box_respects_scale_ratio_and_bounds(size: tuple[int, int]) -> None:
    width, height = size
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        left, top, w, h = random_resized_crop_box(width, height, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), generator=gen)
        assert 0 <= left <= left + w <= width and 0 <= top <= top + h <= height
        # w and h are rounded to whole pixels, so allow one pixel of slack on each side.
        assert (w - 1) * (h - 1) / (width * height) <= 1.0
        assert (w + 1) * (h + 1) / (width * height) >= 0.5
        assert 3 / 4 * (h - 1) / h - 1 / h <= w / h <= 4 / 3 * (h + 1) / h + 1 / h


def test_crop_box_area_fraction_covers_the_range() -> None:
    gen = torch.Generator().manual_seed(1)
    fractions = [math.prod(random_resized_crop_box(1000, 1000, generator=gen)[2:]) / 1e6 for _ in range(500)]
    assert 0.49 <= min(fractions) < 0.55 and 0.95 < max(fractions) <= 1.0


def test_crop_box_falls_back_to_a_centre_crop_for_extreme_aspect() -> None:
    # No 0.5-1.0 area crop of a 1000x10 strip has an aspect ratio <= 4/3, so all 10 attempts fail.
    assert random_resized_crop_box(1000, 10, generator=0) == (493, 0, 13, 10)
    assert random_resized_crop_box(10, 1000, generator=0) == (0, 493, 10, 13)


def test_train_transform_shape_and_determinism() -> None:
    transform = TrainTransform(CONFIG)
    image = _image()
    a = transform(image, torch.Generator().manual_seed(7))
    assert a.shape == (3, 32, 48) and a.dtype == torch.float32
    assert torch.equal(a, transform(image, 7))  # an int seed is the same as a generator seeded with it
    assert torch.equal(a, transform(image, torch.Generator().manual_seed(7)))
    assert not torch.equal(a, transform(image, 8))


def test_flip_mirrors_the_same_crop() -> None:
    # The flip coin is drawn even when hflip is 0 or 1, so both transforms pick the same crop for the same seed.
    image = _image()
    never, always = TrainTransform(CONFIG, hflip=0.0), TrainTransform(CONFIG, hflip=1.0)
    for seed in range(3):
        plain, flipped = never(image, seed), always(image, seed)
        assert not torch.equal(plain, flipped)
        assert torch.equal(flipped, plain.flip(-1))


def test_flip_probability_default_half() -> None:
    transform = TrainTransform(CONFIG)
    image = _image(40, 40)
    flips = 0
    for seed in range(40):
        crop = transform.augment(image, seed)
        left, top, w, h = random_resized_crop_box(40, 40, scale=transform.scale, ratio=transform.ratio, generator=seed)
        unflipped = image.crop((left, top, left + w, top + h)).resize(transform.size, resample=CONFIG.resample)
        flips += crop.tobytes() != unflipped.tobytes()
    assert 8 <= flips <= 32


def test_train_transform_uses_the_eval_numbers() -> None:
    # A crop that is the whole image (scale=ratio range pinned to it) must equal the eval processor's output.
    image = _image(48, 32)
    transform = TrainTransform(CONFIG, scale=(1.0, 1.0), ratio=(1.5, 1.5), hflip=0.0)
    assert random_resized_crop_box(48, 32, scale=(1.0, 1.0), ratio=(1.5, 1.5), generator=0) == (0, 0, 48, 32)
    assert torch.equal(transform(image, 0), ImageProcessor(CONFIG)(image)[0])


def test_train_transform_clip_style_config_uses_crop_size() -> None:
    config = ImageProcessorConfig(shortest_edge=40, do_center_crop=True, crop_size=(24, 24))
    assert TrainTransform(config)(_image(), 0).shape == (3, 24, 24)


def test_train_transform_handles_transparency_like_the_processor() -> None:
    rgba = Image.new("RGBA", (48, 32), (255, 0, 0, 0))  # fully transparent red → white
    out = TrainTransform(CONFIG, hflip=0.0)(rgba, 0)
    white = ImageProcessor(CONFIG)(Image.new("RGB", (48, 32), (255, 255, 255)))[0]
    assert torch.allclose(out, white)


def test_eval_transform_equals_image_processor() -> None:
    image = _image(97, 61, seed=3)
    transform = EvalTransform(CONFIG)
    out = transform(image)
    assert out.shape == (3, 32, 48)
    assert torch.equal(out, ImageProcessor(CONFIG)([image])[0])
    assert torch.equal(out, transform(image, generator=123))  # deterministic: the generator is ignored


def test_bad_arguments_raise_input_error() -> None:
    with pytest.raises(InputError):
        TrainTransform(CONFIG, scale=(0.0, 1.0))
    with pytest.raises(InputError):
        TrainTransform(CONFIG, hflip=1.5)
    with pytest.raises(InputError):
        TrainTransform(CONFIG)(_image(), generator="seed")  # type: ignore[arg-type]


def test_augmentation_seed_is_stable_and_distinguishes_parts() -> None:
    assert augmentation_seed(0, 1, 2, 3) == augmentation_seed(0, 1, 2, 3)
    seeds = {augmentation_seed(0, e, i, v) for e in range(3) for i in range(10) for v in range(2)}
    assert len(seeds) == 60
    assert augmentation_seed("ab", "c") != augmentation_seed("a", "bc")
    assert augmentation_seed(1) != augmentation_seed("1")
    assert 0 <= augmentation_seed(-5, 2**70) < 2**63
