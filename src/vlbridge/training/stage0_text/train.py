"""Training the stage-0 language model (:func:`train_language_model`), cached by config and world manifests."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlbridge.errors import InputError
from vlbridge.training.stage0_text.config import Stage0TextConfig
from vlbridge.training.stage0_text.corpus import SCENE_LENGTH, load_scene_texts, load_world_texts, world_fingerprint
from vlbridge.training.stage0_text.model import (
    autocast,
    build_model,
    evaluate_nll,
    mean_nll,
    pad_rows,
    perplexity,
    shifted_positions,
    token_nll,
)
from vlbridge.training.stage0_text.tokenizer import IMAGE_TOKEN, build_tokenizer, encode_texts, encode_with_scene
from vlbridge.utils.io import atomic_dir, write_text
from vlbridge.utils.threads import torch_threads

_RESULT_NAME = "stage0_text.json"
_LM_NAME = "lm"
_FORMAT_VERSION = 2
_NOT_CACHE_KEYS = ("num_threads",)  # fields that do not change what is trained


def _lr_at(step: int, config: Stage0TextConfig) -> float:
    """Linear warmup to ``lr``, then cosine to ``min_lr`` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(model, config: Stage0TextConfig) -> torch.optim.AdamW:
    decay, plain = [], []
    for _, param in model.named_parameters():  # tied embeddings appear once
        (decay if param.ndim >= 2 else plain).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def _config_dict(config: Stage0TextConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(config)))


def _cache_key(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key not in _NOT_CACHE_KEYS}


def _cached(out_dir: Path, config: Stage0TextConfig, fingerprint: str) -> dict[str, Any] | None:
    try:
        result = json.loads((out_dir / _RESULT_NAME).read_text())
    except (OSError, ValueError):
        return None
    same = (
        result.get("format_version") == _FORMAT_VERSION
        and _cache_key(result.get("config", {})) == _cache_key(_config_dict(config))
        and result.get("world_sha256") == fingerprint
        and (out_dir / _LM_NAME / "config.json").is_file()
    )
    return result if same else None


class _Stream:
    """Endless shuffled passes over one kind of training sequence."""

    def __init__(self, rows: list[list[int]], generator: torch.Generator) -> None:
        self.rows, self.generator = rows, generator
        self.order: list[int] = []
        self.cursor = 0

    def take(self, n: int) -> list[list[int]]:
        out: list[list[int]] = []
        while len(out) < n:
            if self.cursor == len(self.order):  # a new pass: reshuffle
                self.order, self.cursor = torch.randperm(len(self.rows), generator=self.generator).tolist(), 0
            chunk = self.order[self.cursor : self.cursor + n - len(out)]
            out += [self.rows[i] for i in chunk]
            self.cursor += len(chunk)
        return out


