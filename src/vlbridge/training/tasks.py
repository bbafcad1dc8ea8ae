"""What `vlbridge train` can train, by `stage`: each a `Task` — its data, how batches are made, the module whose
`forward(batch, generator)` gives the loss, and its hooks. The loop (`training/loop.py`) knows no model.

- `stage1`: ITC + ITM + ITG on captions (the Q-Former's task).
- `stage2`: prefix-LM training through the LM on captions, VQA and chats (any bridge with a prefix).
- `conversation`: visual instruction tuning on LLaVA conversation files (any bridge).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlbridge.errors import ConfigError, InputError
from vlbridge.inference.prefix import IMAGE, expanded_length
from vlbridge.inference.tasks import max_positions
from vlbridge.models.vlm import VisionLanguageModel
from vlbridge.objectives.stage1 import Stage1Output, stage1_losses
from vlbridge.training import distributed as D
from vlbridge.training.data import TokenizingCollate
from vlbridge.training.recipe import LossConfig, TrainConfig


class Stage1Module(nn.Module):
    """The model plus its objective behind one `forward`, so DistributedDataParallel sees the whole step."""

    def __init__(
        self, model: VisionLanguageModel, dec_token_id: int, text_positives: bool = True, loss: LossConfig | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.dec_token_id = dec_token_id
        self.text_positives = text_positives
        self.loss = loss or LossConfig()

    def forward(self, batch: dict[str, Any], generator: torch.Generator) -> Stage1Output:
        device = self.model.device
        if "vision_feats" in batch:
            feats = batch["vision_feats"].to(device)
        else:
            feats = self.model.vision(batch["pixel_values"].to(device))
        ids = D.id_codes(batch["image_id"]).to(device)
        labels = batch.get("label")
        if labels is not None and all(label is None for label in labels):
            labels = None
        return stage1_losses(
            self.model.bridge,
            self.model.select_tokens(feats),
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            ids,
            labels=None if labels is None else D.id_codes(labels).to(device),
            text_positives=self.text_positives,
            dec_token_id=self.dec_token_id,
            generator=generator,
            trim_padding=D.world_size() > 1,  # ranks pad to their own longest caption: agree on one length
            label_smoothing=self.loss.label_smoothing,
            loss_weights=(self.loss.itc, self.loss.itm, self.loss.itg),
        )


def read_records(cfg: TrainConfig, sources: list[str]):
    from vlbridge.data.datasets import read_caption_manifest, read_coco_karpathy

    records = []
    for source in sources:
        if cfg.data.format == "jsonl":
            records.extend(read_caption_manifest(source, label_field=cfg.data.match_field))
        else:
            if cfg.data.image_root is None:
                raise ConfigError("data.image_root is required for COCO-format data")
            records.extend(read_coco_karpathy(source, cfg.data.image_root, cfg.data.coco_split))
    return records


def _transform(cfg: TrainConfig, model: VisionLanguageModel):
    from vlbridge.data.transforms import EvalTransform, TrainTransform

    image_config = model.image_processor.config
    return TrainTransform(image_config, hflip=cfg.data.hflip) if cfg.data.augment else EvalTransform(image_config)


def _feature_cache(cfg: TrainConfig, model: VisionLanguageModel, images: list):
    from vlbridge.data.feature_cache import FeatureCache

    build = dict(
        transform_config=model.image_processor.config,
        views=cfg.data.cache_views if cfg.data.augment else 1,
        train_augment=cfg.data.augment,
        seed=cfg.run.seed,
        train_transform_kwargs={"hflip": cfg.data.hflip} if cfg.data.augment else None,
    )
    cache = None
    if D.is_main():  # one rank encodes; the others wait, then open the finished cache
        cache = FeatureCache.get_or_build(
            model.vision, images, cfg.data.feature_cache, progress=cfg.run.progress, **build
        )
        try:  # every byte once per run (~4 GB/s): training on silently damaged features is worse than a rebuild
            cache.verify()
        except InputError as exc:
            print(f"vlbridge: warning: {exc}; rebuilding the feature cache", file=sys.stderr)
            cache = FeatureCache.build(model.vision, images, cfg.data.feature_cache, progress=cfg.run.progress, **build)
    D.barrier()
    if cache is None:
        cache = FeatureCache.get_or_build(model.vision, images, cfg.data.feature_cache, progress=False, **build)
    return cache


@dataclass
class Task:
    """What the loop trains, chosen by `stage`: its data, how batches are made, the module whose `forward(batch,
    generator)` returns an output with `loss` and `logs()` (named `*_loss` terms), and optional hooks."""

    dataset: Any
    collate: Callable[[list[Any]], dict[str, Any]]
    module: nn.Module
    after_step: Callable[[], dict[str, float]] | None = None  # after each optimiser step: values for the log
    check_batch: Callable[[dict[str, Any]], None] | None = None  # refuse a batch before its forward pass
    uses_every_parameter: bool = False  # every trainable parameter gets a gradient each step (DDP needs to know)

    def __iter__(self):
        """`dataset, collate, module = task`."""
        return iter((self.dataset, self.collate, self.module))


def stage1_data(cfg: TrainConfig, model: VisionLanguageModel) -> Task:
    """(dataset, collate, module) for stage 1."""
    from vlbridge.data.datasets import CaptionDataset

    if not cfg.data.train:
        raise ConfigError("data.train is empty: give at least one caption manifest")
    if cfg.model.embed_dim is None:
        raise ConfigError("stage 1 needs model.embed_dim (the ITC/ITM/ITG heads)")
    records = read_records(cfg, cfg.data.train)
    if cfg.data.feature_cache is not None:
        from vlbridge.data.feature_cache import CachedCaptionDataset

        cache = _feature_cache(cfg, model, [r.image for r in records])
        dataset, key = CachedCaptionDataset(records, cache, seed=cfg.run.seed), "vision_feats"
    else:
        dataset, key = CaptionDataset(records, _transform(cfg, model), seed=cfg.run.seed), "pixel_values"
    tokenizer = model.bridge_tokenizer
    module = Stage1Module(
        model,
        dec_token_id=tokenizer.convert_tokens_to_ids("[DEC]"),
        text_positives=cfg.data.text_positives,
        loss=cfg.loss,
    )
    _check_text_limits(cfg, model)
    return Task(
        dataset,
        TokenizingCollate(tokenizer, cfg.data.max_text_length, key),
        module,
        after_step=lambda: {"temp": float(model.bridge.temp.detach())},
        uses_every_parameter=True,
    )


def stage2_data(cfg: TrainConfig, model: VisionLanguageModel) -> Task:
    """(dataset, collate, module) for stage 2 / instruction tuning."""
    from vlbridge.training.stage2 import (
        PromptCollate,
        PromptedDataset,
        PromptRecord,
        Stage2Module,
        chat_records,
        vqa_records,
    )

    if model.language_model is None:
        raise ConfigError("stage 2 needs model.language_model")
    records = [PromptRecord(r.image, r.image_id, (r.caption,)) for r in read_records(cfg, cfg.data.train)]
    for path in cfg.data.vqa:
        records.extend(vqa_records(path))
    for path in cfg.data.chat:
        records.extend(chat_records(path))
    if not records:
        raise ConfigError("no training data: set data.train, data.vqa or data.chat")
    if cfg.data.feature_cache is not None:
        cache = _feature_cache(cfg, model, sorted({str(r.image) for r in records}))
        dataset, key = PromptedDataset(records, cache=cache, seed=cfg.run.seed), "vision_feats"
    else:
        dataset, key = PromptedDataset(records, transform=_transform(cfg, model), seed=cfg.run.seed), "pixel_values"
    limit = max_positions(model)
    return Task(
        dataset,
        PromptCollate(model, max_text_length=cfg.data.max_text_length, feature_key=key),
        Stage2Module(model),
        check_batch=lambda batch: _check_batch_fits(batch, model, limit, cfg.data.max_text_length),
    )


def conversation_data(cfg: TrainConfig, model: VisionLanguageModel) -> Task:
    """(dataset, collate, module) for visual instruction tuning on LLaVA conversation files."""
    from vlbridge.data.conversation_data import ConversationDataset
    from vlbridge.data.datasets import collate_skipping
    from vlbridge.training.conversation import ConversationImages, ConversationModule

    if model.language_model is None or model.language_model.config.is_encoder_decoder:
        raise ConfigError("stage conversation needs a causal model.language_model")
    if not cfg.data.conversations:
        raise ConfigError("stage conversation needs data.conversations: LLaVA conversation files (.json / .jsonl)")
    if cfg.data.feature_cache is not None:
        raise ConfigError("stage conversation reads images itself: data.feature_cache is not supported there yet")
    limit = max_positions(model) or 2048
    parts = []
    for path in cfg.data.conversations:
        conversations = ConversationDataset(
            path,
            model.tokenizer,
            template=cfg.data.template,
            image_folder=cfg.data.image_folder,
            max_length=limit,
            image_token=model.config.prompts.image_token,
            image_tokens=model.num_visual_tokens,
        )
        parts.append(ConversationImages(conversations, _transform(cfg, model), seed=cfg.run.seed))
    dataset = parts[0] if len(parts) == 1 else _Concat(parts)
    return Task(dataset, collate_skipping, ConversationModule(model))


class _Concat(torch.utils.data.ConcatDataset):
    def set_epoch(self, epoch: int) -> None:
        for part in self.datasets:
            part.set_epoch(epoch)


STAGES = {"stage1": stage1_data, "stage2": stage2_data, "conversation": conversation_data}


def _check_text_limits(cfg: TrainConfig, model: VisionLanguageModel) -> None:
    """Stage 1 pads every caption to `data.max_text_length`: it must fit the Q-Former's text positions."""
    if cfg.stage != "stage1":
        return
    n, limit = cfg.data.max_text_length, model.bridge.config.qformer.max_position_embeddings
    if n > limit:
        raise ConfigError(f"data.max_text_length={n} exceeds the Q-Former's {limit} text positions")


def _check_batch_fits(
    batch: dict[str, Any], model: VisionLanguageModel, limit: int | None, max_text_length: int
) -> None:
    """Stage 2: refuse a batch whose soft prompt + prompt + target would run past the LLM's positions."""
    if limit is None or "prompt_ids" not in batch:
        return
    queries = model.num_visual_tokens
    rows = [p + t for p, t in zip(batch["prompt_ids"], batch["target_ids"])]
    total, row = max((expanded_length(r, queries), r) for r in rows)
    if total > limit:
        visual = row.count(IMAGE) * queries
        raise ConfigError(
            f"a training example is {total - visual} tokens (prompt + target) after {visual} image tokens, past the "
            f"language model's {limit} positions: lower data.max_text_length (now {max_text_length})"
        )
