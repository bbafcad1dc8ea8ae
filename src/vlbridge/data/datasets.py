"""Image-text datasets over records (read by `data.manifests`, re-exported here; tar shards: `data.webdataset`).

Datasets turn records into tensors; a sample whose image is missing or corrupt is
not fatal: it comes back as a :class:`SkippedSample` marker, :func:`collate_skipping` drops it from the batch and
lists it under ``batch["skipped"]``, and a :class:`SkipReport` in the training loop adds those up. Because the
record of what was skipped travels inside the batch, it survives DataLoader worker processes.

Image ids are strings everywhere (any string; derived from the image path or sample key when absent): ITM uses
them to avoid drawing a caption of the same image as a "negative".
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch
from PIL import Image
from torch.utils.data import Dataset

from vlbridge.data.images import load_image
from vlbridge.data.manifests import (  # re-exported: the records are part of this module's surface
    CaptionRecord,
    VqaRecord,
    read_caption_manifest,
    read_coco_karpathy,
    read_vqa_manifest,
)
from vlbridge.data.transforms import augmentation_seed
from vlbridge.errors import ImageError, InputError

__all__ = [
    "CaptionDataset",
    "CaptionRecord",
    "SkipReport",
    "SkippedSample",
    "VqaDataset",
    "VqaRecord",
    "collate_skipping",
    "read_caption_manifest",
    "read_coco_karpathy",
    "read_vqa_manifest",
]

logger = logging.getLogger(__name__)

Transform = Callable[..., torch.Tensor]  # (PIL image[, generator=...]) -> [3, H, W]


# --------------------------------------------------------------------------------------------------------------------
# Skipping bad samples
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkippedSample:
    """Marker a dataset returns instead of a sample it could not load.

    It is a plain picklable object, so it crosses DataLoader worker processes; :func:`collate_skipping` turns it
    into an entry of ``batch["skipped"]``.

    Attributes:
        path: The image file, or ``shard#key`` for webdataset samples, or the shard for an unreadable shard.
        reason: Why it was skipped (exception type and message).
    """

    path: str
    reason: str


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def collate_skipping(batch: Sequence[dict[str, Any] | SkippedSample | None]) -> dict[str, Any]:
    """Collate sample dicts, dropping skipped samples and listing them in the batch.

    Tensors are stacked, ints and floats become tensors, everything else (strings, lists, None) is kept as a list.

    Args:
        batch: What the dataset returned for each index: sample dicts, :class:`SkippedSample` markers, or ``None``
            (counted as skipped with an unknown path).

    Returns:
        The collated fields of the good samples, plus ``"skipped"``: a list of ``(path, reason)`` and
        ``"batch_size"``: the number of good samples. When every sample was skipped the batch holds only those
        two keys, so a training loop should check ``batch["batch_size"]`` before using it.
    """
    good: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    for item in batch:
        if item is None:
            skipped.append(("<unknown>", "dataset returned None"))
        elif isinstance(item, SkippedSample):
            skipped.append((item.path, item.reason))
        else:
            good.append(item)
    out: dict[str, Any] = {}
    if good:
        for key in good[0]:
            values = [sample[key] for sample in good]
            first = values[0]
            if isinstance(first, torch.Tensor):
                out[key] = torch.stack(values)
            elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                out[key] = torch.tensor(values, dtype=torch.long)
            elif all(isinstance(v, float) for v in values):
                out[key] = torch.tensor(values, dtype=torch.float32)
            else:
                out[key] = values
    out["skipped"] = skipped
    out["batch_size"] = len(good)
    return out


@dataclass
class SkipReport:
    """Adds up the samples skipped over an epoch (or a run) and summarises them.

    Feed it every collated batch (``report.update(batch)``); at the end call :meth:`all_gather` under
    ``torch.distributed`` to merge ranks, then :meth:`summary` or :meth:`print`.

    Attributes:
        entries: ``(path, reason)`` for every skip, in arrival order (a file bad in two epochs appears twice).
        samples: Number of good samples seen.
    """

    entries: list[tuple[str, str]] = field(default_factory=list)
    samples: int = 0

    def update(self, batch: dict[str, Any] | Iterable[tuple[str, str] | SkippedSample]) -> None:
        """Record the skips of one collated batch (or a plain list of ``(path, reason)`` / markers).

        Args:
            batch: A batch from :func:`collate_skipping`, or an iterable of skip entries.
        """
        if isinstance(batch, dict):
            self.samples += int(batch.get("batch_size", 0))
            items: Iterable[Any] = batch.get("skipped", [])
        else:
            items = batch
        for item in items:
            if isinstance(item, SkippedSample):
                self.entries.append((item.path, item.reason))
            else:
                path, reason = item
                self.entries.append((str(path), str(reason)))

    @property
    def count(self) -> int:
        """Number of skipped samples (with repeats)."""
        return len(self.entries)

    def __len__(self) -> int:
        return self.count

    @property
    def paths(self) -> list[str]:
        """Distinct skipped paths, in first-seen order."""
        return list(dict.fromkeys(path for path, _ in self.entries))

    def merge(self, other: SkipReport) -> SkipReport:
        """Add another report's entries and sample count to this one; returns self."""
        self.entries.extend(other.entries)
        self.samples += other.samples
        return self

    def reset(self) -> None:
        """Forget everything (e.g. at the start of an epoch)."""
        self.entries.clear()
        self.samples = 0

    def all_gather(self) -> SkipReport:
        """A report merged over all ``torch.distributed`` ranks (this report itself when not distributed)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, (self.entries, self.samples))
        merged = SkipReport()
        for entries, samples in gathered:
            merged.entries.extend(entries)
            merged.samples += samples
        return merged

    def summary(self, max_items: int = 10) -> str:
        """A short human-readable summary listing up to ``max_items`` distinct paths with their reasons.

        Args:
            max_items: How many paths to list; the rest are counted.
        """
        if not self.entries:
            return f"skipped 0 samples (of {self.samples})"
        first_reason = dict(reversed(self.entries))  # path -> its first reason
        paths = self.paths
        kinds = Counter(reason.split(":", 1)[0] for _, reason in self.entries)
        kinds_text = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
        lines = [f"skipped {self.count} samples ({len(paths)} distinct) of {self.count + self.samples}: {kinds_text}"]
        lines += [f"  {path}: {first_reason[path]}" for path in paths[:max_items]]
        if len(paths) > max_items:
            lines.append(f"  ... and {len(paths) - max_items} more")
        return "\n".join(lines)

    def print(self, file: TextIO | None = None, max_items: int = 10) -> None:
        """Print :meth:`summary` (to stderr by default)."""
        print(self.summary(max_items), file=file if file is not None else sys.stderr)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for run reports."""
        return {"skipped": self.count, "samples": self.samples, "entries": [list(e) for e in self.entries]}


