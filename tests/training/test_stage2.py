"""Stage 2: the bridge learns to describe images through a frozen LLM; gradients stay out of frozen parts;
the T5 prefix-LM split; export to transformers."""

from __future__ import annotations

import random

import pytest
import torch
import transformers

import vlbridge
from training_data import stage2_config, write_blip2_vision_model, write_caption_lm, write_images, write_vqa
from vlbridge.data.datasets import read_caption_manifest
from vlbridge.objectives.lm import split_prefix
from vlbridge.training.loop import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    write_images(root, 400, seed=0)
    write_images(root, 48, seed=1, name="val")
    write_vqa(root, "train")
    write_vqa(root, "val")
    write_blip2_vision_model(root)
    write_caption_lm(root)
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run2")
    cfg = stage2_config(
        data, **{"run.max_steps": 600, "run.output_dir": str(out), "optim.lr": 2e-3, "data.batch_size": 16}
    )
    summary = train(cfg)
    return vlbridge.load(summary["model"]), out


def facts(caption: str) -> tuple[str, str] | None:
    words = caption.split()
    try:
        return words[words.index("square") - 1], words[words.index("on") + 1]
    except (ValueError, IndexError):
        return None


def test_captions_beat_the_blind_baseline(data, trained):
    model, _ = trained
    records = read_caption_manifest(data / "val.jsonl")
    captions = model.caption([r.image for r in records], max_new_tokens=8)
    truth = [facts(r.caption) for r in records]

    def accuracy(texts: list[str], part: int) -> float:  # part 0: the square's colour, 1: the background's
        return sum(facts(c) is not None and facts(c)[part] == t[part] for c, t in zip(texts, truth)) / len(truth)

    # blind: the same frozen LLM with no image, greedy from the start token
    tok = transformers.AutoTokenizer.from_pretrained(data / "lm")
    lm = transformers.AutoModelForCausalLM.from_pretrained(data / "lm")
    out = lm.generate(**tok([""], return_tensors="pt"), max_new_tokens=8, do_sample=False)[0]
    blind = [tok.decode(out, skip_special_tokens=True)] * len(records)
    ours = (accuracy(captions, 0) + accuracy(captions, 1)) / 2
    chance = 1 / 8
    assert accuracy(captions, 0) >= 2 * chance and accuracy(captions, 1) >= 2 * chance, captions
    assert ours >= (accuracy(blind, 0) + accuracy(blind, 1)) / 2 + 0.2, (captions, blind[0])


def test_stage2_loss_decreases(trained):
    import csv

    _, out = trained
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["lm_loss"]) < 0.5 * float(rows[0]["lm_loss"])


def test_gradients_reach_the_bridge_only(data, tmp_path):
    from vlbridge.models.builder import build_model
    from vlbridge.training.tasks import stage2_data

    cfg = stage2_config(data, **{"run.output_dir": str(tmp_path)})
    model = build_model(cfg.model)
    dataset, collate, module = stage2_data(cfg, model)
    batch = collate([dataset[i] for i in range(4)])
    module(batch).loss.backward()
    for name, p in model.named_parameters():
        if name.startswith(("vision.", "language_model.")):
            assert not p.requires_grad and p.grad is None, name
        elif name.startswith(("qformer.layers", "qformer.query_tokens", "language_projection", "ln_vision")) and (
            "text_ffn" not in name  # the text side is unused in stage 2 without instructions
        ):
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_t5_prefix_split():
    rng = random.Random(0)
    caption = "a large red circle on the left"
    splits = {split_prefix(caption, rng) for _ in range(200)}
    assert len(splits) == 7  # every cut point 0..n-1
    for prefix, target in splits:
        assert target and " ".join(x for x in (prefix, target) if x) == caption
    assert split_prefix("word", rng) == ("", "word")


