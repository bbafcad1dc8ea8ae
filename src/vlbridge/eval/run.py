"""`vlbridge eval`: evaluate a model on a manifest, print a short summary and write the full JSON report.

Tasks (``task:`` in the eval config):

- ``retrieval``: caption manifest; ITC recall@1/5/10 both ways, then ITM re-ranking of each query's top ``k``.
- ``zero_shot``: caption manifest whose records carry a class in ``label_field`` (any field, dotted for nested
  ones: ``label``, ``meta.class``, ``objects.0.shape``); each image against one prompt per class, the prompts
  of several ``templates`` averaged per class (CLIP's prompt ensemble).
- ``caption``: caption manifest; BLEU-1..4, METEOR, ROUGE-L, CIDEr-D against every reference of an image.
- ``vqa``: VQA manifest; the official VQA accuracy, overall and per ``question_type``; answers generated, or
  ranked among ``candidates`` (one list for all questions, or one per question type in ``candidates_per_type``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlbridge.errors import ConfigError, InputError
from vlbridge.utils.io import iter_jsonl


@dataclass
class EvalConfig:
    model: str = ""  # checkpoint folder or hub id
    task: Literal["retrieval", "zero_shot", "caption", "vqa"] = "retrieval"
    data: str = ""  # caption manifest (retrieval, zero_shot, caption) or VQA manifest (vqa)
    k: int | None = None  # retrieval: ITM re-ranking shortlist (null: 5% of each gallery, 16..128); zero_shot: classes
    rerank: bool = True  # retrieval: ITM re-ranking (zero_shot: off unless set here explicitly with k)
    label_field: str = "label"  # zero_shot: record field with the class (dotted path for nested; "caption" allowed)
    classes: list[str] = field(default_factory=list)  # zero_shot: class names (default: the distinct labels, sorted)
    template: str = "a photo of a {}."  # zero_shot: prompt with one {} for the class name
    templates: list[str] = field(default_factory=list)  # zero_shot: several prompts, averaged per class (ensemble)
    batch_size: int = 32
    num_beams: int = 5  # caption / vqa generation (the paper's setting)
    max_new_tokens: int = 30  # captions (VQA answers: at most 10)
    prompt: str | None = None  # caption prompt (default: the checkpoint's)
    candidates: list[str] = field(default_factory=list)  # vqa: rank these answers instead of generating
    candidates_per_type: dict[str, list[str]] = field(default_factory=dict)  # vqa: answers per question_type
    limit: int | None = None  # evaluate the first N images / questions only
    output: str = "runs/eval/report.json"
    device: str = "cpu"
    progress: bool = True  # a bar on a terminal, a plain line every 30 s otherwise


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the configured evaluation, write the JSON report to ``cfg.output`` and return it."""
    import vlbridge
    from vlbridge.inference.retrieval import write_report

    if not cfg.model or not cfg.data:
        raise ConfigError("eval needs `model` and `data`")
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError(f"limit must be >= 1 (or null), got {cfg.limit}")
    model = vlbridge.load(cfg.model, device=cfg.device)
    if cfg.task == "caption":
        report = evaluate_captions(model, cfg)
    elif cfg.task == "vqa":
        report = evaluate_answers(model, cfg)
    elif cfg.task == "zero_shot":
        report = evaluate_zero_shot(model, cfg)
    else:
        report = evaluate_retrieval_task(model, cfg)
    report["config"] = {k: v for k, v in vars(cfg).items()}
    write_report(report, Path(cfg.output))
    report["report"] = cfg.output
    return report


def evaluate_retrieval_task(model, cfg: EvalConfig) -> dict[str, Any]:
    from vlbridge.data.datasets import read_caption_manifest
    from vlbridge.inference.retrieval import evaluate_retrieval

    records = read_caption_manifest(cfg.data)
    if cfg.limit is not None:  # the first `limit` images, with all their captions
        keep = list(dict.fromkeys(r.image_id for r in records))[: cfg.limit]
        records = [r for r in records if r.image_id in set(keep)]
    return evaluate_retrieval(
        model, records, k=cfg.k, rerank=cfg.rerank, batch_size=cfg.batch_size, progress=cfg.progress
    )