@dataclass
class _Progress:
    enabled: bool
    total: int
    bar: Any = field(default=None)

    def __post_init__(self) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc="stage 0: language model", unit="step", dynamic_ncols=True)

    def update(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _take_mixed(streams: dict[str, _Stream], prefix: str, n: int, caption_fraction: float) -> list[list[int]]:
    """``n`` rows from the ``{prefix}captions`` and ``{prefix}vqa`` streams, captions in ``caption_fraction``."""
    captions, vqa = streams.get(f"{prefix}captions"), streams.get(f"{prefix}vqa")
    if n == 0 or (captions is None and vqa is None):
        return []
    if captions is None or vqa is None:
        return (captions or vqa).take(n)
    n_captions = round(n * caption_fraction)
    return captions.take(n_captions) + vqa.take(n - n_captions)


def train_language_model(
    world_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    config: Stage0TextConfig | None = None,
    progress: bool = True,
    fresh: bool = False,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train the world's tokenizer and blind causal LM, and save both in transformers format.

    Training text: every train caption and every train question as ``"Question: {q} Answer: {a}"``, each as
    ``</s> text </s>``, a ``scene_fraction`` of them preceded by a scene record (see the module docstring);
    validation text: the same from the val split. The LM never sees an image.

    Cached: when ``out_dir/stage0_text.json`` exists for the same config and the same world manifests (and the
    model folder is there), it is returned without training, unless ``fresh``.

    Args:
        world_dir: A folder written by :func:`vlbridge.data.world.generate_world`.
        out_dir: Where ``lm/`` and ``stage0_text.json`` go (created if missing).
        config: Model and training settings; defaults to ``Stage0TextConfig()``.
        progress: Show a progress bar.
        fresh: Retrain even if a matching result exists.
        on_log: Called with ``{"step", "loss", "lr"}`` every ``config.log_every`` steps.

    Returns:
        The contents of ``stage0_text.json``: ``config``, ``world_sha256``, ``lm_dir`` (absolute path),
        ``vocab_size``, ``tokenizer_size``, ``image_token_id``, ``parameters``, ``train_sequences``,
        ``final_train_loss``, ``val_loss`` / ``val_perplexity`` (all val text, per token after the BOS, EOS
        included), ``val_caption_perplexity`` / ``val_vqa_perplexity``, ``val_perplexity_shifted`` (the text
        starting at position ``val_shift``), ``loss_curve`` (list of ``{"step", "loss", "lr"}``), ``time_s`` (wall
        seconds per phase and in total, plus the training's process CPU seconds) and ``cached`` (True when nothing
        was trained).

    Raises:
        InputError: If the world folder lacks the train manifests or holds no text.
    """
    config = config or Stage0TextConfig()
    config.validate()
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    for name in ("captions_train.jsonl", "vqa_train.jsonl"):
        if not (world_dir / name).is_file():
            raise InputError(f"{world_dir} is not a world folder: {name} is missing (see vlbridge.data.world)")
    fingerprint = world_fingerprint(world_dir)
    if not fresh and (result := _cached(out_dir, config, fingerprint)) is not None:
        return {**result, "lm_dir": str((out_dir / _LM_NAME).resolve()), "cached": True}

    start = time.perf_counter()
    train_text = load_world_texts(world_dir, "train")
    train_texts = train_text["captions"] + train_text["vqa"]
    if not train_texts:
        raise InputError(f"{world_dir} holds no training text")
    has_val = (world_dir / "captions_val.jsonl").is_file() and (world_dir / "vqa_val.jsonl").is_file()
    val_text = load_world_texts(world_dir, "val") if has_val else {"captions": [], "vqa": []}

    scene_text_pairs = load_scene_texts(world_dir, "train") if config.scene_fraction > 0 else {}
    scenes = sorted({scene for pairs in scene_text_pairs.values() for scene, _ in pairs})
    tokenizer = build_tokenizer(
        [*train_texts, *scenes], max_vocab_size=config.max_vocab_size, model_max_length=config.max_positions
    )
    train_rows = {key: encode_texts(tokenizer, texts, config.max_positions) for key, texts in train_text.items()}
    for key, pairs in scene_text_pairs.items():  # scene record (27 ids, no special tokens) + </s> text </s>
        train_rows[f"scene_{key}"] = encode_with_scene(tokenizer, pairs, config.max_positions)
    val_rows = {
        key: encode_texts(tokenizer, texts, config.max_positions) if texts else [] for key, texts in val_text.items()
    }
    if config.val_max_sequences is not None:  # keep both kinds in proportion
        total_val = sum(len(rows) for rows in val_rows.values())
        if total_val > config.val_max_sequences:
            val_rows = {
                key: rows[: max(1, round(config.val_max_sequences * len(rows) / total_val))]
                for key, rows in val_rows.items()
            }
    tokenizer_time = time.perf_counter() - start

    device = torch.device(config.device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch_threads(config.num_threads):
        torch.manual_seed(config.seed)
        model = build_model(config, tokenizer).to(device)
        model.train()
        optimizer = _optimizer(model, config)
        generator = torch.Generator().manual_seed(config.seed)
        streams = {key: _Stream(rows, generator) for key, rows in train_rows.items() if rows}
        n_scene = round(config.batch_size * config.scene_fraction) if "scene_captions" in streams else 0
        pad_id = tokenizer.pad_token_id

        curve: list[dict[str, float]] = []
        bar = _Progress(progress, config.steps)
        window, last_loss = [], float("nan")
        train_start, train_cpu_start = time.perf_counter(), time.process_time()
        for step in range(config.steps):
            plain = _take_mixed(streams, "", config.batch_size - n_scene, config.caption_fraction)
            with_scene = _take_mixed(streams, "scene_", n_scene, config.scene_caption_fraction)
            batch = plain + with_scene
            ids, mask = pad_rows(batch, pad_id)
            context = torch.tensor([0] * len(plain) + [SCENE_LENGTH] * len(with_scene))
            # Some plain rows start at a random position instead of 0, so that every position embedding is trained:
            # in BLIP-2 the text follows the soft prompt (32 query tokens in the paper) and starts that much later.
            room = torch.tensor([config.max_positions - len(row) for row in batch])
            offsets = (torch.rand(len(batch), generator=generator) * (room + 1)).long()
            offsets *= (torch.rand(len(batch), generator=generator) < config.position_shift_fraction) & (context == 0)
            positions = shifted_positions(mask, offsets, config.max_positions)
            ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
            lr = _lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device, config.precision):
                loss_sum, count = token_nll(model, ids, mask, positions, context, config.scene_noise)
            loss = loss_sum / count
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()

            last_loss = loss.item()
            window.append(last_loss)
            bar.update(last_loss)
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                point = {"step": step + 1, "loss": sum(window) / len(window), "lr": lr}
                curve.append(point)
                window = []
                if on_log is not None:
                    on_log(point)
        bar.close()
        train_time, train_cpu = time.perf_counter() - train_start, time.process_time() - train_cpu_start

        eval_start = time.perf_counter()
        val = {key: evaluate_nll(model, rows, pad_id, config, device) for key, rows in val_rows.items()}
        all_val = val_rows["captions"] + val_rows["vqa"]
        val_shifted = evaluate_nll(model, all_val, pad_id, config, device, config.val_shift)
        val_scene = None
        if scene_text_pairs and has_val:
            pairs = load_scene_texts(world_dir, "val")
            pairs = {key: value[: config.val_max_sequences] for key, value in pairs.items()}
            rows = [r for value in pairs.values() for r in encode_with_scene(tokenizer, value, config.max_positions)]
            val_scene = evaluate_nll(model, rows, pad_id, config, device, context=SCENE_LENGTH)
        eval_time = time.perf_counter() - eval_start

    model.eval()
    lm_dir = out_dir / _LM_NAME

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    atomic_dir(lm_dir, save)  # a crash never leaves half a model
    result = {
        "format_version": _FORMAT_VERSION,
        "config": _config_dict(config),
        "world_sha256": fingerprint,
        "lm_dir": str(lm_dir.resolve()),
        "model_type": model.config.model_type,
        "vocab_size": model.config.vocab_size,
        "tokenizer_size": len(tokenizer),
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_sequences": {key: len(rows) for key, rows in train_rows.items()},
        "sequences_seen": config.steps * config.batch_size,
        "final_train_loss": curve[-1]["loss"] if curve else last_loss,
        "val_sequences": sum(len(rows) for rows in val_rows.values()),
        "val_loss": mean_nll(*val.values()),
        "val_perplexity": perplexity(*val.values()),
        "val_caption_perplexity": perplexity(val["captions"]),
        "val_vqa_perplexity": perplexity(val["vqa"]),
        "val_perplexity_shifted": perplexity(val_shifted),
        "val_scene_perplexity": perplexity(val_scene) if val_scene else None,
        "loss_curve": curve,
        "time_s": {
            "tokenizer": tokenizer_time,
            "train": train_time,
            "train_cpu": train_cpu,
            "eval": eval_time,
            "total": time.perf_counter() - start,
        },
    }
    write_text(out_dir / _RESULT_NAME, json.dumps(result, indent=2) + "\n")
    return {**result, "cached": False}
