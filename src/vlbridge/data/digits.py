"""Real scanned images that ship in a package: scikit-learn's handwritten digits, as a caption data set.

`sklearn.datasets.load_digits` holds 1,797 scans of handwritten digits (8x8, 17 grey levels, 10 classes, from the
UCI optical-recognition set). Each is drawn in a coloured ink on a pale background, upscaled to `image_size`,
and captioned from a template that names the digit and the ink colour — so a caption carries two facts: one
that lives in the *layout* of the image (the digit's shape) and one that any pooled feature shows (the colour).
A bridge that only reads colour is exposed at once: zero-shot digit accuracy stays near chance (10%).

Captions repeat by construction (a template, 10 digits and a few colours give a few dozen distinct strings for
over a thousand images), which is what makes deciding negatives by image id alone wrong.

Layout written by :func:`write_digits`::

    out_dir/images/0001.png
    out_dir/captions_{train,test}.jsonl   {"image", "caption", "image_id", "label" (digit word), "colour"}
    out_dir/digits.json                  the settings; written last
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlbridge.errors import ConfigError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
INKS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 30),
    "green": (30, 150, 40),
    "blue": (30, 60, 210),
    "purple": (130, 40, 160),
}


@dataclass
class DigitsConfig:
    """How the digits become a caption data set."""

    image_size: int = 64  # output side in pixels (the 8x8 scan is upscaled bilinearly)
    inks: tuple[str, ...] = tuple(INKS)
    template: str = "the digit {digit} written in {colour} ink"
    test_fraction: float = 0.2
    limit: int | None = None  # use the first N scans only
    seed: int = 0


def load_scans(limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images [n, 8, 8] in 0..16, labels [n]) from scikit-learn, with a clear hint when it is missing."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError("the digits data set needs scikit-learn: pip install scikit-learn") from exc
    data = load_digits()
    images, labels = data.images, data.target
    return (images, labels) if limit is None else (images[:limit], labels[:limit])


def render(scan: np.ndarray, ink: tuple[int, int, int], size: int, rng: np.random.Generator) -> Image.Image:
    """One 8x8 scan (0..16) -> an RGB image: ink over a pale, slightly noisy background."""
    alpha = Image.fromarray((scan / 16.0 * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    a = np.asarray(alpha, dtype=np.float32)[..., None] / 255.0  # [S, S, 1]
    background = 235 + rng.normal(0, 6, size=(size, size, 3))
    rgb = a * np.asarray(ink, dtype=np.float32) + (1 - a) * background
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def write_digits(out_dir: str | Path, config: DigitsConfig | None = None) -> dict[str, Path]:
    """Write the images and the train / test caption manifests; returns their paths.

    A finished folder with the same settings is reused as it is.
    """
    config = config or DigitsConfig()
    out = Path(out_dir)
    meta = out / "digits.json"
    paths = {"train": out / "captions_train.jsonl", "test": out / "captions_test.jsonl"}
    settings = asdict(config)
    settings["inks"] = list(config.inks)
    if meta.exists() and json.loads(meta.read_text()) == settings:
        return paths
    unknown = [c for c in config.inks if c not in INKS]
    if unknown:
        raise ConfigError(f"unknown ink colour(s) {unknown}: choose from {', '.join(INKS)}")
    scans, labels = load_scans(config.limit)
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(scans))
    n_test = int(round(len(scans) * config.test_fraction))
    split_of = {int(i): ("test" if k < n_test else "train") for k, i in enumerate(order)}
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {"train": [], "test": []}
    for i, (scan, label) in enumerate(zip(scans, labels)):
        colour = config.inks[int(rng.integers(len(config.inks)))]
        name = f"images/{i:04d}.png"
        render(scan, INKS[colour], config.image_size, rng).save(out / name)
        digit = DIGIT_WORDS[int(label)]
        record = {
            "image": name,
            "caption": config.template.format(digit=digit, colour=colour),
            "image_id": str(i),
            "label": digit,
            "colour": colour,
        }
        lines[split_of[i]].append(json.dumps(record))
    for split, path in paths.items():
        path.write_text("\n".join(lines[split]) + "\n")
    meta.write_text(json.dumps(settings, indent=2))
    return paths
