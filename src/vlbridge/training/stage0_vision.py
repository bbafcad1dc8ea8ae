"""Stage 0 (embedded default only): train the frozen image encoder itself, as a CLIP dual encoder on the world.

BLIP-2 starts from an image encoder that already knows what is in a picture. For the synthetic world of
:mod:`vlbridge.data.world` no such encoder exists, so this stage trains one: a small ViT (``CLIPVisionModel``) and a
small text Transformer (``CLIPTextModel`` over a word-level tokenizer of the world's vocabulary), contrastively on
the world's training captions (:class:`vlbridge.models.clip.ClipDualEncoder`). Captions name colour, shape, size and
position, so an encoder that ranks the right caption first has to see all four. Zero-shot retrieval recall@K on the
test split (and on the compositional split of held-out (shape, colour) pairs) measures that.

Speed: the world is small, so every training image is decoded once into one ``uint8`` tensor; every caption is
tokenised once. A batch holds distinct images, each with one of its captions drawn at random; identical caption
strings in a batch are all treated as positives of each other. No augmentation by default (a horizontal flip
would swap "left" and "right"); ``max_shift`` turns on a small random translation.

Outputs under ``out_dir``::

    vision/              transformers CLIPVisionModel + preprocessor_config.json (BLIP-2's frozen image encoder)
    clip/                the whole dual encoder as a transformers CLIPModel, with its tokenizer
    stage0_vision.json   config, world hash, retrieval metrics, loss curve, timings; written last

A second call with the same config and world returns the stored summary without training.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image

from vlbridge.errors import ConfigError, InputError
from vlbridge.utils.io import atomic_dir, read_jsonl, write_text

if TYPE_CHECKING:
    from vlbridge.models.clip import ClipDualEncoder

__all__ = ["Stage0VisionConfig", "train_vision_encoder"]

SUMMARY_NAME = "stage0_vision.json"
_FORMAT_VERSION = 1


@dataclass
class Stage0VisionConfig:
    """Architecture and recipe of the stage-0 CLIP dual encoder.

    Attributes:
        patch_size: ViT patch side; 64x64 images give 8x8 = 64 patches plus [CLS].
        vision_width: ViT hidden size.
        vision_layers: ViT blocks.
        vision_heads: ViT attention heads.
        text_width: Text Transformer hidden size.
        text_layers: Text Transformer blocks.
        text_heads: Text Transformer attention heads.
        mlp_ratio: FFN width / hidden size, both towers.
        embed_dim: Shared embedding width.
        batch_size: Image-caption pairs per step (distinct images).
        steps: Optimiser steps.
        lr: Peak learning rate.
        min_lr: Final learning rate of the cosine schedule.
        warmup_steps: Linear warmup steps.
        weight_decay: AdamW weight decay (not on norms, biases, the logit scale).
        betas: AdamW betas.
        grad_clip: Gradient-norm clip; None for none.
        max_shift: Random translation of up to this many pixels (0: no augmentation).
        precision: ``"bf16"`` autocast or ``"fp32"``.
        attn_implementation: Attention kernel while training (``"eager"`` is fastest under bf16 on CPU; the saved
            model does not record it).
        num_threads: ``torch.set_num_threads`` while training (restored afterwards); None leaves it.
        seed: Seed for initialisation and batches.
        log_every: Steps per point of the stored loss curve.
        eval_batch_size: Images or texts per forward pass at evaluation.
    """

    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    mlp_ratio: int = 2  # at equal compute, 2 with more steps beat 4 (measured on the default world)
    embed_dim: int = 128
    batch_size: int = 128
    steps: int = 540
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 30
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float | None = 1.0
    max_shift: int = 0
    precision: Literal["fp32", "bf16"] = "bf16"
    attn_implementation: str = "eager"
    num_threads: int | None = 2
    seed: int = 0
    log_every: int = 10
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError if a field is out of range."""
        positive = ("patch_size", "vision_width", "vision_layers", "vision_heads", "text_width", "text_layers")
        positive += ("text_heads", "mlp_ratio", "embed_dim", "batch_size", "steps", "log_every", "eval_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"stage0_vision.{name} must be >= 1, got {getattr(self, name)}")
        for width, heads in (("vision_width", "vision_heads"), ("text_width", "text_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ConfigError(f"stage0_vision.{width} must be divisible by {heads}")
        if self.batch_size < 2:
            raise ConfigError("stage0_vision.batch_size must be >= 2 (a contrastive loss needs negatives)")
        if not 0 < self.min_lr <= self.lr:
            raise ConfigError(f"stage0_vision: need 0 < min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.warmup_steps < 0 or self.max_shift < 0:
            raise ConfigError("stage0_vision.warmup_steps and max_shift must be >= 0")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"stage0_vision.precision must be 'fp32' or 'bf16', got {self.precision!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Data: every image decoded once, every caption tokenised once


@dataclass
class _Split:
    pixels: torch.Tensor  # [N, 3, H, W] uint8
    texts: list[str]  # every caption
    text_image: torch.Tensor  # [T] image index of each text


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise InputError(f"{path} is missing; generate the world first (vlbridge.data.world.generate_world)")
    return read_jsonl(path)


def _load_split(world_dir: Path, name: str) -> _Split:
    """Decode a caption split: train has one record per caption, the others one record per image."""
    records = _read_jsonl(world_dir / f"captions_{name}.jsonl")
    index: dict[str, int] = {}
    paths: list[str] = []
    texts: list[str] = []
    owner: list[int] = []
    for record in records:
        if record["image"] not in index:
            index[record["image"]] = len(paths)
            paths.append(record["image"])
        captions = record.get("captions") or [record["caption"]]
        texts += captions
        owner += [index[record["image"]]] * len(captions)
    if not paths:
        raise InputError(f"{world_dir / f'captions_{name}.jsonl'} holds no records")
    arrays = [np.asarray(Image.open(world_dir / p).convert("RGB")) for p in paths]
    if len({a.shape for a in arrays}) != 1:
        raise InputError(f"images of split {name!r} differ in size")
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # [N, 3, H, W]
    return _Split(pixels, texts, torch.tensor(owner))


class _Normalize:
    """uint8 ``[B, 3, H, W]`` → float pixel_values, as :class:`vlbridge.data.images.ImageProcessor` (no resize)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.to(torch.float32) / 255.0 - self.mean) / self.std


def _shift(pixels: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (edge-replicated padding, then a random crop)."""
    b, _, h, w = pixels.shape
    padded = torch.nn.functional.pad(pixels.float(), (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator)
    return torch.stack([padded[i, :, y : y + h, x : x + w] for i, (y, x) in enumerate(offsets.tolist())])


# ----------------------------------------------------------------------------------------------------------------------
# Model, evaluation


def _build(config: Stage0VisionConfig, image_size: int, tokenizer: Any, max_text_length: int) -> ClipDualEncoder:
    """The dual encoder of ``config`` for square images of side ``image_size``, randomly initialised."""
    from transformers import CLIPVisionConfig

    from vlbridge.models.clip import ClipDualEncoder, text_config_for

    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=config.patch_size,
        hidden_size=config.vision_width,
        intermediate_size=config.mlp_ratio * config.vision_width,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        hidden_act="gelu",
    )
    text = text_config_for(
        tokenizer,
        hidden_size=config.text_width,
        intermediate_size=config.mlp_ratio * config.text_width,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=max_text_length,
        hidden_act="gelu",
    )
    for c in (vision, text):
        c._attn_implementation = config.attn_implementation
    return ClipDualEncoder(vision, text, config.embed_dim)


@torch.no_grad()
def _embed(
    model: ClipDualEncoder, split: _Split, tokenizer: Any, normalize: _Normalize, config: Stage0VisionConfig, autocast
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised embeddings of every image ``[N, D]`` and every text ``[T, D]`` of a split."""
    from vlbridge.models.clip import tokenize

    image_embeds, text_embeds = [], []
    n = config.eval_batch_size
    with autocast():
        for start in range(0, len(split.pixels), n):
            image_embeds.append(model.encode_image(normalize(split.pixels[start : start + n])).float())
        for start in range(0, len(split.texts), n):
            ids, mask = tokenize(tokenizer, split.texts[start : start + n], model.text_config.max_position_embeddings)
            text_embeds.append(model.encode_text(ids, mask).float())
    return torch.cat(image_embeds), torch.cat(text_embeds)


def _retrieval(
    model: ClipDualEncoder, split: _Split, tokenizer: Any, normalize: _Normalize, config: Stage0VisionConfig, autocast
) -> dict[str, float]:
    """Zero-shot recall@1/5/10 both ways (Karpathy convention), plus text→image R@1 of the first (most complete)
    caption of each image alone."""
    from vlbridge.eval.retrieval import recall_at_k

    images, texts = _embed(model, split, tokenizer, normalize, config, autocast)
    sim = images @ texts.t()  # [n_images, n_texts]
    metrics = {k: round(v, 5) for k, v in recall_at_k(sim, split.text_image).items()}
    first = torch.zeros(len(split.texts), dtype=torch.bool)
    first[_first_indices(split)] = True
    full = recall_at_k(sim[:, first], split.text_image[first], ks=(1,))
    metrics["img_r1_full_caption"] = full["img_r1"]
    metrics["n_images"], metrics["n_texts"] = len(split.pixels), len(split.texts)
    metrics["chance_img_r1"] = round(1 / len(split.pixels), 5)
    return metrics


def _first_indices(split: _Split) -> list[int]:
    seen: set[int] = set()
    out = []
    for i, owner in enumerate(split.text_image.tolist()):
        if owner not in seen:
            seen.add(owner)
            out.append(i)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Caching


def _world_hash(world_dir: Path) -> str | None:
    try:
        return json.loads((world_dir / "world.json").read_text())["content_sha256"]
    except (OSError, ValueError, KeyError):
        return None


def _cached(out_dir: Path, config: Stage0VisionConfig, world_hash: str | None) -> dict[str, Any] | None:
    try:
        summary = json.loads((out_dir / SUMMARY_NAME).read_text())
    except (OSError, ValueError):
        return None
    same = (
        summary.get("format_version") == _FORMAT_VERSION
        and summary.get("config") == json.loads(json.dumps(asdict(config)))
        and summary.get("world_sha256") == world_hash
        and world_hash is not None
    )
    if not same or not (out_dir / "vision" / "config.json").is_file():
        return None
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# Training


def train_vision_encoder(
    world_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    config: Stage0VisionConfig | None = None,
    progress: bool = True,
    fresh: bool = False,
) -> dict[str, Any]:
    """Train the stage-0 CLIP dual encoder on a world's training captions and save its vision tower.

    Args:
        world_dir: A folder written by :func:`vlbridge.data.world.generate_world`.
        out_dir: Where ``vision/``, ``clip/`` and ``stage0_vision.json`` go (created).
        config: Architecture and recipe; defaults to ``Stage0VisionConfig()``.
        progress: Show a progress bar.
        fresh: Retrain even if ``out_dir`` already holds a result for this config and world.

    Returns:
        The summary stored in ``stage0_vision.json``: ``config``, ``world_sha256``, ``vision_dir``, ``clip_dir``,
        ``metrics`` (``test`` and, when the world has one, ``compositional`` zero-shot retrieval: ``txt_r1`` =
        image→text, ``img_r1`` = text→image, ... as fractions), ``loss_curve`` (``[step, mean loss]`` every
        ``log_every`` steps), ``train_seconds`` and ``total_seconds``; plus ``cached`` (True when nothing was
        trained).

    Raises:
        InputError: The world is missing or unusable.
        ConfigError: The config does not fit the world (image size not divisible by the patch size).
    """
    import transformers
    from tqdm.auto import tqdm

    from vlbridge.data.images import ImageProcessorConfig
    from vlbridge.data.world import world_vocabulary
    from vlbridge.models.clip import build_word_tokenizer, tokenize
    from vlbridge.training.optim import lr_at, make_optimizer, set_lr
    from vlbridge.training.recipe import OptimConfig

    config = config or Stage0VisionConfig()
    config.validate()
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    world_hash = _world_hash(world_dir)
    if not fresh and (summary := _cached(out_dir, config, world_hash)) is not None:
        return {**summary, "cached": True}

    started = time.perf_counter()
    old_threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    bars_were_on = transformers.utils.logging.is_progress_bar_enabled()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    try:
        train = _load_split(world_dir, "train")
        image_size = train.pixels.shape[-1]
        if train.pixels.shape[-2] != image_size or image_size % config.patch_size:
            raise ConfigError(
                f"world images are {tuple(train.pixels.shape[-2:])}; stage-0 needs square images whose side is "
                f"divisible by patch_size={config.patch_size}"
            )
        tokenizer = build_word_tokenizer(world_vocabulary())
        ids_all, mask_all = tokenize(tokenizer, train.texts)
        lengths = mask_all.sum(dim=1)
        max_text_length = max(int(ids_all.shape[1]), 64)
        _, groups_all = np.unique(np.asarray(train.texts), return_inverse=True)
        groups_all = torch.from_numpy(groups_all.astype(np.int64))
        # captions of each image, as a padded [N, K] table of text indices
        counts = torch.bincount(train.text_image, minlength=len(train.pixels))
        order = torch.argsort(train.text_image, stable=True)
        offsets = torch.cumsum(counts, 0) - counts

        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        model = _build(config, image_size, tokenizer, max_text_length)
        model.train()
        processor = ImageProcessorConfig(image_size=(image_size, image_size))
        normalize = _Normalize(processor.mean, processor.std)
        optim_cfg = OptimConfig(
            lr=config.lr,
            min_lr=config.min_lr,
            warmup_steps=config.warmup_steps,
            weight_decay=config.weight_decay,
            betas=config.betas,
        )
        optimizer = make_optimizer(model, optim_cfg)

        def autocast():
            if config.precision == "bf16":
                return torch.autocast("cpu", dtype=torch.bfloat16)
            return nullcontext()

        batch = min(config.batch_size, len(train.pixels))
        perm, cursor = torch.randperm(len(train.pixels), generator=generator), 0
        curve: list[list[float]] = []
        running, running_n = 0.0, 0
        train_start, train_cpu_start = time.perf_counter(), time.process_time()
        bar = tqdm(range(config.steps), desc="stage 0 vision", unit="step", disable=not progress)
        for step in bar:
            if cursor + batch > len(perm):  # a new epoch: every image once before any twice
                perm, cursor = torch.randperm(len(train.pixels), generator=generator), 0
            images = perm[cursor : cursor + batch]
            cursor += batch
            pick = (torch.rand(batch, generator=generator) * counts[images]).long()
            texts = order[offsets[images] + pick]  # one caption of each image
            length = int(lengths[texts].max())
            ids, mask = ids_all[texts, :length], mask_all[texts, :length]
            pixels = train.pixels[images]
            if config.max_shift:
                pixels = _shift(pixels, config.max_shift, generator)
            set_lr(optimizer, lr_at(step, config.steps, optim_cfg))
            with autocast():
                loss = model.loss(normalize(pixels), ids, mask, groups=groups_all[texts])
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.clamp_logit_scale_()
            running, running_n = running + loss.item(), running_n + 1
            if running_n == config.log_every or step == config.steps - 1:
                curve.append([step + 1, round(running / running_n, 5)])
                bar.set_postfix(loss=f"{running / running_n:.3f}", scale=f"{model.scale().item():.1f}")
                running, running_n = 0.0, 0
        bar.close()
        train_seconds = time.perf_counter() - train_start
        train_cpu_seconds = time.process_time() - train_cpu_start

        model.eval()
        metrics = {}
        for name in ("test", "compositional"):
            if (world_dir / f"captions_{name}.jsonl").is_file():
                split = _load_split(world_dir, name)
                if len(split.pixels):
                    metrics[name] = _retrieval(model, split, tokenizer, normalize, config, autocast)

        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / SUMMARY_NAME).unlink(missing_ok=True)  # from here on the folder is incomplete
        for name, save in (
            ("vision", lambda d: model.save_vision(d, image_processor=processor)),
            ("clip", lambda d: model.save(d, tokenizer=tokenizer, image_processor=processor)),
        ):
            atomic_dir(out_dir / name, save)

        summary = {
            "format_version": _FORMAT_VERSION,
            "config": asdict(config),
            "world_sha256": world_hash,
            "vision_dir": str(out_dir / "vision"),
            "clip_dir": str(out_dir / "clip"),
            "image_size": image_size,
            "n_train_images": len(train.pixels),
            "n_train_captions": len(train.texts),
            "parameters": {
                "vision": sum(p.numel() for p in model.vision_model.parameters()),
                "total": sum(p.numel() for p in model.parameters()),
            },
            "metrics": metrics,
            "final_logit_scale": round(model.scale().item(), 4),
            "loss_curve": curve,
            "train_seconds": round(train_seconds, 2),
            "train_cpu_seconds": round(train_cpu_seconds, 2),  # summed over threads
            "total_seconds": round(time.perf_counter() - started, 2),
        }
        write_text(out_dir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
        return {**summary, "cached": False}
    finally:
        torch.set_num_threads(old_threads)
        if bars_were_on and not progress:
            transformers.utils.logging.enable_progress_bar()
