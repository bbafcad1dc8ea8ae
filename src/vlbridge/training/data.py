"""Batches for stage-1 training: a deterministic per-epoch order split across ranks, tokenised captions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from vlbridge.data.datasets import collate_skipping


class EpochSampler(Sampler[int]):
    """Shuffles with (seed, epoch) and deals global batch k to ranks in order, so the gathered global batch
    equals the single-process batch; `start_batch` skips what a resumed run has already consumed."""

    def __init__(self, n: int, *, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        G, B = self.batch_size * self.world, self.batch_size
        for k in range(self.start_batch, self.batches_per_epoch()):
            yield from order[k * G + self.rank * B : k * G + (self.rank + 1) * B]

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.start_batch) * self.batch_size


class TokenizingCollate:
    """Stack samples, refill skipped slots with kept samples (ranks need equal batch sizes), tokenise text (padded
    to the longest caption of the batch)."""

    def __init__(self, tokenizer, max_length: int, feature_key: str) -> None:
        self.tokenizer, self.max_length, self.feature_key = tokenizer, max_length, feature_key

    def __call__(self, samples: list[Any]) -> dict[str, Any]:
        size = len(samples)
        batch = collate_skipping(samples)
        kept = batch["batch_size"]
        if kept == 0:
            return batch
        if kept < size:  # duplicates share an image id: ITC treats them as positives, ITM never as negatives
            refill = [i % kept for i in range(size)]
            batch[self.feature_key] = batch[self.feature_key][refill]
            batch["text"] = [batch["text"][i] for i in refill]
            for key in ("image_id", "label"):
                if key in batch:
                    batch[key] = [batch[key][i] for i in refill]
        # Padded to the longest caption of this batch (at most max_length); under several processes the step
        # pads every rank to the global longest (`objectives.stage1.trim_text_padding`).
        enc = self.tokenizer(
            batch["text"], padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        batch["input_ids"], batch["attention_mask"] = enc.input_ids, enc.attention_mask
        return batch
