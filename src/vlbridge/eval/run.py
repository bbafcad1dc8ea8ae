"""`vlbridge eval`: evaluate a model on a manifest and write a JSON report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlbridge.errors import ConfigError


@dataclass
class EvalConfig:
    model: str = ""  # checkpoint folder or hub id
    task: Literal["retrieval", "zero_shot"] = "retrieval"
    data: str = ""  # caption manifest (retrieval) or a manifest whose captions are class names (zero_shot)
    k: int = 128  # retrieval: ITM re-ranking shortlist
    rerank: bool = True
    classes: list[str] = field(default_factory=list)  # zero_shot: class names (default: the manifest's captions)
    template: str = "a photo of a {}."
    batch_size: int = 32
    output: str = "runs/eval/report.json"
    device: str = "cpu"


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    import vlbridge
    from vlbridge.data.datasets import read_caption_manifest
    from vlbridge.inference.retrieval import evaluate_retrieval, write_report, zero_shot_classify

    if not cfg.model or not cfg.data:
        raise ConfigError("eval needs `model` and `data`")
    model = vlbridge.load(cfg.model, device=cfg.device)
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
    write_report(report, Path(cfg.output))
    report["report"] = cfg.output
    return report
