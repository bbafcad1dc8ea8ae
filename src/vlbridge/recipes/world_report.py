"""``report.html`` and the printed summary of the world recipe (:mod:`vlbridge.recipes.world`)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from vlbridge.eval.report import HtmlReport, Percent

# The aims of the embedded default on the held-out in-distribution split.
TARGETS = {"text→image R@1 (ITM)": 0.9, "VQA accuracy": 0.85}
_SYSTEMS = {
    "blind": "blind LM (no image)",
    "stage2": "stage 2 (captions only)",
    "instruct": "instruction-tuned",
    "oracle": "LM reading the true scene record",
}


def _pct(value: float | None) -> Percent | None:
    return None if value is None else Percent(value)


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The short printed summary: headline numbers per split and where the report is."""
    lines = ["", "vlbridge demo: the BLIP-2 recipe on the embedded synthetic world", ""]
    for split, m in result["metrics"].items():
        itm = m["text_to_image_r1_itm"]
        lines += [
            f"  {split}:",
            f"    text->image R@1     {m['text_to_image_r1_itc']:.3f} (ITC)"
            + (f", {itm:.3f} after ITM re-ranking" if itm is not None else "")
            + f"   chance {m['chance_r1']:.4f}",
            f"    VQA accuracy        {m['vqa_accuracy']:.3f}   blind LM {m['vqa_accuracy_blind']:.3f}, "
            f"stage 2 zero-shot {m['vqa_accuracy_stage2_zero_shot']:.3f}, true-scene ceiling "
            f"{m['vqa_accuracy_oracle']:.3f}",
            f"    caption fact F1     {m['fact_f1']:.3f}   blind LM {m['fact_f1_blind']:.3f}, ceiling "
            f"{m['fact_f1_oracle']:.3f}; CIDEr {_fmt(m['cider'])}",
        ]
    if result.get("bridges"):
        lines += ["", "  bridges compared (test): VQA acc, fact F1, CIDEr, trainable params, visual tokens, s/step, "
                  "captions/s"]  # fmt: skip
        for name, b in result["bridges"].items():
            lines.append(
                f"    {name:<17} {b['vqa_accuracy']:.3f}  {b['fact_f1']:.3f}  {_fmt(b['cider'])}  "
                f"{b['trainable_params']:>9,}  {b['visual_tokens']:>3}  {b['train_s_per_step']:.3f}  "
                f"{b['captions_per_s']:.1f}"
            )
    lines += ["", f"  report: {result['report']}", f"  took {result['seconds']:.0f} s", ""]
    return lines


