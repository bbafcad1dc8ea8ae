"""LLaVA conversation files and the dataset over them: records read and checked (`read_conversations`), each
sample tokenised with its labels by `vlbridge.data.conversation`, batches right-padded (`ConversationCollator`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from vlbridge.data.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    ConversationTemplate,
    check_turns,
    get_template,
    tokenize_conversation,
)
from vlbridge.data.datasets import SkippedSample
from vlbridge.errors import InputError
from vlbridge.utils.io import iter_jsonl

__all__ = ["ConversationCollator", "ConversationDataset", "read_conversations"]

logger = logging.getLogger(__name__)


def _named(where: str, record: Mapping[str, Any]) -> str:
    """``where`` and the record's id, if it has one: ``data.json[3] (id '000123')``."""
    sample_id = record.get("id")
    return f"{where} (id {sample_id!r})" if sample_id is not None else where


def _check_record(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    where = _named(where, record)
    if "conversations" not in record:
        raise InputError(f"{where}: missing required key 'conversations'")
    check_turns(record["conversations"], allow_system=True, where=where)
    image = record.get("image")
    if image is not None and not (isinstance(image, str) and image.strip()):
        raise InputError(f"{where}: 'image' must be a non-empty string (one image) or absent, got {image!r:.80}")
    if isinstance(record.get("id"), dict | list):
        raise InputError(f"{where}: 'id' must be a string or number, got {type(record['id']).__name__}")
    return record


def read_conversations(path: str | Path) -> list[dict[str, Any]]:
    """Read LLaVA conversation records from a ``.json`` list or a ``.jsonl`` file (one object per line).

    The records are returned as the objects in the file (``{"id"?, "image"?, "conversations": [...]}``), after
    checking them: ``conversations`` alternates human/gpt starting with human (a leading ``system`` turn allowed),
    every turn has a known ``from`` and a string ``value``, ``image`` is a path string if present.

    Raises:
        InputError: The file is missing, not UTF-8, not valid JSON, has an unknown suffix, holds no records, or a
            record is malformed; the message names the file and the line (``.jsonl``) or index (``.json``).
    """
    path = Path(path)
    if path.suffix not in (".json", ".jsonl"):
        raise InputError(f"{path}: expected a .json (a list of records) or .jsonl (one record per line) file")
    if not path.is_file():
        raise InputError(f"conversation file {path} {'is a folder, not a file' if path.is_dir() else 'not found'}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if path.suffix == ".jsonl":
        records = [_check_record(obj, f"{path}:{lineno}") for lineno, obj in iter_jsonl(path)]
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        records = [_check_record(obj, f"{path}[{i}]") for i, obj in enumerate(data)]
    if not records:
        raise InputError(f"{path}: no records")
    return records


# --------------------------------------------------------------------------------------------------------------------
# Dataset and batches
# --------------------------------------------------------------------------------------------------------------------


class ConversationDataset(Dataset):
    """Map-style dataset of tokenised LLaVA conversations.

    Items are ``{"id": str, "image": Path | None, "input_ids": LongTensor [T], "labels": LongTensor [T]}``; images
    are not opened here (a model's image processor does that). A sample without target tokens within
    ``max_length`` comes back as a :class:`~vlbridge.data.datasets.SkippedSample` instead, and is counted in
    ``skipped`` (in this process; :class:`ConversationCollator` lists skips in each batch, across workers too).

    Records are checked when the dataset is made, so bad data fails before training starts. A record with an
    image but no placeholder gets ``"<image>\\n"`` before its first human text (LLaVA's habit); a placeholder
    without an image, or more than one for the one image, is an error.
    """

    def __init__(
        self,
        records: str | Path | Sequence[Mapping[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        *,
        template: str | ConversationTemplate = "vicuna_v1",
        image_folder: str | Path | None = None,
        max_length: int | None = None,
        image_token: str = "<image>",
        image_token_id: int = IMAGE_TOKEN_INDEX,
        image_tokens: int = 1,
    ) -> None:
        """
        Args:
            records: A ``.json``/``.jsonl`` file (see :func:`read_conversations`) or the records themselves.
            tokenizer: The language model's tokenizer.
            template: A name in :data:`TEMPLATES` or a :class:`ConversationTemplate`.
            image_folder: Relative image paths are resolved against it (LLaVA's ``--image_folder``); by default
                against the file's folder, or kept as they are for records given in memory.
            max_length, image_token, image_token_id, image_tokens: As in :func:`tokenize_conversation`.
        """
        if isinstance(records, str | Path):
            self.source = str(records)
            self.records = read_conversations(records)
            default_folder: Path | None = Path(records).parent
        else:
            self.source = "records"
            self.records = [_check_record(r, f"records[{i}]") for i, r in enumerate(records)]
            default_folder = None
        self.image_folder = Path(image_folder) if image_folder is not None else default_folder
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.options: dict[str, Any] = dict(
            max_length=max_length, image_token=image_token, image_token_id=image_token_id, image_tokens=image_tokens
        )
        self.conversations = [self._prepare(record, self.where(i)) for i, record in enumerate(self.records)]
        self.skipped = 0

    def where(self, index: int) -> str:
        """Names sample ``index`` in messages: its place in the source, and its id if it has one."""
        return _named(f"{self.source}[{index}]", self.records[index])

    def _prepare(self, record: Mapping[str, Any], where: str) -> list[dict[str, str]]:
        """The record's turns, checked against the template, with the image placeholder where it must be."""
        conversations = [dict(turn) for turn in record["conversations"]]
        turns = check_turns(conversations, allow_system=self.template.allow_system, where=where)
        has_image = record.get("image") is not None
        if self.template.name == "plain":
            if not has_image:
                raise InputError(f"{where}: template 'plain' needs an image in every sample")
            return conversations
        token = self.options["image_token"]
        count = sum(turn.text.count(token) for turn in turns)
        if count and not has_image:
            raise InputError(f"{where}: {count} {token!r} placeholder(s) but no 'image'")
        if count > 1:
            raise InputError(f"{where}: {count} {token!r} placeholders for one image")
        if has_image and not count:
            first = next(i for i, turn in enumerate(turns) if turn.role == "user")
            conversations[first]["value"] = f"{token}\n{conversations[first]['value']}"
        return conversations

    def image_path(self, index: int) -> Path | None:
        """Where sample ``index``'s image is, or ``None`` for a text-only sample."""
        image = self.records[index].get("image")
        if image is None:
            return None
        path = Path(image)
        return path if path.is_absolute() or self.image_folder is None else self.image_folder / path

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        where = self.where(index)
        out = tokenize_conversation(
            self.conversations[index], self.tokenizer, template=self.template, where=where, **self.options
        )
        if out is None:
            self.skipped += 1
            return SkippedSample(path=where, reason=f"no target tokens within max_length={self.options['max_length']}")
        sample_id = self.records[index].get("id")
        return {
            "id": str(sample_id) if sample_id is not None else str(index),
            "image": self.image_path(index),
            "input_ids": torch.tensor(out["input_ids"], dtype=torch.long),
            "labels": torch.tensor(out["labels"], dtype=torch.long),
        }


class ConversationCollator:
    """Right-pads conversation samples into a batch, dropping and counting skipped ones.

    The batch holds ``input_ids`` (padded with ``pad_token_id``), ``labels`` (padded with -100) and
    ``attention_mask`` (1 on real positions, image sentinels included), all ``[B, T]`` long tensors, the lists
    ``ids`` and ``images`` (a path or ``None`` each), ``skipped`` (``(sample, reason)`` pairs, as
    :class:`~vlbridge.data.datasets.SkipReport` adds them up) and ``batch_size``. When every sample was skipped
    the batch holds only the last two. ``skipped`` on the collator counts the skips it has seen (in the process
    where it runs: the DataLoader's workers each have a copy) and each batch with skips is logged.
    """

    def __init__(self, *, pad_token_id: int | None) -> None:
        if pad_token_id is None:
            raise InputError("the tokenizer has no pad token: pass pad_token_id (e.g. the EOS id)")
        self.pad_token_id = pad_token_id
        self.skipped = 0

    def __call__(self, batch: Sequence[Mapping[str, Any] | SkippedSample | None]) -> dict[str, Any]:
        good = [item for item in batch if isinstance(item, Mapping)]
        skipped = [
            (item.path, item.reason) if isinstance(item, SkippedSample) else ("<unknown>", "dataset returned None")
            for item in batch
            if not isinstance(item, Mapping)
        ]
        if skipped:
            self.skipped += len(skipped)
            logger.warning(
                "skipped %d of %d conversation samples (%d so far), e.g. %s: %s",
                len(skipped),
                len(batch),
                self.skipped,
                *skipped[0],
            )
        out: dict[str, Any] = {"skipped": skipped, "batch_size": len(good)}
        if not good:
            return out
        length = max(len(item["input_ids"]) for item in good)
        input_ids = torch.full((len(good), length), self.pad_token_id, dtype=torch.long)  # [B, T]
        labels = torch.full((len(good), length), IGNORE_INDEX, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((len(good), length), dtype=torch.long)  # [B, T]
        for row, item in enumerate(good):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.as_tensor(item["input_ids"])
            labels[row, :n] = torch.as_tensor(item["labels"])
            attention_mask[row, :n] = 1
        out.update(
            input_ids=input_ids,
            labels=labels,
            attention_mask=attention_mask,
            ids=[item.get("id") for item in good],
            images=[item.get("image") for item in good],
        )
        return out