def test_export_to_transformers_gives_the_same_captions(data, trained, tmp_path):
    model, _ = trained
    model.save(tmp_path / "hf", format="hf")
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    records = read_caption_manifest(data / "val.jsonl")[:6]
    pixels = model.image_processor([r.image for r in records])
    ours = model.caption(pixels, max_new_tokens=8)
    tok = model.tokenizer
    image = tok.convert_tokens_to_ids("<image>")
    ids = torch.tensor([[image] * 2 + tok("").input_ids] * len(records))
    out = hf.generate(pixel_values=pixels, input_ids=ids, max_new_tokens=8, do_sample=False)
    theirs = [t.strip() for t in tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)]
    assert ours == theirs


def test_eval_reports_for_captions_and_vqa(data, trained, tmp_path):
    from vlbridge.config import from_dict
    from vlbridge.eval.run import EvalConfig, evaluate

    _, out = trained
    common = {"model": str(out / "model"), "batch_size": 16, "num_beams": 1, "limit": 12}
    caps = evaluate(
        from_dict(
            EvalConfig,
            {
                **common,
                "task": "caption",
                "data": str(data / "val.jsonl"),
                "max_new_tokens": 8,
                "output": str(tmp_path / "cap.json"),
            },
        )
    )
    assert {"Bleu_4", "CIDEr", "ROUGE_L"} <= caps["metrics"].keys() and caps["metrics"]["CIDEr"] > 0
    assert len(caps["predictions"]) == 12 and (tmp_path / "cap.json").exists()
    colours = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange"]
    for extra in ({}, {"candidates": colours}):  # generated answers, and closed-set ranking
        vqa = evaluate(
            from_dict(
                EvalConfig,
                {
                    **common,
                    **extra,
                    "task": "vqa",
                    "data": str(data / "vqa_val.jsonl"),
                    "output": str(tmp_path / "vqa.json"),
                },
            )
        )
        assert 0 <= vqa["metrics"]["accuracy"] <= 1 and len(vqa["predictions"]) == 12
        assert {"square", "background"} <= vqa["metrics"]["per_type"].keys()
    assert all(p["prediction"] in colours for p in vqa["predictions"])  # ranking picks one of the candidates


def test_instruction_aware_queries_read_the_question(data, tmp_path):
    from vlbridge.inference.tasks import _soft_prompts
    from vlbridge.models.builder import build_model

    pixels = torch.randn(1, 3, 16, 16)
    for instruct in (True, False):
        cfg = stage2_config(data, **{"run.output_dir": str(tmp_path)})
        cfg.model.instruct = instruct
        model = build_model(cfg.model).eval()
        with torch.no_grad():
            a = _soft_prompts(model, pixels, ["what colour is the square"])
            b = _soft_prompts(model, pixels, ["what colour is the background"])
        assert (not torch.allclose(a, b)) == instruct


def test_t5_and_bf16_stage2_runs_learn(data, tmp_path):
    """Prefix-LM stage 2 on a frozen T5, and a decoder LLM frozen in bf16 with bf16 autocast: both train."""
    import csv

    from factory import Sizes, _llm, llm_tokenizer

    tok = llm_tokenizer(kind="t5")
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(**{**_llm("t5", Sizes(), len(tok) + 3)}))
    t5.save_pretrained(tmp_path / "t5")
    tok.save_pretrained(tmp_path / "t5")
    runs = {
        "t5": {"model.language_model": str(tmp_path / "t5")},
        "bf16": {"model.dtype": "bfloat16", "run.precision": "bf16"},
    }
    for name, extra in runs.items():
        cfg = stage2_config(
            data, **{"run.max_steps": 40, "run.output_dir": str(tmp_path / name), "run.log_every": 5, "optim.lr": 2e-3}
        )
        for key, value in extra.items():
            section, field = key.split(".")
            setattr(getattr(cfg, section), field, value)
        summary = train(cfg)
        with open(tmp_path / name / "log.csv") as f:
            losses = [float(r["lm_loss"]) for r in csv.DictReader(f)]
        assert losses[-1] < losses[0], (name, losses)
        model = vlbridge.load(summary["model"])
        assert model.caption(read_caption_manifest(data / "val.jsonl")[0].image, max_new_tokens=4)