def _comparison(report: Any, recipe: Any, bridges: dict[str, Any], test: dict[str, Any] | None) -> None:
    """The section of the bridge comparison: a table of every number, and the bridges side by side in bar charts."""
    report.heading("Bridges compared")
    first = next(iter(bridges.values()))
    report.paragraph(
        f"Each bridge trained with the same frozen ViT and frozen OPT, on the same captions + VQA, for the same "
        f"{recipe.compare.steps} steps of batch {recipe.compare.batch_size} (lr {recipe.compare.lr:g}); evaluated on "
        f"the same {first['images']} test images and {first['questions']} questions. The Q-Former bridges start "
        "from the stage-1 Q-Former; the MLP projector starts from scratch; MiniGPT-4 keeps the stage-1 Q-Former "
        "frozen and trains only its projection into the LM. " + "; ".join(f"*{k}*: {b['label']}" for k, b in
                                                                         bridges.items()) + "."
    )  # fmt: skip
    rows = []
    for name, b in bridges.items():
        r = b["retrieval"] or {}
        rows.append(
            {"bridge": name, "VQA %": b["vqa_accuracy"], "fact F1 %": b["fact_f1"], "CIDEr": b["cider"],
             "t→i R@1 ITM %": r.get("text_to_image_r1_itm"), "trainable params": b["trainable_params"],
             "visual tokens": b["visual_tokens"], "s / step": b["train_s_per_step"],
             "captions / s": b["captions_per_s"]}
        )  # fmt: skip
    report.metrics(
        rows,
        caption="The comparison on the test split. Retrieval needs ITC heads: only MiniGPT-4's Q-Former is the "
        "stage-1 one unchanged, so its recall is the stage-1 model's; the other bridges have none (—). s / step: "
        "training, between the first and last log rows; captions / s: greedy captions of the test images, batch 64",
        highlight={"VQA %": "max", "fact F1 %": "max", "CIDEr": "max", "trainable params": "min",
                   "visual tokens": "min", "s / step": "min", "captions / s": "max"},
    )  # fmt: skip
    types = sorted({t for b in bridges.values() for t in b["vqa_per_type"]})
    names = list(bridges)
    report.metrics(
        [{"bridge": n, **{f"{t} %": bridges[n]["vqa_per_type"].get(t) for t in types}} for n in names],
        caption="VQA accuracy per question type",
        highlight="max",
    )
    reference: dict[str, Any] = {n: bridges[n]["vqa_per_type"] for n in names[1:]}
    if test is not None:
        reference["blind LM"] = test["blind"]["vqa"]["per_type"]
    report.bar_chart(
        dict(bridges[names[0]]["vqa_per_type"]),
        title="VQA accuracy by question type, per bridge · test",
        ylabel="accuracy",
        reference=reference,
        series_label=names[0],
        percent=True,
        width=900,
    )
    overall = {n: {"VQA accuracy": b["vqa_accuracy"], "caption fact F1": b["fact_f1"]} for n, b in bridges.items()}
    report.bar_chart(
        overall[names[0]],
        title="VQA accuracy and caption fact F1, per bridge · test",
        ylabel="fraction",
        reference={n: overall[n] for n in names[1:]},
        series_label=names[0],
        percent=True,
        width=640,
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def write_report(
    path: Path, recipe: Any, stages: dict[str, dict[str, Any]], seconds: float, bridges: dict[str, Any] | None = None
) -> Path:
    """Write the self-contained HTML report of a world-recipe run (``bridges``: the comparison, by bridge name)."""
    metrics = stages["evaluate"]
    root = Path(path).parent  # image paths in the results are relative to the run folder
    report = HtmlReport(
        "vlbridge · BLIP-2 on the embedded synthetic world",
        f"frozen ViT and frozen OPT trained here in stage 0, Q-Former trained in stages 1, 2 and instruction "
        f"tuning · {seconds / 60:.1f} min of this run ({platform.processor() or platform.machine()}, CPU)",
    )
    splits = [s for s in ("test", "compositional") if s in metrics]

    report.heading("Summary")
    report.paragraph(
        "Everything below was trained on this machine from nothing: the world's images and text were generated, a "
        "small vision transformer was trained CLIP-style and a small OPT language model on the world's text "
        "(**stage 0**), both were frozen, and only the Q-Former bridge (with its projection) was trained: "
        "**stage 1** (ITC + ITM + ITG), **stage 2** (soft prompt for the frozen LM, captions) and **instruction "
        "tuning** (the question also goes into the Q-Former). Numbers are on images never seen in training: "
        "*test* is in-distribution, *compositional* holds (shape, colour) pairs that never appeared in training."
    )
    rows = []
    for split in splits:
        m = metrics[split]
        retrieval = m["retrieval"]["metrics"]
        rows.append(
            {
                "split": split,
                "t→i R@1 ITM %": retrieval.get("itm", {}).get("img_r1"),
                "ITC %": retrieval["itc"]["img_r1"],
                "chance %": 1 / m["images"],
                "VQA %": m["instruct"]["vqa"]["accuracy"],
                "blind %": m["blind"]["vqa"]["accuracy"],
                "ceiling %": m["oracle"]["vqa"]["accuracy"],
                "fact F1": m["instruct"]["caption"]["fact_f1"],
                "CIDEr": m["instruct"]["caption"].get("CIDEr"),
            }
        )
    report.metrics(
        rows,
        caption=f"Headline numbers on {metrics[splits[0]]['images']} images per split: text→image recall@1 with the "
        "stage-1 model (after ITM re-ranking, and ITC alone); VQA accuracy and caption fact F1 of the "
        "instruction-tuned model, against the blind LM and the LM reading the true scene record (ceiling)",
    )
    if "test" in metrics:
        m = metrics["test"]
        r1 = m["retrieval"]["metrics"].get("itm", m["retrieval"]["metrics"]["itc"])["img_r1"]
        acc = m["instruct"]["vqa"]["accuracy"]
        met = r1 >= TARGETS["text→image R@1 (ITM)"] and acc >= TARGETS["VQA accuracy"]
        report.note(
            f"Aims on the test split: text→image R@1 ≥ 90% after ITM re-ranking (measured {100 * r1:.1f}%), VQA "
            f"accuracy ≥ 85% (measured {100 * acc:.1f}%). The *ceiling* column is the frozen LM answering from the "
            f"true scene record: a perfect bridge could not do better with this LM.",
            "ok" if met else "warn",
        )

    for split in splits:
        m = metrics[split]
        title = "Held-out images" if split == "test" else "Compositional split (unseen shape-colour pairs)"
        report.heading(title)
        if split == "compositional":
            held = stages.get("world", {}).get("held_out", [])
            report.paragraph(
                "Every image here contains at least one of these (shape, colour) pairs, which never appeared in any "
                "training image or text: " + ", ".join(f"{c} {s}" for s, c in held) + "."
            )
        report.paragraph(
            "Bold line: the instruction-tuned model's caption. Then the stage-2 caption, the first reference, and "
            "up to three questions with the model's answer (→) and the truth. Green: every fact in the caption is "
            "right (fact F1 = 1)."
        )
        items = []
        for ex in m["examples"]:
            lines = [f"stage 2: {ex['captions']['stage2']}", f"reference: {ex['reference']}"]
            lines += [f"Q: {qa['question']}? → {qa['answer']} (truth: {qa['truth']})" for qa in ex["qa"]]
            items.append({"image": root / ex["image"], "title": ex["captions"]["instruct"], "lines": lines,
                          "ok": ex["fact_f1"] >= 0.999})  # fmt: skip
        report.image_gallery(items, columns=3, thumb=160)

    report.heading("Visual question answering")
    for split in splits:
        m = metrics[split]
        per_type = m["instruct"]["vqa"]["per_type"]
        report.bar_chart(
            dict(per_type),
            title=f"VQA accuracy by question type · {split}",
            ylabel="accuracy",
            reference={
                "blind LM": m["blind"]["vqa"]["per_type"],
                "stage 2 zero-shot": m["stage2"]["vqa"]["per_type"],
                "true-scene ceiling": m["oracle"]["vqa"]["per_type"],
            },
            series_label="instruction-tuned",
            percent=True,
            width=760,
        )
    rows = [
        {"split": split, "system": label, "VQA acc %": metrics[split][key]["vqa"]["accuracy"],
         "questions": metrics[split][key]["vqa"]["count"]}
        for split in splits for key, label in _SYSTEMS.items()
    ]  # fmt: skip
    report.metrics(rows, caption="VQA accuracy (official metric), by system")

    report.heading("Captioning")
    rows = []
    for split in splits:
        for key, label in _SYSTEMS.items():
            c = metrics[split][key]["caption"]
            rows.append(
                {"split": split, "system": label, "fact F1 %": c["fact_f1"], "BLEU-4": c.get("Bleu_4"),
                 "ROUGE-L": c.get("ROUGE_L"), "CIDEr": c.get("CIDEr")}
            )  # fmt: skip
    report.metrics(rows, caption="Greedy captions against 5 references per image (pycocoevalcap)")
    report.paragraph(
        "*Fact F1*: the (size, colour, shape) facts a caption states against the objects in the image. The blind "
        "LM writes the same caption for every image."
    )

    report.heading("Image-text retrieval")
    rows = []
    for split in splits:
        m = metrics[split]["retrieval"]["metrics"]
        for how in ("itc", "itm"):
            if how in m:
                r = m[how]
                rows.append(
                    {"split": split, "scores": how.upper(), "text→image R@1 %": r["img_r1"],
                     "R@5 %": r["img_r5"], "image→text R@1 %": r["txt_r1"], "R@5 % ": r["txt_r5"],
                     "chance R@1 %": 1 / metrics[split]["images"]}
                )  # fmt: skip
    report.metrics(rows, caption=f"Stage-1 model; ITM re-ranks the top {recipe.retrieval_k} ITC candidates")
    if "test" in metrics:
        examples = metrics["test"]["retrieval"]["examples"]["text_to_image"]
        report.heading("Text-to-image examples (test)", 3)
        report.retrieval_examples(
            [{"query": e["text"], "results": [{"image": root / r["image"], "score": r["score"], "correct": r["correct"]}
                                              for r in e["top"]]} for e in examples]
        )  # fmt: skip

    if bridges:
        _comparison(report, recipe, bridges, metrics.get("test"))

    report.heading("Training curves")
    v = stages.get("stage0_vision", {})
    t = stages.get("stage0_text", {})
    if v.get("loss_curve"):
        report.line_plot({"contrastive loss": [tuple(p) for p in v["loss_curve"]]}, title="Stage 0: vision (CLIP)",
                         xlabel="step", ylabel="loss")  # fmt: skip
    if t.get("loss_curve"):
        report.line_plot({"LM loss": [(p["step"], p["loss"]) for p in t["loss_curve"]]},
                         title="Stage 0: language model", xlabel="step", ylabel="loss per token")  # fmt: skip
    for stage, title in (("stage1", "Stage 1"), ("stage2", "Stage 2"), ("instruct", "Instruction tuning")):
        curves = stages.get(stage, {}).get("curves") or {}
        if curves:
            report.line_plot({k: [tuple(p) for p in pts] for k, pts in curves.items()}, title=title, xlabel="step",
                             ylabel="loss")  # fmt: skip

    for name in bridges or {}:
        curves = stages.get(f"compare_{name}", {}).get("curves") or {}
        if curves:
            report.line_plot({k: [tuple(p) for p in pts] for k, pts in curves.items()}, title=f"Comparison: {name}",
                             xlabel="step", ylabel="loss")  # fmt: skip

    report.heading("Stages")
    report.metrics(
        [{"stage": name, "seconds": round(r.get("seconds", 0.0), 1), "cached": bool(r.get("cached"))}
         for name, r in stages.items()],
        caption="Wall time when each stage ran (a cached stage was reused from an earlier run)",
    )  # fmt: skip
    report.paragraph(
        "How the frozen LM can read a soft prompt: a web-scale LLM has read countless documents in which a passage "
        "informs the text after it; the world's 0.5M-parameter LM is given the same kind of experience in stage 0 — "
        "part of its training text starts with a 27-word *scene record* (size, colour, shape for each of the nine "
        "grid cells), with noise on those embeddings. The Q-Former's 27 query outputs, projected, take the record's "
        "place; the LM and the vision encoder stay frozen throughout."
    )
    return report.save(path)
