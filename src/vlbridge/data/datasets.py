"""Image-text datasets: JSONL manifests, COCO Karpathy splits, and webdataset tar shards.

Readers turn files into lists of records (:class:`CaptionRecord`, :class:`VqaRecord`) and fail early, with file
and line, on malformed input. Datasets turn records into tensors; a sample whose image is missing or corrupt is
not fatal: it comes back as a :class:`SkippedSample` marker, :func:`collate_skipping` drops it from the batch and
lists it under ``batch["skipped"]``, and a :class:`SkipReport` in the training loop adds those up. Because the
record of what was skipped travels inside the batch, it survives DataLoader worker processes.

Image ids are strings everywhere (any string; derived from the image path or sample key when absent): ITM uses
them to avoid drawing a caption of the same image as a "negative".
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import random
import re
import sys
import tarfile
import urllib.request
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from vlbridge.data.images import load_image
from vlbridge.data.transforms import augmentation_seed
from vlbridge.errors import ImageError, InputError

__all__ = [
    "CaptionDataset",
    "CaptionRecord",
    "SkipReport",
    "SkippedSample",
    "VqaDataset",
    "VqaRecord",
    "WebDatasetShards",
    "collate_skipping",
    "expand_braces",
    "read_caption_manifest",
    "read_coco_karpathy",
    "read_vqa_manifest",
]

logger = logging.getLogger(__name__)

Transform = Callable[..., torch.Tensor]  # (PIL image[, generator=...]) -> [3, H, W]


# --------------------------------------------------------------------------------------------------------------------
# Records and readers
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionRecord:
    """One (image, caption) pair.

    Attributes:
        image: Path of the image file (already resolved against the manifest's folder).
        caption: The caption text.
        image_id: Identifies the image across its captions (any string).
        label: Optional grouping (e.g. a class name): stage 1 treats records sharing a label as true matches.
    """

    image: Path
    caption: str
    image_id: str
    label: str | None = None


@dataclass(frozen=True)
class VqaRecord:
    """One (image, question, answers) triple.

    Attributes:
        image: Path of the image file (already resolved against the manifest's folder).
        question: The question text.
        answers: Reference answers (VQAv2 has 10 per question, possibly repeated); may be empty for test splits
            only if the manifest says ``"answers": []``.
        image_id: Identifies the image (any string).
        question_type: Optional category (e.g. VQAv2's "what color").
        question_id: Optional id used when writing predictions for an evaluation server.
    """

    image: Path
    question: str
    answers: tuple[str, ...]
    image_id: str
    question_type: str | None = None
    question_id: str | None = None


def _not_a_file(path: Path) -> str:
    """Why a file to read is not there, in words (a folder, a symlink loop, missing)."""
    if path.is_dir():
        return "is a folder, not a file"
    from vlbridge.data.images import _why_missing

    return _why_missing(path).replace("does not exist", "not found")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for each non-blank line; any malformed line is an InputError."""
    if not path.is_file():
        raise InputError(f"manifest {path} {_not_a_file(path)}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _require_str(obj: dict[str, Any], key: str, where: str) -> str:
    if key not in obj:
        raise InputError(f"{where}: missing required key {key!r}")
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    return value


def _optional_id(obj: dict[str, Any], key: str, where: str) -> str | None:
    """An id given as any JSON scalar becomes a string; absent or null stays None."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, dict | list):
        raise InputError(f"{where}: {key!r} must be a string or number, got {type(value).__name__}")
    return str(value)


def _path_id(image: str) -> str:
    """Default image id: the image path as written, with forward slashes."""
    return image.replace("\\", "/")


def _captions(value: Any, where: str) -> list[str]:
    """A caption field may be one string or a list of strings (several captions of one image)."""
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(c, str) and c.strip() for c in items):
        raise InputError(f"{where}: 'caption' must be a non-empty string or a list of them, got {value!r}")
    return [c.strip() for c in items]


def read_caption_manifest(path: str | Path, *, label_field: str | None = None) -> list[CaptionRecord]:
    """Read a JSONL caption manifest.

    Each line is ``{"image": "img/0001.jpg", "caption": "...", "image_id": "optional"}``. Image paths are relative
    to the manifest's folder (absolute paths are kept). ``caption`` may also be a list of strings, giving one
    record per caption. A missing ``image_id`` defaults to the image path as written, so captions of the same
    image share an id. Images are not opened here; missing ones are skipped (and reported) by the dataset.

    Args:
        path: The ``.jsonl`` file.

    Returns:
        One record per caption, in file order.

    Raises:
        InputError: The file is missing, empty, or a line is not valid JSON or lacks ``image``/``caption``;
            the message names the file and line.
    """
    path = Path(path)
    root = path.parent
    records: list[CaptionRecord] = []
    for lineno, obj in _iter_jsonl(path):
        where = f"{path}:{lineno}"
        image = _require_str(obj, "image", where)
        if "caption" not in obj:
            raise InputError(f"{where}: missing required key 'caption'")
        image_id = _optional_id(obj, "image_id", where) or _path_id(image)
        label = _optional_id(obj, label_field, where) if label_field else None
        for caption in _captions(obj["caption"], where):
            records.append(CaptionRecord(image=root / image, caption=caption, image_id=image_id, label=label))
    if not records:
        raise InputError(f"{path}: no records")
    return records


def _answers(value: Any, where: str) -> tuple[str, ...]:
    """VQA answers: a list of strings, or VQAv2-style ``[{"answer": ...}, ...]``."""
    if not isinstance(value, list):
        raise InputError(f"{where}: 'answers' must be a list, got {type(value).__name__}")
    out = []
    for item in value:
        if isinstance(item, dict):
            item = item.get("answer")
        if not isinstance(item, str):
            raise InputError(f"{where}: each answer must be a string (or {{'answer': str}}), got {item!r}")
        out.append(item.strip())
    return tuple(out)


def read_vqa_manifest(path: str | Path) -> list[VqaRecord]:
    """Read a JSONL VQA manifest.

    Each line is ``{"image": ..., "question": "...", "answers": ["...", ...]}`` with optional ``question_type``,
    ``image_id`` and ``question_id``. Paths are relative to the manifest's folder.

    Args:
        path: The ``.jsonl`` file.

    Returns:
        One record per line, in file order.

    Raises:
        InputError: The file is missing or empty, or a line is malformed; the message names the file and line.
    """
    path = Path(path)
    root = path.parent
    records: list[VqaRecord] = []
    for lineno, obj in _iter_jsonl(path):
        where = f"{path}:{lineno}"
        image = _require_str(obj, "image", where)
        question = _require_str(obj, "question", where).strip()
        if "answers" not in obj:
            raise InputError(f"{where}: missing required key 'answers'")
        qtype = obj.get("question_type")
        if qtype is not None and not isinstance(qtype, str):
            raise InputError(f"{where}: 'question_type' must be a string, got {qtype!r}")
        records.append(
            VqaRecord(
                image=root / image,
                question=question,
                answers=_answers(obj["answers"], where),
                image_id=_optional_id(obj, "image_id", where) or _path_id(image),
                question_type=qtype,
                question_id=_optional_id(obj, "question_id", where),
            )
        )
    if not records:
        raise InputError(f"{path}: no records")
    return records


def read_coco_karpathy(
    json_path: str | Path, image_root: str | Path, split: str | Sequence[str] = "train"
) -> list[CaptionRecord]:
    """Read COCO (or Flickr30k) captions with the Karpathy splits.

    Two file formats are accepted:

    * Karpathy's ``dataset_coco.json``: ``{"images": [{"filepath", "filename", "split", "cocoid",
      "sentences": [{"raw": ...}]}]}``. Images are ``image_root/filepath/filename``; ids are ``cocoid`` (else
      ``imgid``, else the file name). ``split="train"`` means ``train`` + ``restval`` (113k images, the
      convention of the BLIP-2 paper and LAVIS); pass a list such as ``["train"]`` to choose splits literally.
    * LAVIS's per-split files (``coco_karpathy_train.json`` etc.): a list of ``{"image": path, "caption": str,
      "image_id": ...}`` (train) or ``{"image": path, "caption": [str, ...]}`` (val/test). Such a file holds one
      split already, so ``split`` is ignored. Missing ids default to the image path.

    Args:
        json_path: The annotation file.
        image_root: Folder the image paths in the file are relative to.
        split: Which Karpathy split(s) to keep (Karpathy format only).

    Returns:
        One record per caption.

    Raises:
        InputError: The file is missing, not JSON, of neither format, or has no captions for ``split``.
    """
    json_path, image_root = Path(json_path), Path(image_root)
    if not json_path.is_file():
        raise InputError(f"COCO annotation file {json_path} {_not_a_file(json_path)}")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{json_path}: not a JSON file ({exc})") from None

    records: list[CaptionRecord] = []
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        wanted = {"train", "restval"} if split == "train" else {split} if isinstance(split, str) else set(split)
        seen_splits: set[str] = set()
        for n, entry in enumerate(data["images"]):
            where = f"{json_path}: images[{n}]"
            if not isinstance(entry, dict) or "filename" not in entry:
                raise InputError(f"{where}: expected an object with 'filename', 'split' and 'sentences'")
            seen_splits.add(str(entry.get("split")))
            if entry.get("split") not in wanted:
                continue
            image = image_root / entry.get("filepath", "") / entry["filename"]
            image_id = next((str(entry[k]) for k in ("cocoid", "imgid") if entry.get(k) is not None), None)
            image_id = image_id or _path_id(str(Path(entry.get("filepath", "")) / entry["filename"]))
            for sentence in entry.get("sentences", []):
                raw = sentence.get("raw") or " ".join(sentence.get("tokens", []))
                if raw.strip():
                    records.append(CaptionRecord(image=image, caption=raw.strip(), image_id=image_id))
        if not records:
            raise InputError(
                f"{json_path}: no captions for split {split!r} (splits in the file: {sorted(seen_splits)})"
            )
    elif isinstance(data, list):
        for n, entry in enumerate(data):
            where = f"{json_path}: [{n}]"
            if not isinstance(entry, dict):
                raise InputError(f"{where}: expected an object, got {type(entry).__name__}")
            image = _require_str(entry, "image", where)
            if "caption" not in entry:
                raise InputError(f"{where}: missing required key 'caption'")
            image_id = _optional_id(entry, "image_id", where) or _path_id(image)
            for caption in _captions(entry["caption"], where):
                records.append(CaptionRecord(image=image_root / image, caption=caption, image_id=image_id))
        if not records:
            raise InputError(f"{json_path}: no records")
    else:
        raise InputError(
            f"{json_path}: unknown format; expected Karpathy's {{'images': [...]}} or a LAVIS list of "
            "{'image', 'caption'} objects"
        )
    return records


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


# --------------------------------------------------------------------------------------------------------------------
# Webdataset tar shards
# --------------------------------------------------------------------------------------------------------------------

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces as webdataset does: ``"a-{000..002}.tar"`` → three names; ``{x,y}`` alternatives.

    Numeric ranges keep zero padding when an endpoint has a leading zero. Several groups expand as a product.

    Args:
        pattern: A path or URL, possibly with brace groups.

    Returns:
        The expanded names, in order.

    Raises:
        InputError: A brace group is neither ``{a..b}`` (with a <= b) nor a comma list.
    """
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = _RANGE.fullmatch(body)
    if numeric:
        lo_text, hi_text = numeric.groups()
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise InputError(f"bad brace range {{{body}}} in {pattern!r}: end is before start")
        padded = any(len(t.lstrip("-")) > 1 and t.lstrip("-").startswith("0") for t in (lo_text, hi_text))
        width = max(len(lo_text), len(hi_text)) if padded else 0
        options = [str(i).zfill(width) for i in range(lo, hi + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise InputError(f"bad brace group {{{body}}} in {pattern!r}: expected {{a..b}} or {{x,y,...}}")
    rests = expand_braces(pattern[match.end() :])
    return [pattern[: match.start()] + option + rest for option in options for rest in rests]


_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


def _split_key(name: str) -> tuple[str, str] | None:
    """``"dir/000123.seg.png"`` → ``("dir/000123", "seg.png")``; None for names without an extension or hidden."""
    directory, _, base = name.rpartition("/")
    if not base or base.startswith(".") or "." not in base:
        return None
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _local(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def _open_shard(url: str) -> io.BufferedIOBase:
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url)  # the user chose this URL
    return _local(url).open("rb")


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class WebDatasetShards(IterableDataset):
    """Stream image-text samples from webdataset tar shards, without the ``webdataset`` package.

    Members are grouped by key (path up to the first dot of the file name), as webdataset writes them:
    ``000001.jpg`` + ``000001.txt`` form one sample. The image comes from ``.jpg``/``.jpeg``/``.png``/``.webp``,
    the text from ``.txt`` or else from the ``"caption"`` (or ``"text"``) field of ``.json`` (a list of captions
    gives its first); ``image_id`` comes from the JSON's ``"image_id"`` when present, else the key.

    Each sample is ``{"pixel_values", "text", "image_id", "key", "shard"}``. A sample with a corrupt image, no
    image or no text, and a shard that breaks off mid-stream, come back as :class:`SkippedSample` markers (use
    :func:`collate_skipping`).

    Shards are split across DataLoader workers and ``torch.distributed`` ranks (shard ``i`` goes to global worker
    ``i % (world_size * num_workers)``), so no sample is read twice; use at least that many shards, or some
    workers get none. Ranks may get different numbers of samples, so a distributed loop should run a fixed number
    of steps per epoch. With ``shuffle_buffer > 0`` the shard order is shuffled per epoch (identically on every
    rank) and samples are shuffled within a buffer of that many (undecoded) samples per worker; with 0 the order
    is the shards' order.
    """

    def __init__(
        self,
        urls_or_paths: str | Sequence[str],
        transform: Transform,
        *,
        shuffle_buffer: int = 0,
        seed: int = 0,
        views: int = 1,
    ) -> None:
        """Set up the stream.

        Args:
            urls_or_paths: Shard paths or ``http(s)://``/``file://`` URLs, with brace expansion
                (``"data/shard-{000..009}.tar"``).
            transform: ``TrainTransform``/``EvalTransform`` or any callable ``(image[, generator=]) -> [3, H, W]``.
            shuffle_buffer: Samples held for shuffling per worker; 0 keeps the stored order.
            seed: Base seed for shuffling and augmentation (augmentation uses ``(seed, epoch, shard file name, key,
                view)``).
            views: Augmented views per sample (``pixel_values`` becomes ``[views, 3, H, W]`` when > 1).
        """
        patterns = [urls_or_paths] if isinstance(urls_or_paths, str) else list(urls_or_paths)
        self.shards = [name for pattern in patterns for name in expand_braces(pattern)]
        if not self.shards:
            raise InputError("no webdataset shards given")
        missing = [s for s in self.shards if not s.startswith(("http://", "https://")) and not _local(s).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise InputError(f"webdataset shard not found: {missing[0]}{more}")
        if shuffle_buffer < 0:
            raise InputError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.transform = transform
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self._views = _AugmentedViews(transform, views, seed)
        # Spawned DataLoader workers do not inherit the process group: remember the rank seen at construction.
        self._rank_world = _rank_world()

    @property
    def epoch(self) -> int:
        return self._views.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that seeds shuffling and augmentation (see ``CaptionDataset.set_epoch``)."""
        self._views.epoch = int(epoch)

    def worker_shards(self) -> list[str]:
        """The shards the calling process (this rank's DataLoader worker, or the main process) should read."""
        live = _rank_world()
        rank, world = live if live != (0, 1) else self._rank_world
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = list(self.shards)
        if self.shuffle_buffer > 0:
            random.Random(augmentation_seed(self.seed, self.epoch, "shards")).shuffle(shards)
        return shards[rank * workers + worker :: world * workers]

    def __iter__(self) -> Iterator[dict[str, Any] | SkippedSample]:
        shards = self.worker_shards()
        if not shards:
            warnings.warn(
                f"a webdataset reader got no shards: {len(self.shards)} shards for more ranks x workers",
                stacklevel=2,
            )
            return
        groups: Iterator[tuple[str, str, dict[str, bytes]] | SkippedSample] = self._groups(shards)
        if self.shuffle_buffer > 0:
            info = get_worker_info()
            rank, _ = self._rank_world
            rng = random.Random(augmentation_seed(self.seed, self.epoch, "buffer", rank, info.id if info else 0))
            groups = _shuffled(groups, self.shuffle_buffer, rng)
        for group in groups:
            yield group if isinstance(group, SkippedSample) else self._decode(*group)

    def _groups(self, shards: list[str]) -> Iterator[tuple[str, str, dict[str, bytes]] | SkippedSample]:
        """Raw ``(shard, key, {ext: bytes})`` groups; a shard that fails to read ends with a skip marker."""
        for url in shards:
            key: str | None = None
            members: dict[str, bytes] = {}
            count = 0
            try:
                with _open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                    for member in tar:
                        split = _split_key(member.name) if member.isfile() else None
                        if split is None:
                            continue
                        member_key, ext = split
                        file = tar.extractfile(member)
                        data = file.read() if file is not None else b""
                        if len(data) != member.size:  # a stream cut off mid-member just reads short
                            raise tarfile.ReadError(f"{member.name} is truncated ({len(data)} of {member.size} bytes)")
                        if member_key != key:
                            if members:
                                yield url, key, members
                                count += 1
                            key, members = member_key, {}
                        members[ext] = data
                    # tarfile stops quietly at a cut-off header; a complete archive ends with a zero block, which
                    # leaves the stream exactly one block past the last header offset.
                    if getattr(tar.fileobj, "pos", tar.offset + tarfile.BLOCKSIZE) - tar.offset < tarfile.BLOCKSIZE:
                        raise tarfile.ReadError("archive ends without its end-of-archive marker (truncated)")
                if members:
                    yield url, key, members
            except _TAR_ERRORS as exc:
                logger.debug("shard %s broke off after %d samples: %s", url, count, exc)
                yield SkippedSample(url, f"unreadable shard after {count} samples: {_reason(exc)}")

    def _decode(self, url: str, key: str, members: dict[str, bytes]) -> dict[str, Any] | SkippedSample:
        where = f"{url}#{key}"
        image_ext = next((ext for ext in _IMAGE_EXTS if ext in members), None)
        if image_ext is None:
            return SkippedSample(where, "no image member (.jpg/.jpeg/.png/.webp)")
        meta: dict[str, Any] = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                return SkippedSample(where, f"bad .json member: {_reason(exc)}")
            if not isinstance(meta, dict):
                return SkippedSample(where, f".json member is a {type(meta).__name__}, not an object")
        text: Any = None
        if "txt" in members:
            try:
                text = members["txt"].decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                return SkippedSample(where, f"bad .txt member: {_reason(exc)}")
        else:
            text = meta.get("caption", meta.get("text"))
            if isinstance(text, list):
                text = text[0] if text else None
        if not isinstance(text, str) or not text.strip():
            return SkippedSample(where, "no caption (.txt, or .json with a 'caption' or 'text' field)")
        try:
            # load_image takes paths or PIL images; Image.open only reads the header, load_image then checks the
            # size limit and decodes fully.
            image = load_image(Image.open(io.BytesIO(members[image_ext])))
            pixels = self._views(image, url.rsplit("/", 1)[-1], key)  # shard name, not path: same seeds anywhere
        except (ImageError, OSError, Image.DecompressionBombError) as exc:
            logger.debug("skipping %s: %s", where, exc)
            return SkippedSample(where, _reason(exc))
        image_id = meta.get("image_id")
        return {
            "pixel_values": pixels,
            "text": text.strip(),
            "image_id": key if image_id is None else str(image_id),
            "key": key,
            "shard": url,
        }


def _shuffled(items: Iterator[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Reservoir-style shuffle: fill a buffer, then emit a random element for each new one."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer
