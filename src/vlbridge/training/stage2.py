"""Stage-2 generative learning and instruction / VQA tuning: data, batching and the training module.

A sample is an image, an optional prompt and a target text. Captions train with the checkpoint's caption
prompt (T5: a random caption prefix in the encoder); VQA records train with the VQA template and a target
answer drawn in proportion to how many annotators gave it; chat records with the earlier turns replayed in
the prompt. With `instruct`, the prompt is also fed to the Q-Former next to the queries (InstructBLIP).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from vlbridge.data.datasets import SkippedSample, collate_skipping, read_caption_manifest, read_vqa_manifest
from vlbridge.data.images import load_image
from vlbridge.data.transforms import augmentation_seed
from vlbridge.errors import ImageError, InputError
from vlbridge.inference.prefix import keep_end, prompt_tokens
from vlbridge.objectives.lm import decoder_lm_loss, encoder_decoder_lm_loss, split_prefix
from vlbridge.training import distributed as D
from vlbridge.utils.io import iter_jsonl


@dataclass(frozen=True)
class PromptRecord:
    """One training example: `prompt` None means "caption" (the default prompt, or a T5 prefix split)."""

    image: Path
    image_id: str
    targets: tuple[str, ...]  # several answers: drawn in proportion to their counts
    prompt: str | None = None
    history: tuple[tuple[str, str], ...] = ()  # earlier chat turns


def caption_records(path: str | Path) -> list[PromptRecord]:
    return [PromptRecord(r.image, r.image_id, (r.caption,)) for r in read_caption_manifest(path)]


def vqa_records(path: str | Path) -> list[PromptRecord]:
    return [PromptRecord(r.image, r.image_id, tuple(r.answers), prompt=r.question) for r in read_vqa_manifest(path)]


def chat_records(path: str | Path) -> list[PromptRecord]:
    """JSONL `{"image": ..., "turns": [[question, answer], ...]}`: one example per turn, earlier turns as history."""
    path = Path(path)
    out = []
    for line_no, obj in iter_jsonl(path):
        try:
            turns = [(str(q), str(a)) for q, a in obj["turns"]]
            image = path.parent / obj["image"]
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}:{line_no}: not a chat record ({exc})") from exc
        image_id = str(obj.get("image_id", obj["image"]))
        for t, (q, a) in enumerate(turns):
            out.append(PromptRecord(image, image_id, (a,), prompt=q, history=tuple(turns[:t])))
    return out


class PromptedDataset(Dataset):
    """Images (pixels, or cached frozen features) with a prompt and one target per item."""

    def __init__(self, records: list[PromptRecord], *, transform=None, cache=None, seed: int = 0) -> None:
        if (transform is None) == (cache is None):
            raise ValueError("give exactly one of transform and cache")
        self.records, self.transform, self.cache, self.seed = records, transform, cache, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        r = self.records[index]
        rng = random.Random(augmentation_seed(self.seed, "target", self.epoch, index))
        counts = Counter(r.targets)
        target = rng.choices(list(counts), weights=list(counts.values()))[0]
        item = {
            "prompt": r.prompt,
            "target": target,
            "history": r.history,
            "image_id": r.image_id,
            "index": index,
            "split_seed": augmentation_seed(self.seed, "split", self.epoch, index),
        }
        try:
            if self.cache is not None:
                if not self.cache.has(r.image):
                    return SkippedSample(str(r.image), "not in the feature cache")
                view = (self.epoch + index) % self.cache.num_views
                item["vision_feats"] = self.cache.features([r.image], view)[0]
            else:
                gen = torch.Generator().manual_seed(augmentation_seed(self.seed, self.epoch, index, 0))
                item["pixel_values"] = self.transform(load_image(r.image), generator=gen)
        except (ImageError, OSError) as exc:
            return SkippedSample(str(r.image), str(exc))
        return item


class PromptCollate:
    """Tokenise prompts and targets for the LLM (and prompts for the Q-Former when instruction-aware)."""

    def __init__(self, model: nn.Module, *, max_text_length: int, feature_key: str) -> None:
        self.tokenizer = model.tokenizer
        self.qformer_tokenizer = model.bridge_tokenizer if model.bridge.instruction_aware else None
        self.style = model.config.prompts
        self.t5 = bool(model.config.language and model.config.language.get("is_encoder_decoder"))
        eos = model.language_model.generation_config.eos_token_id
        self.eos = [eos[0] if isinstance(eos, list) else eos] if eos is not None else []
        self.max_text_length, self.feature_key = max_text_length, feature_key

    def prompt_text(self, item: dict[str, Any]) -> tuple[str, str]:
        """(LLM prompt, target) of one item."""
        s = self.style
        if item["prompt"] is None:  # a caption
            if self.t5:
                prefix, target = split_prefix(item["target"], random.Random(item["split_seed"]))
                return " ".join(x for x in (s.caption_prompt, prefix) if x), target
            return s.caption_prompt, item["target"]
        turns = [s.chat_turn.format(q, a) for q, a in item["history"]]
        return " ".join([*turns, s.vqa_template.format(item["prompt"])]), item["target"]

    def __call__(self, samples: list[Any]) -> dict[str, Any]:
        items = [s for s in samples if isinstance(s, dict)]
        batch = collate_skipping(samples)
        if not items:
            return batch
        pairs = [self.prompt_text(it) for it in items]
        tok, n = self.tokenizer, self.max_text_length
        # The image's slot where the prompt conventions put it; the end of long histories kept.
        batch["prompt_ids"] = [keep_end(prompt_tokens(tok, self.style, p), 4 * n) for p, _ in pairs]
        if self.t5:
            batch["target_ids"] = [tok(t).input_ids[:n] for _, t in pairs]
        else:
            batch["target_ids"] = [
                tok(" " + t.strip(), add_special_tokens=False).input_ids[:n] + self.eos for _, t in pairs
            ]
        if self.qformer_tokenizer is not None:
            enc = self.qformer_tokenizer(
                [p for p, _ in pairs], padding=True, truncation=True, max_length=4 * n, return_tensors="pt"
            )
            batch["qformer_ids"], batch["qformer_mask"] = enc.input_ids, enc.attention_mask
        return batch


@dataclass
class Stage2Output:
    loss: Tensor
    lm_loss: Tensor

    def logs(self) -> dict[str, float]:
        return {"loss": float(self.lm_loss), "lm_loss": float(self.lm_loss)}


class Stage2Module(nn.Module):
    """The bridge and the frozen LLM behind one `forward` (for DistributedDataParallel)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> Stage2Output:
        model = self.model
        device = model.device
        if "vision_feats" in batch:
            feats = batch["vision_feats"].to(device)
        else:
            feats = model.vision(batch["pixel_values"].to(device))
        soft = model.prefix_from_features(feats, batch.get("qformer_ids"), batch.get("qformer_mask"))  # [B, Q, D]
        prompts, targets = batch["prompt_ids"], batch["target_ids"]
        local = torch.tensor(float(sum(len(t) for t in targets)), device=device)
        per_rank = D.all_reduce_mean(local)  # so that averaging over ranks is the mean over all target tokens
        if model.language_model.config.is_encoder_decoder:
            loss, _ = encoder_decoder_lm_loss(model, soft, prompts, targets, num_tokens=per_rank)
        else:
            loss, _ = decoder_lm_loss(model, soft, prompts, targets, num_tokens=per_rank)
        return Stage2Output(loss, loss.detach())