# ------------------------------------------------------------------------------------------------------------ zero-shot
def field_value(record: dict[str, Any], path: str) -> Any:
    """The value at a dotted `path` in a JSON record (`"label"`, `"meta.class"`, `"objects.0.shape"`), or None."""
    value: Any = record
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            return None
        if value is None:
            return None
    return value


def labelled_images(path: str | Path, label_field: str) -> list[tuple[Path, str]]:
    """(image, label) per distinct image of a JSONL manifest, the label read from `label_field` of its record.

    Raises:
        InputError: Unreadable lines, a record without the field (named, with its line), or one image with two
            different labels.
    """
    from vlbridge.data.datasets import read_caption_manifest

    manifest = Path(path)
    if label_field == "caption":  # the captions themselves are the class names
        out: dict[str, tuple[Path, str]] = {}
        for r in read_caption_manifest(manifest):
            out.setdefault(str(r.image), (r.image, r.caption))
        return list(out.values())
    labels: dict[str, tuple[Path, str]] = {}
    for n, record in iter_jsonl(manifest):
        if not isinstance(record.get("image"), str):
            raise InputError(f"{manifest}:{n}: a record needs an 'image' path")
        value = field_value(record, label_field)
        if value is None or isinstance(value, dict | list) or (isinstance(value, str) and not value.strip()):
            raise InputError(
                f"{manifest}:{n}: no usable {label_field!r} in the record (keys: {', '.join(sorted(record))}); "
                "set label_field to the field that holds the class (dotted for nested fields)"
            )
        image = manifest.parent / record["image"]
        label = str(value).strip()
        seen = labels.setdefault(str(image), (image, label))
        if seen[1] != label:
            raise InputError(f"{manifest}:{n}: {record['image']} is labelled both {seen[1]!r} and {label!r}")
    if not labels:
        raise InputError(f"{manifest}: no records")
    return list(labels.values())


def evaluate_zero_shot(model, cfg: EvalConfig) -> dict[str, Any]:
    """Zero-shot classification of a manifest's images against its classes (labels from `cfg.label_field`)."""
    from vlbridge.inference.zero_shot import zero_shot_classify

    items = labelled_images(cfg.data, cfg.label_field)[: cfg.limit]
    classes = list(cfg.classes) or sorted({label for _, label in items})
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({label for _, label in items if label not in index})
    if unknown:
        raise InputError(f"labels not among `classes`: {unknown[:5]} (add them to classes, or leave classes empty)")
    templates = list(cfg.templates) or [cfg.template]
    k = cfg.k if cfg.k is not None else 10
    return zero_shot_classify(
        model,
        [image for image, _ in items],
        classes,
        [index[label] for _, label in items],
        template=templates,
        rerank=cfg.rerank and cfg.k is not None,
        k=k,
        batch_size=cfg.batch_size,
        progress=cfg.progress,
    )


