"""Caption and VQA manifests as records: JSONL manifests and COCO Karpathy splits, read and checked up front.

Readers turn files into lists of records (:class:`CaptionRecord`, :class:`VqaRecord`) and fail early, with file
and line, on malformed input. Image ids are strings everywhere (any string; derived from the image path when
absent): ITM uses them to avoid drawing a caption of the same image as a "negative".
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlbridge.errors import InputError
from vlbridge.utils.io import iter_jsonl

__all__ = ["CaptionRecord", "VqaRecord", "read_caption_manifest", "read_coco_karpathy", "read_vqa_manifest"]


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
    """Yield ``(line number, object)`` for each non-blank line; a missing file or any malformed line is an
    InputError."""
    if not path.is_file():
        raise InputError(f"manifest {path} {_not_a_file(path)}")
    return iter_jsonl(path)


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
