"""Visual instruction tuning on LLaVA conversation data (`data.conversations`): the task of `stage: conversation`.

Each sample is tokenised turn by turn by `vlbridge.data.conversation` (only the assistant's turns are targets);
its `<image>` slot is filled with the bridge's prefix, so any bridge trains this way: LLaVA's projector (stage 1
with the `plain` template and a frozen LLM, stage 2 with `vicuna_v1` or the tokenizer's chat template and a
full or LoRA-trained LLM), MiniGPT-4's frozen Q-Former + linear layer, a BLIP-2 Q-Former.

Shapes: B batch, Q prefix tokens per image, D LM width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from vlbridge.data.conversation_data import ConversationDataset
from vlbridge.data.datasets import SkippedSample
from vlbridge.data.images import load_image
from vlbridge.data.transforms import augmentation_seed
from vlbridge.errors import ImageError
from vlbridge.objectives.lm import labelled_lm_loss
from vlbridge.training import distributed as D


class ConversationImages(Dataset):
    """Conversation samples with their image loaded and transformed; unreadable images and text-only samples are
    skipped (and counted) — every sample here trains the bridge, so it needs its image."""

    def __init__(self, conversations: ConversationDataset, transform, *, seed: int = 0) -> None:
        self.conversations, self.transform, self.seed, self.epoch = conversations, transform, seed, 0

    def __len__(self) -> int:
        return len(self.conversations)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        item = self.conversations[index]
        if isinstance(item, SkippedSample):
            return item
        if item["image"] is None:
            return SkippedSample(self.conversations.where(index), "text-only sample (no image to train the bridge on)")
        try:
            gen = torch.Generator().manual_seed(augmentation_seed(self.seed, self.epoch, index, 0))
            pixels = self.transform(load_image(item["image"]), generator=gen)
        except (ImageError, OSError) as exc:
            return SkippedSample(str(item["image"]), str(exc))
        return {
            "image_id": str(item["image"]),
            "pixel_values": pixels,
            "token_ids": item["input_ids"].tolist(),  # ragged: kept as lists, IMAGE (-200) in the image's slot
            "label_ids": item["labels"].tolist(),
        }


@dataclass
class ConversationOutput:
    loss: Tensor
    lm_loss: Tensor

    def logs(self) -> dict[str, float]:
        return {"loss": float(self.lm_loss), "lm_loss": float(self.lm_loss)}


class ConversationModule(nn.Module):
    """The model and its LM loss on labelled token rows behind one `forward` (for DistributedDataParallel)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> ConversationOutput:
        model = self.model
        soft = model.prefix_from_features(model.vision(batch["pixel_values"].to(model.device)))  # [B, Q, D]
        labels = batch["label_ids"]
        local = torch.tensor(float(sum(sum(1 for x in row if x != -100) for row in labels)), device=soft.device)
        per_rank = D.all_reduce_mean(local)  # averaging over ranks is then the mean over all target tokens
        loss, _ = labelled_lm_loss(model, soft, batch["token_ids"], labels, num_tokens=per_rank)
        return ConversationOutput(loss, loss.detach())