# ---------------------------------------------------------------------------------------------------------- generation
def _batches(items: list, size: int, desc: str, progress: bool):
    from vlbridge.eval.progress import progress_bar

    with progress_bar(len(items), desc, "item", progress and len(items) > size) as bar:
        for i in range(0, len(items), size):
            yield items[i : i + size]
            bar.update(min(size, len(items) - i))


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
    for chunk in _batches(ids, cfg.batch_size, "captioning", cfg.progress):
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
    """Answer every question (or rank candidates); VQA accuracy exactly as the official evaluation.

    Candidates: a question whose ``question_type`` has an entry in ``cfg.candidates_per_type`` is ranked among
    those answers; otherwise among ``cfg.candidates`` when given; otherwise its answer is generated.
    """
    from vlbridge.data.datasets import read_vqa_manifest
    from vlbridge.eval.vqa import evaluate_vqa

    records = read_vqa_manifest(cfg.data)[: cfg.limit]
    per_type = {str(k): list(v) for k, v in cfg.candidates_per_type.items()}
    types_seen = {r.question_type for r in records}
    missing = sorted(t for t in per_type if t not in types_seen)
    if per_type and missing == sorted(per_type):
        raise InputError(
            f"candidates_per_type names {missing[:5]} but no question has that question_type "
            f"(types in {cfg.data}: {sorted(str(t) for t in types_seen)[:8]})"
        )

    def candidates_of(r) -> list[str]:
        return per_type.get(r.question_type or "", cfg.candidates)

    answers: list[str | None] = [None] * len(records)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(tuple(candidates_of(r)), []).append(i)
    for cands, rows in groups.items():
        for chunk in _batches(rows, cfg.batch_size, "answering", cfg.progress):
            images, questions = [records[i].image for i in chunk], [records[i].question for i in chunk]
            if cands:
                out = model.rank_answers(images, questions, list(cands))
            else:
                out = model.answer(
                    images, questions, num_beams=cfg.num_beams, max_new_tokens=min(cfg.max_new_tokens, 10)
                )
            for i, a in zip(chunk, out):
                answers[i] = a
    types = [r.question_type or "all" for r in records]
    metrics = evaluate_vqa([a or "" for a in answers], [list(r.answers) for r in records], types)
    per_question = metrics.pop("per_question", None)
    samples = [
        {
            "image": str(r.image),
            "question": r.question,
            "question_type": r.question_type,
            "prediction": a,
            "answers": list(r.answers),
            "accuracy": None if per_question is None else per_question[i],
        }
        for i, (r, a) in enumerate(zip(records, answers))
    ]
    mode = "generated" if not (cfg.candidates or per_type) else "ranked"
    return {"task": "vqa", "count": len(records), "answers": mode, "metrics": metrics, "predictions": samples}


# ------------------------------------------------------------------------------------------------------------ summary
def _pct(x: Any) -> str:
    return f"{100 * x:5.1f}%" if isinstance(x, int | float) else "  -  "


def summary_text(report: dict[str, Any]) -> str:
    """A few lines of the headline numbers of an eval report (the full report is the JSON file)."""
    task = report.get("task")
    lines: list[str] = []
    if task == "retrieval":
        c = report["counts"]
        k = report.get("k_used") or {}
        lines.append(
            f"retrieval: {c['images']} images, {c['texts']} captions, {c['itm_pairs']} ITM pairs"
            + (f" (k: {k.get('i2t')} texts per image, {k.get('t2i')} images per text)" if k else "")
        )
        lines.append("            text R@1  R@5   R@10 | image R@1  R@5   R@10")
        for name, m in report["metrics"].items():
            label = "ITC" if name == "itc" else "ITC+ITM"
            lines.append(
                f"  {label:<8}  {_pct(m.get('txt_r1'))} {_pct(m.get('txt_r5'))} {_pct(m.get('txt_r10'))} |"
                f"  {_pct(m.get('img_r1'))} {_pct(m.get('img_r5'))} {_pct(m.get('img_r10'))}"
            )
        rep = report.get("repeated_captions") or {}
        if rep.get("texts"):
            lines.append(f"  note: {rep['texts']} caption texts belong to several images (ties ranked by order)")
    elif task == "zero_shot":
        acc = report.get("accuracy") or {}
        n_t = len(report.get("templates") or [report.get("template")])
        lines.append(
            f"zero-shot: {report['count']} images, {len(report['class_names'])} classes, {n_t} template(s)"
            + (", ITM re-ranked" if report.get("rerank") else "")
        )
        lines.append(f"  top-1 {_pct(acc.get('top1'))}   top-5 {_pct(acc.get('top5'))}")
    elif task == "vqa":
        m = report["metrics"]
        lines.append(f"vqa ({report.get('answers', 'generated')} answers): {report['count']} questions")
        lines.append(f"  accuracy {_pct(m['accuracy'])}")
        for t, a in sorted((m.get("per_type") or {}).items()):
            lines.append(f"    {t:<14} {_pct(a)}  ({m.get('per_type_count', {}).get(t, '?')})")
    elif task == "caption":
        m = report["metrics"]
        lines.append(f"caption: {report['count']} images")
        lines.append("  " + "  ".join(f"{k} {v:.3f}" for k, v in m.items() if isinstance(v, int | float)))
    if "report" in report:
        lines.append(f"full report: {report['report']}")
    return "\n".join(lines)
