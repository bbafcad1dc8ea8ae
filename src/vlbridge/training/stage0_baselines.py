"""The stage-0 language model's floor and ceiling on the world's test questions and captions.

:func:`blind_baseline` asks the LM alone (no image): answers from the question's wording, one caption for every
image, the floor stages 1 and 2 must beat. :func:`scene_oracle` gives it the *true* scene record
(`stage0_text.scene_text`) before each question: the ceiling of a perfect bridge.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vlbridge.errors import InputError
from vlbridge.training.stage0_text.corpus import VQA_PROMPT, question_scene, scene_text
from vlbridge.utils.io import read_jsonl
from vlbridge.utils.threads import torch_threads

__all__ = ["blind_baseline", "scene_oracle"]


@torch.no_grad()
def _greedy(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    prefixes: Sequence[Sequence[int]] | None = None,
    banned: Sequence[str] = (),
) -> list[str]:
    """Greedy continuations of ``prompts`` (each gets ``</s>`` prepended, and ``prefixes[i]`` before that),
    decoded without special tokens; the words in ``banned`` are never generated."""
    device = next(model.parameters()).device
    encoded = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    if prefixes is not None:
        encoded = [list(prefix) + row for prefix, row in zip(prefixes, encoded)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        rows = [encoded[i] for i in chunk]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, row in enumerate(rows):  # left padding, as decoder-only generation wants
            ids[k, width - len(row) :] = torch.tensor(row)
            mask[k, width - len(row) :] = 1
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            bad_words_ids=[tokenizer(w, add_special_tokens=False)["input_ids"] for w in banned] or None,
        )
        texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        for i, text in zip(chunk, texts):
            out[i] = " ".join(text.split())
    return out


def blind_baseline(
    lm_dir: str | os.PathLike,
    vqa_manifest: str | os.PathLike,
    captions_manifest: str | os.PathLike,
    *,
    batch_size: int = 256,
    max_answer_tokens: int = 10,
    max_caption_tokens: int = 20,
    limit: int | None = None,
    device: str = "cpu",
    num_threads: int | None = 1,
) -> dict[str, Any]:
    """The LLM-only baseline: what the frozen LM says without seeing the image.

    VQA: each question is answered greedily from ``"Question: {q} Answer:"`` alone. Captioning: one greedy
    caption from ``</s>`` alone, which is therefore the same for every image. Later stages are compared against
    these numbers: whatever they gain over them comes from the image.

    Args:
        lm_dir: A folder saved by :func:`train_language_model` (``out_dir/lm``), or any causal LM folder with a
            tokenizer.
        vqa_manifest: A VQA JSONL manifest (``question``, ``answers``, optional ``question_type`` / ``question_id``).
        captions_manifest: A caption JSONL manifest; one prediction per distinct image.
        batch_size: Prompts per ``generate`` call.
        max_answer_tokens: New tokens per answer.
        max_caption_tokens: New tokens for the caption.
        limit: Use only the first ``limit`` questions and images.
        device: Torch device.
        num_threads: Torch CPU threads while generating (restored afterwards); None leaves the setting alone.

    Returns:
        ``{"vqa": {"accuracy", "count", "per_type", "per_type_count", "predictions"}, "captions":
        {"caption", "predictions", "count", "fact_f1"}, "time_s"}``. VQA accuracy is the official VQA metric
        (:func:`vlbridge.eval.vqa.evaluate_vqa`) in [0, 1]; ``predictions`` are ``{"question_id", "question",
        "answer"}`` / ``{"image_id", "image", "caption"}`` records; ``fact_f1`` is the mean
        :func:`vlbridge.data.world.fact_accuracy` of the caption against each image's objects (None when the
        manifest has no ``objects``).

    Raises:
        InputError: If a manifest is empty or unreadable.
    """
    return _lm_answers(
        lm_dir, vqa_manifest, captions_manifest, scenes=False, batch_size=batch_size,
        max_answer_tokens=max_answer_tokens, max_caption_tokens=max_caption_tokens, limit=limit, device=device,
        num_threads=num_threads,
    )  # fmt: skip


def scene_oracle(
    lm_dir: str | os.PathLike,
    vqa_manifest: str | os.PathLike,
    captions_manifest: str | os.PathLike,
    *,
    batch_size: int = 256,
    max_answer_tokens: int = 10,
    max_caption_tokens: int = 20,
    limit: int | None = None,
    device: str = "cpu",
    num_threads: int | None = 1,
) -> dict[str, Any]:
    """The ceiling: what the frozen LM says when it reads the *true* scene record (:func:`scene_text`): the whole
    scene before a caption, a question's ``focus`` objects before the question (as in training).

    The same prompts, arguments and return value as :func:`blind_baseline`, except that every prompt is preceded by
    a record (so captions differ per image and ``captions["caption"]`` is None). A bridge whose soft prompt carried
    exactly what the question needs would score this. VQA records need an ``image_id`` that the captions manifest
    (with ``objects``) also has.
    """
    return _lm_answers(
        lm_dir, vqa_manifest, captions_manifest, scenes=True, batch_size=batch_size,
        max_answer_tokens=max_answer_tokens, max_caption_tokens=max_caption_tokens, limit=limit, device=device,
        num_threads=num_threads,
    )  # fmt: skip


def _lm_answers(
    lm_dir: str | os.PathLike,
    vqa_manifest: str | os.PathLike,
    captions_manifest: str | os.PathLike,
    *,
    scenes: bool,
    batch_size: int,
    max_answer_tokens: int,
    max_caption_tokens: int,
    limit: int | None,
    device: str,
    num_threads: int | None,
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vlbridge.data.world import fact_accuracy
    from vlbridge.eval.vqa import evaluate_vqa

    start = time.perf_counter()
    questions = read_jsonl(Path(vqa_manifest))[:limit]
    by_image = {r.get("image_id", r.get("image")): r for r in read_jsonl(Path(captions_manifest))}
    caption_records = list(by_image.values())[:limit]
    if not questions:
        raise InputError(f"{vqa_manifest} holds no questions")
    if not caption_records:
        raise InputError(f"{captions_manifest} holds no captions")

    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    model = AutoModelForCausalLM.from_pretrained(lm_dir).to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    question_prefixes = caption_prefixes = None
    if scenes:
        records = {key: r for key, r in by_image.items() if "objects" in r}
        missing = [r.get("question_id") for r in questions if r.get("image_id") not in records]
        if missing or any("objects" not in r for r in caption_records):
            raise InputError(f"scene_oracle needs every image's objects in {captions_manifest}")
        scenes = {key: scene_text(r["objects"]) for key, r in records.items()}
        question_prefixes = [
            tokenizer(question_scene(r, scenes), add_special_tokens=False)["input_ids"] for r in questions
        ]
        caption_prefixes = [
            tokenizer(scene_text(r["objects"]), add_special_tokens=False)["input_ids"] for r in caption_records
        ]

    prompts = [VQA_PROMPT.format(r["question"]) for r in questions]
    with torch_threads(num_threads):
        answers = _greedy(model, tokenizer, prompts, max_answer_tokens, batch_size, question_prefixes)
        # After "</s>" the LM may start a caption or "Question: ..."; a captioner asks for a caption, so the word
        # "question" is barred (no caption contains it).
        if scenes:
            captions = _greedy(model, tokenizer, [""] * len(caption_records), max_caption_tokens, batch_size,
                               caption_prefixes, banned=["question"])  # fmt: skip
        else:
            captions = _greedy(model, tokenizer, [""], max_caption_tokens, 1, banned=["question"])
            captions *= len(caption_records)  # "</s>" alone: the same caption for every image
    types = [r.get("question_type", "all") for r in questions]
    scores = evaluate_vqa(answers, [r["answers"] for r in questions], types)
    vqa_predictions = [
        {"question_id": r.get("question_id", str(i)), "question": r["question"], "answer": a}
        for i, (r, a) in enumerate(zip(questions, answers))
    ]

    caption_predictions = [
        {"image_id": r.get("image_id"), "image": r.get("image"), "caption": c}
        for r, c in zip(caption_records, captions)
    ]
    scored = [(r, c) for r, c in zip(caption_records, captions) if "objects" in r]
    fact_f1 = sum(fact_accuracy(c, r["objects"]) for r, c in scored) / len(scored) if scored else None
    return {
        "vqa": {
            "accuracy": scores["accuracy"],
            "count": scores["count"],
            "per_type": scores["per_type"],
            "per_type_count": scores["per_type_count"],
            "predictions": vqa_predictions,
        },
        "captions": {
            "caption": None if scenes else captions[0],
            "count": len(caption_predictions),
            "fact_f1": fact_f1,
            "predictions": caption_predictions,
        },
        "time_s": time.perf_counter() - start,
    }
