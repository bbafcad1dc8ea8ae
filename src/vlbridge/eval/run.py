"""`vlbridge eval`: evaluate a model on a manifest and write a JSON report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlbridge.errors import ConfigError


@dataclass
class EvalConfig:
    model: str = ""  # checkpoint folder or hub id
    task: Literal["retrieval", "zero_shot", "caption", "vqa"] = "retrieval"
    data: str = ""  # caption manifest (retrieval, caption), VQA manifest (vqa), or captions = class names (zero_shot)
    k: int = 128  # retrieval: ITM re-ranking shortlist
    rerank: bool = True
    classes: list[str] = field(default_factory=list)  # zero_shot: class names (default: the manifest's captions)
    template: str = "a photo of a {}."
    batch_size: int = 32
    num_beams: int = 5  # caption / vqa generation (the paper's setting)
    max_new_tokens: int = 30  # captions (VQA answers: 10)
    prompt: str | None = None  # caption prompt (default: the checkpoint's)
    candidates: list[str] = field(default_factory=list)  # vqa: rank these answers instead of generating
    limit: int | None = None  # evaluate the first N images / questions only
    output: str = "runs/eval/report.json"
    device: str = "cpu"


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    import vlbridge
    from vlbridge.inference.retrieval import write_report

    if not cfg.model or not cfg.data:
        raise ConfigError("eval needs `model` and `data`")
    model = vlbridge.load(cfg.model, device=cfg.device)
    if cfg.task == "caption":
        report = evaluate_captions(model, cfg)
    elif cfg.task == "vqa":
        report = evaluate_answers(model, cfg)
    else:
        report = _evaluate_matching(model, cfg)
    write_report(report, Path(cfg.output))
    report["report"] = cfg.output
    return report


def _evaluate_matching(model, cfg: EvalConfig) -> dict[str, Any]:
    from vlbridge.data.datasets import read_caption_manifest
    from vlbridge.inference.retrieval import evaluate_retrieval, zero_shot_classify

    records = read_caption_manifest(cfg.data)
    if cfg.task == "retrieval":
        report = evaluate_retrieval(model, records, k=cfg.k, rerank=cfg.rerank, batch_size=cfg.batch_size)
    else:
        classes = cfg.classes or sorted({r.caption for r in records})
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[r.caption] for r in records] if all(r.caption in index for r in records) else None
        report = zero_shot_classify(
            model, [r.image for r in records], classes, labels, template=cfg.template, batch_size=cfg.batch_size
        )
    return report


def _batches(items: list, size: int):
    from tqdm.auto import tqdm

    for i in tqdm(range(0, len(items), size), desc="evaluating", unit="batch", disable=len(items) <= size):
        yield items[i : i + size]


def evaluate_captions(model, cfg: EvalConfig) -> dict[str, Any]:
    """Caption each image once; BLEU-1..4, METEOR, ROUGE-L, CIDEr-D against all its reference captions."""
    from vlbridge.data.datasets import read_caption_manifest
    from vlbridge.eval.captioning import caption_metrics

    references: dict[str, list[str]] = {}
    images: dict[str, Path] = {}
    for r in read_caption_manifest(cfg.data):
        references.setdefault(r.image_id, []).append(r.caption)
        images.setdefault(r.image_id, r.image)
    ids = list(references)[: cfg.limit]
    predictions: dict[str, str] = {}
    for chunk in _batches(ids, cfg.batch_size):
        texts = model.caption(
            [images[i] for i in chunk], cfg.prompt, num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens
        )
        predictions.update(zip(chunk, texts))
    metrics = caption_metrics(predictions, {i: references[i] for i in ids})
    samples = [
        {"image_id": i, "image": str(images[i]), "prediction": predictions[i], "references": references[i]} for i in ids
    ]
    return {"task": "caption", "count": len(ids), "metrics": metrics, "predictions": samples}


def evaluate_answers(model, cfg: EvalConfig) -> dict[str, Any]:
    """Answer every question (or rank `candidates`); VQA accuracy exactly as the official evaluation."""
    from vlbridge.data.datasets import read_vqa_manifest
    from vlbridge.eval.vqa import evaluate_vqa

    records = read_vqa_manifest(cfg.data)[: cfg.limit]
    answers: list[str] = []
    for chunk in _batches(records, cfg.batch_size):
        images, questions = [r.image for r in chunk], [r.question for r in chunk]
        if cfg.candidates:
            answers.extend(model.rank_answers(images, questions, cfg.candidates))
        else:
            answers.extend(
                model.answer(images, questions, num_beams=cfg.num_beams, max_new_tokens=min(cfg.max_new_tokens, 10))
            )
    types = [r.question_type or "all" for r in records]
    metrics = evaluate_vqa(answers, [list(r.answers) for r in records], types)
    per_question = metrics.pop("per_question", None)
    samples = [
        {
            "image": str(r.image),
            "question": r.question,
            "prediction": a,
            "answers": list(r.answers),
            "accuracy": None if per_question is None else per_question[i],
        }
        for i, (r, a) in enumerate(zip(records, answers))
    ]
    return {"task": "vqa", "count": len(records), "metrics": metrics, "predictions": samples}