# --------------------------------------------------------------------------------------------------------------------
# Map-style datasets over records
# --------------------------------------------------------------------------------------------------------------------


def _accepts_generator(transform: Callable[..., Any]) -> bool:
    """Whether ``transform`` takes a ``generator`` keyword (our transforms do; plain callables may not)."""
    try:
        params = inspect.signature(transform).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "generator" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class _AugmentedViews:
    """Applies a transform ``views`` times with seeds derived from ``(seed, epoch, sample, view)``."""

    def __init__(self, transform: Transform, views: int, seed: int) -> None:
        if views < 1:
            raise InputError(f"views must be >= 1, got {views}")
        self.transform = transform
        self.views = views
        self.seed = seed
        self.epoch = 0
        self._with_generator = _accepts_generator(transform)

    def __call__(self, image: Image.Image, *sample: int | str) -> torch.Tensor:
        outs = []
        for view in range(self.views):
            if self._with_generator:
                gen = torch.Generator().manual_seed(augmentation_seed(self.seed, self.epoch, *sample, view))
                outs.append(self.transform(image, generator=gen))
            else:
                outs.append(self.transform(image))
        return outs[0] if self.views == 1 else torch.stack(outs)  # [3, H, W] or [V, 3, H, W]


class _ImageRecordDataset(Dataset):
    """Shared loading/skipping logic for datasets whose records have an ``image`` path."""

    def __init__(self, records: Sequence[Any], transform: Transform, *, views: int = 1, seed: int = 0) -> None:
        self.records = list(records)
        self.transform = transform
        self._views = _AugmentedViews(transform, views, seed)

    @property
    def views(self) -> int:
        return self._views.views

    @property
    def epoch(self) -> int:
        return self._views.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that seeds augmentation.

        Call before creating each epoch's DataLoader iterator; with ``persistent_workers=True`` the workers keep
        the copy of the dataset they were started with and would not see the change.
        """
        self._views.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def _pixels(self, index: int) -> torch.Tensor | SkippedSample:
        path = self.records[index].image
        try:
            image = load_image(path)
            return self._views(image, index)
        except (ImageError, OSError) as exc:
            logger.debug("skipping %s: %s", path, exc)
            return SkippedSample(str(path), _reason(exc))


class CaptionDataset(_ImageRecordDataset):
    """Map-style dataset of captioned images.

    Item ``i`` is ``{"pixel_values", "text", "image_id", "label", "index"}`` where ``pixel_values`` is ``[3, H, W]`` (or
    ``[views, 3, H, W]`` when ``views > 1``: several augmentations of one image, e.g. to cache encoder features
    per view). If the image is missing or corrupt the item is a :class:`SkippedSample` instead; use
    :func:`collate_skipping` as the DataLoader's ``collate_fn``.

    Augmentation is seeded from ``(seed, epoch, index, view)``; see :meth:`set_epoch`.
    """

    def __init__(
        self, records: Sequence[CaptionRecord], transform: Transform, *, views: int = 1, seed: int = 0
    ) -> None:
        """Wrap records.

        Args:
            records: From :func:`read_caption_manifest` or :func:`read_coco_karpathy`.
            transform: ``TrainTransform``/``EvalTransform`` or any callable ``(image[, generator=]) -> [3, H, W]``.
            views: Augmented views per item.
            seed: Base seed for augmentation.
        """
        super().__init__(records, transform, views=views, seed=seed)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        pixels = self._pixels(index)
        if isinstance(pixels, SkippedSample):
            return pixels
        record: CaptionRecord = self.records[index]
        return {
            "pixel_values": pixels,
            "text": record.caption,
            "image_id": record.image_id,
            "label": record.label,
            "index": index,
        }


class VqaDataset(_ImageRecordDataset):
    """Map-style VQA dataset; like :class:`CaptionDataset` but items carry the question and answers.

    Item ``i`` is ``{"pixel_values", "question", "answers", "image_id", "question_id", "index"}``; ``answers`` is
    a list of strings (collated to a list of lists).
    """

    def __init__(self, records: Sequence[VqaRecord], transform: Transform, *, views: int = 1, seed: int = 0) -> None:
        """Wrap records.

        Args:
            records: From :func:`read_vqa_manifest`.
            transform: ``TrainTransform``/``EvalTransform`` or any callable ``(image[, generator=]) -> [3, H, W]``.
            views: Augmented views per item.
            seed: Base seed for augmentation.
        """
        super().__init__(records, transform, views=views, seed=seed)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedSample:
        pixels = self._pixels(index)
        if isinstance(pixels, SkippedSample):
            return pixels
        record: VqaRecord = self.records[index]
        return {
            "pixel_values": pixels,
            "question": record.question,
            "answers": list(record.answers),
            "image_id": record.image_id,
            "question_id": record.question_id,
            "index": index,
        }
