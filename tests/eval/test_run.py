"""`vlbridge eval`: zero-shot from a manifest's label field with a prompt ensemble, VQA candidates per question
type, and the short summary on stdout (the full report in the JSON file)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vlbridge
from vlbridge.config import from_dict
from vlbridge.errors import InputError
from vlbridge.eval.run import EvalConfig, evaluate, field_value, labelled_images, summary_text
from vlbridge.inference.tasks import _qformer_tokens, pixel_values

from factory import Sizes, build_checkpoint

SHAPES = ["circle", "square", "star"]
COLOURS = ["red", "blue"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """6 images; each record carries its class only in a nested field (and some extra fields)."""
    root = tmp_path_factory.mktemp("zs")
    (root / "img").mkdir()
    g = torch.Generator().manual_seed(1)
    lines = []
    for i in range(6):
        pixels = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / "img" / f"{i}.png")
        shape = SHAPES[i % 3]
        for caption in (f"a {shape}", f"one {shape} here"):  # two records per image: one image, one label
            lines.append({"image": f"img/{i}.png", "caption": caption, "meta": {"shape": shape}, "source": "x"})
    path = root / "captions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


@pytest.fixture(scope="module")
def retrieval_model(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("m"), family="retrieval", sizes=Sizes(image_size=32), seed=2)


def test_labels_come_from_any_field(manifest):
    items = labelled_images(manifest, "meta.shape")
    assert [label for _, label in items] == [SHAPES[i % 3] for i in range(6)]  # one entry per image
    assert field_value({"objects": [{"shape": "star"}]}, "objects.0.shape") == "star"
    assert field_value({"a": 1}, "b.c") is None
    with pytest.raises(InputError, match=r"captions.jsonl:1: no usable 'label'.*keys: caption, image, meta, source"):
        labelled_images(manifest, "label")


@torch.no_grad()
def brute_force_ensemble(model, images, classes, templates):
    """Mean of the normalised prompt embeddings per class, re-normalised; max over queries of the cosine."""
    feats = []
    for c in classes:
        ids, mask = _qformer_tokens(model, [t.format(c) for t in templates], 32)
        feats.append(F.normalize(model.itc_text_features(ids, mask).mean(0), dim=-1))
    text = torch.stack(feats)  # [C, E]
    image = model.itc_image_features(model.image_embeds(pixel_values(model, images)))  # [I, Q, E]
    return torch.einsum("iqe,ce->iqc", image, text).amax(1)  # [I, C]


def test_zero_shot_from_a_label_field_with_a_template_ensemble(manifest, retrieval_model, tmp_path):
    templates = ["a photo of a {}.", "a drawing of a {} shape", "{}"]
    cfg = from_dict(
        EvalConfig,
        {
            "model": str(retrieval_model),
            "task": "zero_shot",
            "data": str(manifest),
            "label_field": "meta.shape",
            "templates": templates,
            "output": str(tmp_path / "zs.json"),
            "progress": False,
        },
    )
    report = evaluate(cfg)
    assert report["class_names"] == sorted(SHAPES) and report["templates"] == templates and report["count"] == 6
    model = vlbridge.load(retrieval_model)
    images = [manifest.parent / "img" / f"{i}.png" for i in range(6)]
    expected = brute_force_ensemble(model, images, sorted(SHAPES), templates)
    assert report["predicted"] == expected.argmax(1).tolist()
    labels = torch.tensor([sorted(SHAPES).index(SHAPES[i % 3]) for i in range(6)])
    assert report["accuracy"]["top1"] == pytest.approx((expected.argmax(1) == labels).float().mean().item())
    # The ensemble is not the first template alone (the averaged embedding differs).
    single = brute_force_ensemble(model, images, sorted(SHAPES), templates[:1])
    assert not torch.allclose(single, expected)
    saved = json.loads((tmp_path / "zs.json").read_text())
    assert saved["predicted"] == report["predicted"] and saved["config"]["label_field"] == "meta.shape"
    text = summary_text(report)
    assert "3 classes, 3 template(s)" in text and "top-1" in text and len(text) < 400


def test_zero_shot_rerank_averages_template_logits(manifest, retrieval_model, tmp_path):
    from vlbridge.inference.zero_shot import zero_shot_classify

    model = vlbridge.load(retrieval_model)
    images = [manifest.parent / "img" / f"{i}.png" for i in range(6)]
    one = zero_shot_classify(model, images, SHAPES, template="a {}", rerank=True, k=3)
    twice = zero_shot_classify(model, images, SHAPES, template=["a {}", "a {}"], rerank=True, k=3)
    assert one["predicted"] == twice["predicted"]
    for a, b in zip(one["predictions"], twice["predictions"]):
        assert [t["score"] for t in a["top"]] == pytest.approx([t["score"] for t in b["top"]], abs=1e-5)


def test_vqa_candidates_per_question_type(tmp_path):
    ckpt = build_checkpoint(tmp_path / "opt", family="opt", sizes=Sizes(image_size=32), seed=3)
    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "img" / "a.png")
    rows = [
        {"image": "img/a.png", "question": "what colour is it", "answers": ["red"], "question_type": "colour"},
        {"image": "img/a.png", "question": "what shape is it", "answers": ["circle"], "question_type": "shape"},
        {"image": "img/a.png", "question": "what colour is the star", "answers": ["blue"], "question_type": "colour"},
    ]
    (tmp_path / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = from_dict(
        EvalConfig,
        {
            "model": str(ckpt),
            "task": "vqa",
            "data": str(tmp_path / "vqa.jsonl"),
            "candidates_per_type": {"colour": COLOURS, "shape": SHAPES},
            "output": str(tmp_path / "vqa_report.json"),
            "progress": False,
        },
    )
    report = evaluate(cfg)
    predictions = [(p["question_type"], p["prediction"]) for p in report["predictions"]]
    assert all(p in (COLOURS if t == "colour" else SHAPES) for t, p in predictions)
    assert set(report["metrics"]["per_type"]) == {"colour", "shape"} and report["answers"] == "ranked"
    cfg.candidates_per_type = {"size": ["small"]}
    with pytest.raises(InputError, match="no question has that question_type"):
        evaluate(cfg)


def test_cli_eval_prints_a_summary_not_the_report(manifest, retrieval_model, tmp_path, capsys):
    from vlbridge.cli import main

    (tmp_path / "eval.yaml").write_text(
        f"model: {retrieval_model}\ndata: {manifest}\noutput: {tmp_path / 'r.json'}\nprogress: false\n"
    )
    assert main(["eval", str(tmp_path / "eval.yaml")]) == 0
    out = capsys.readouterr().out
    assert "ITC+ITM" in out and "full report:" in out and len(out) < 1000
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["examples"] and report["k_used"] == {"i2t": 12, "t2i": 6}
    assert report["repeated_captions"]["texts"] == 6  # "a circle" etc. on two images each
