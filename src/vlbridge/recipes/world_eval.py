"""The world recipe's evaluation: captions and answers of each trained system on the held-out splits (against
the blind LM and the oracle that reads the true scene record), retrieval with the stage-1 model."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlbridge.utils.io import read_jsonl, write_text

if TYPE_CHECKING:
    from vlbridge.recipes.world import WorldRecipe


def _write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _split_records(world: Path, split: str, limit: int | None) -> tuple[list[dict], list[dict]]:
    images = read_jsonl(world / f"captions_{split}.jsonl")[:limit]
    keep = {r["image_id"] for r in images}
    questions = [q for q in read_jsonl(world / f"vqa_{split}.jsonl") if q["image_id"] in keep]
    return images, questions


def _retrieval(model, world: Path, images: list[dict], k: int, progress: bool) -> dict[str, Any]:
    from vlbridge.data.datasets import CaptionRecord
    from vlbridge.inference.retrieval import evaluate_retrieval

    # one query per image: its first reference, which names every object with its size and place
    records = [CaptionRecord(image=world / r["image"], caption=r["caption"], image_id=r["image_id"]) for r in images]
    return evaluate_retrieval(model, records, k=min(k, len(records)), progress=progress, n_examples=6)


def _generate(
    model, world: Path, images: list[dict], questions: list[dict], desc: str, progress: bool, batch: int = 64
) -> dict[str, list[str]]:
    """Greedy captions for ``images`` and answers to ``questions``."""
    from tqdm.auto import tqdm

    captions: list[str] = []
    answers: list[str] = []
    with tqdm(total=len(images) + len(questions), desc=desc, unit="text", disable=not progress) as bar:
        started = time.perf_counter()
        for start in range(0, len(images), batch):
            chunk = images[start : start + batch]
            captions += model.caption([world / r["image"] for r in chunk], max_new_tokens=30)
            bar.update(len(chunk))
        caption_seconds = time.perf_counter() - started  # images read from disk included, as a user would
        for start in range(0, len(questions), batch):
            chunk = questions[start : start + batch]
            images_ = [world / r["image"] for r in chunk]
            answers += model.answer(images_, [r["question"] for r in chunk], max_new_tokens=5)
            bar.update(len(chunk))
    return {"captions": captions, "answers": answers, "caption_seconds": caption_seconds}


def _score(images: list[dict], questions: list[dict], captions: list[str], answers: list[str]) -> dict[str, Any]:
    from vlbridge.data.world import fact_accuracy
    from vlbridge.eval.captioning import caption_metrics
    from vlbridge.eval.vqa import evaluate_vqa

    references = {r["image_id"]: r["captions"] for r in images}
    predicted = {r["image_id"]: c for r, c in zip(images, captions)}
    # World text is lowercase words without punctuation, so the Python PTB tokenizer gives the Java one's tokens;
    # METEOR (a Java process, about 8 s per call here) is left out.
    metrics = caption_metrics(predicted, references, metrics=("BLEU", "ROUGE_L", "CIDEr"), tokenizer="python")
    facts = [fact_accuracy(c, r["objects"]) for r, c in zip(images, captions)]
    vqa = evaluate_vqa(answers, [q["answers"] for q in questions], [q["question_type"] for q in questions])
    return {
        "caption": {**metrics, "fact_f1": sum(facts) / len(facts)},
        "vqa": {key: vqa[key] for key in ("accuracy", "per_type", "count")},
        "fact_f1_per_image": facts,
    }


def _evaluate(paths: dict[str, Path], recipe: WorldRecipe, folder: Path, progress: bool, log) -> dict[str, Any]:
    import vlbridge
    from vlbridge.training.stage0_baselines import blind_baseline, scene_oracle

    world = paths["world"]
    results: dict[str, Any] = {}
    models = {name: vlbridge.load(paths[name]) for name in ("stage1", "stage2", "instruct")}
    for split in ("test", "compositional"):
        images, questions = _split_records(world, split, recipe.eval_images)
        if not images:
            continue
        log(f"  {split}: {len(images)} images, {len(questions)} questions")
        split_result: dict[str, Any] = {"images": len(images), "questions": len(questions)}
        split_result["retrieval"] = _retrieval(models["stage1"], world, images, recipe.retrieval_k, progress)
        for example in split_result["retrieval"]["examples"]["text_to_image"]:  # image paths relative to the run
            for item in (example, *example["top"]):
                item["image"] = os.path.relpath(item["image"], world.parent)
        outputs = {}
        for name in ("stage2", "instruct"):
            outputs[name] = _generate(models[name], world, images, questions, f"{split}: {name}", progress)
            split_result[name] = _score(images, questions, outputs[name]["captions"], outputs[name]["answers"])
        manifests = (world / f"vqa_{split}.jsonl", world / f"captions_{split}.jsonl")
        for name, fn in (("blind", blind_baseline), ("oracle", scene_oracle)):
            raw = fn(paths["lm"], *manifests)
            keep_q = {q["question_id"] for q in questions}
            keep_i = {r["image_id"] for r in images}
            caps = {p["image_id"]: p["caption"] for p in raw["captions"]["predictions"] if p["image_id"] in keep_i}
            ans = {p["question_id"]: p["answer"] for p in raw["vqa"]["predictions"] if p["question_id"] in keep_q}
            split_result[name] = _score(
                images, questions, [caps[r["image_id"]] for r in images], [ans[q["question_id"]] for q in questions]
            )
            outputs[name] = {
                "captions": [caps[r["image_id"]] for r in images],
                "answers": [ans[q["question_id"]] for q in questions],
            }
        # a few examples for the report
        rng = random.Random(0)
        shown = rng.sample(range(len(images)), min(recipe.gallery, len(images)))
        by_image: dict[str, list[int]] = {}
        for i, q in enumerate(questions):
            by_image.setdefault(q["image_id"], []).append(i)
        split_result["examples"] = [
            {
                "image": str(Path(world.name) / images[i]["image"]),  # relative to the run folder
                "image_id": images[i]["image_id"],
                "reference": images[i]["caption"],
                "captions": {name: outputs[name]["captions"][i] for name in outputs},
                "fact_f1": split_result["instruct"]["fact_f1_per_image"][i],
                "qa": [
                    {
                        "question": questions[j]["question"],
                        "answer": outputs["instruct"]["answers"][j],
                        "truth": questions[j]["answers"][0],
                    }
                    for j in by_image.get(images[i]["image_id"], [])[:3]
                ],
            }
            for i in shown
        ]
        for name in ("stage2", "instruct", "blind", "oracle"):
            split_result[name].pop("fact_f1_per_image")
        results[split] = split_result
        predictions = {  # every caption and answer, per system, for inspection
            "captions": [
                {"image_id": r["image_id"], "references": r["captions"],
                 **{n: o["captions"][i] for n, o in outputs.items()}}
                for i, r in enumerate(images)
            ],
            "answers": [
                {"question_id": q["question_id"], "question": q["question"], "truth": q["answers"][0],
                 **{n: o["answers"][i] for n, o in outputs.items()}}
                for i, q in enumerate(questions)
            ],
        }  # fmt: skip
        _write_json(folder / f"predictions_{split}.json", predictions)
        split_result["predictions"] = f"{folder.name}/predictions_{split}.json"  # relative to the run folder
    return results
