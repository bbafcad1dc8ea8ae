"""Retrieval evaluation and zero-shot classification end to end on a tiny random retrieval checkpoint.

Every score the pipeline produces (grouping, K/V reuse, batching, padding trims, the feature cache or its
recomputation) is checked against a brute-force computation with the model's own ``itc`` / ``itm_logits``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

import vlbridge
from vlbridge.data.datasets import CaptionRecord
from vlbridge.errors import ImageError, InputError
from vlbridge.eval.retrieval import recall_at_k, zero_shot_accuracy
from vlbridge.inference.retrieval import evaluate_retrieval, retrieval_scores, write_report
from vlbridge.inference.tasks import _qformer_tokens, pixel_values
from vlbridge.inference.zero_shot import zero_shot_classify

from factory import Sizes, build_checkpoint

CAPTIONS = [
    ("a red circle", "a photo of a red circle on the left"),
    ("a blue square", "two blue squares"),
    ("a green triangle", "the green triangle is large"),
    ("a yellow star", "a small yellow star at the top"),
    ("a purple cross", "what a purple cross"),
    ("an orange diamond", "the orange diamond in the middle"),
]
COLOURS = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (230, 220, 20), (150, 30, 160), (250, 140, 0)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("retr"), family="retrieval", sizes=Sizes(image_size=32), seed=5)
    return vlbridge.load(path)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    out = []
    for n, (colour, captions) in enumerate(zip(COLOURS, CAPTIONS)):
        noise = (torch.rand(32, 32, 3, generator=g) * 60).to(torch.uint8)
        pixels = (torch.tensor(colour, dtype=torch.uint8) // 2 + noise).numpy()
        path = root / f"img{n}.png"
        Image.fromarray(pixels).save(path)
        out.extend(CaptionRecord(image=path, caption=c, image_id=f"id{n}") for c in captions)
    # Interleave so that grouping by image_id (not record order) is exercised.
    return out[::2] + out[1::2]


def grouped(records):
    paths, owner = [], []
    for r in records:
        if r.image not in paths:
            paths.append(r.image)
        owner.append(paths.index(r.image))
    return paths, [r.caption for r in records], owner


@torch.no_grad()
def brute_force_itm(model, paths, texts):
    """ITM match logit for every (image, text) pair, one full ``itm_logits`` call per image."""
    embeds = model.image_embeds(pixel_values(model, paths))
    ids, mask = _qformer_tokens(model, texts, model.bridge.text_max_length)
    rows = []
    for i in range(len(paths)):
        rows.append(model.itm_logits(embeds[i : i + 1].expand(len(texts), -1, -1), ids, mask)[:, 1])
    return torch.stack(rows).float()


def test_itc_recall_matches_brute_force(model, records):
    result = evaluate_retrieval(model, records, rerank=False, progress=False, batch_size=4)
    paths, texts, owner = grouped(records)
    sim = model.itc(paths, texts)
    assert result["metrics"]["itc"] == recall_at_k(sim, owner)
    assert "itm" not in result["metrics"]
    assert result["counts"] == {"images": 6, "texts": 12, "itm_pairs": 0}
    scores = retrieval_scores(model, records, rerank=False, progress=False, batch_size=4)
    torch.testing.assert_close(scores.itc, sim, atol=1e-5, rtol=1e-5)
    assert scores.text_to_image == owner
    assert scores.images == [str(p) for p in paths]


@pytest.mark.parametrize("cache_bytes", [2**30, 0], ids=["features-kept", "recomputed"])
def test_full_rerank_equals_itm_plus_itc(model, records, cache_bytes):
    paths, texts, owner = grouped(records)
    scores = retrieval_scores(model, records, k=50, batch_size=5, progress=False, max_cache_bytes=cache_bytes)
    expected = brute_force_itm(model, paths, texts) + model.itc(paths, texts)
    torch.testing.assert_close(scores.i2t, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores.t2i, expected.T, atol=1e-4, rtol=1e-4)
    assert scores.itm_pairs == 6 * 12  # every pair scored exactly once
    assert scores.image_cache == ("features" if cache_bytes else "recompute")


def test_shortlist_rerank_scores(model, records):
    paths, texts, owner = grouped(records)
    k = 2
    scores = retrieval_scores(model, records, k=k, batch_size=3, progress=False)
    full = brute_force_itm(model, paths, texts) + model.itc(paths, texts)
    top_texts = scores.itc.topk(k, dim=1).indices
    for i in range(len(paths)):
        finite = torch.isfinite(scores.i2t[i]).nonzero().flatten()
        assert sorted(finite.tolist()) == sorted(top_texts[i].tolist())
        torch.testing.assert_close(scores.i2t[i, finite], full[i, finite], atol=1e-4, rtol=1e-4)
    assert (torch.isfinite(scores.t2i).sum(dim=1) == k).all()


def test_each_image_projected_once_per_pass(model, records, monkeypatch):
    """Cross-attention K/V: once per image for ITC and once per image for the whole ITM re-ranking."""
    projected = []
    original = model.qformer.image_kv
    monkeypatch.setattr(model.qformer, "image_kv", lambda embeds: projected.append(len(embeds)) or original(embeds))
    retrieval_scores(model, records, k=50, batch_size=4, progress=False)
    assert sum(projected) == 2 * 6


def test_report_is_well_formed_and_json(model, records, tmp_path):
    result = evaluate_retrieval(model, records, k=3, batch_size=4, progress=False, n_examples=2)
    paths, texts, owner = grouped(records)
    for name in ("itc", "itm"):
        metrics = result["metrics"][name]
        assert set(metrics) == {f"{d}_r{k}" for d in ("txt", "img") for k in (1, 5, 10)} | {
            "txt_r_mean",
            "img_r_mean",
            "r_mean",
        }
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    scores = retrieval_scores(model, records, k=3, batch_size=4, progress=False)
    assert result["metrics"]["itm"] == recall_at_k(scores.i2t, owner, sim_t2i=scores.t2i)
    assert result["k"] == 3 and result["rerank"] is True
    assert result["counts"]["images"] == 6 and result["counts"]["texts"] == 12
    assert 0 < result["counts"]["itm_pairs"] <= 6 * 12
    assert {"images", "texts", "similarity", "rerank", "total"} <= set(result["timings"])
    ex = result["examples"]
    assert len(ex["image_to_text"]) == 2 and len(ex["text_to_image"]) == 2
    first = ex["image_to_text"][0]
    assert first["image"] == str(paths[0]) and len(first["top"]) == 3  # k=3: only shortlisted (finite) entries
    assert first["captions"] == [t for t, o in zip(texts, owner) if o == 0]
    assert all(e["correct"] == (owner[texts.index(e["text"])] == 0) for e in first["top"])
    json.loads(json.dumps(result, allow_nan=False))
    out = write_report(result, tmp_path / "sub" / "report.json")
    assert json.loads(out.read_text()) == result
    assert [p.name for p in out.parent.iterdir()] == ["report.json"]  # no temporary file left behind


def test_zero_shot_matches_brute_force(model, records):
    paths, _, _ = grouped(records)
    classes = ["red circle", "blue square", "green triangle"]
    labels = [0, 1, 2, 0, 1, 2]
    result = zero_shot_classify(model, paths, classes, labels, batch_size=4)
    sim = model.itc(paths, [f"a photo of a {c}." for c in classes])
    assert result["predicted"] == sim.argmax(dim=1).tolist()
    assert result["accuracy"] == zero_shot_accuracy(sim, labels)
    assert result["count"] == 6 and len(result["predictions"]) == 6
    assert [t["index"] for t in result["predictions"][0]["top"]] == sim[0].argsort(descending=True).tolist()
    json.dumps(result, allow_nan=False)

    reranked = zero_shot_classify(model, paths, classes, rerank=True, k=3, batch_size=4)
    prompts = [f"a photo of a {c}." for c in classes]
    full = brute_force_itm(model, paths, prompts) + sim
    assert reranked["predicted"] == full.argmax(dim=1).tolist()
    assert "accuracy" not in reranked
    top = reranked["predictions"][2]["top"]
    assert [t["score"] for t in top] == pytest.approx(full[2].sort(descending=True).values.tolist(), abs=1e-4)


def test_zero_shot_shortlist_leaves_others_out(model, records):
    paths, _, _ = grouped(records)
    result = zero_shot_classify(model, paths[:2], ["red", "blue", "green", "yellow"], rerank=True, k=2)
    assert all(len(p["top"]) == 2 for p in result["predictions"])
    assert all(math.isfinite(t["score"]) for p in result["predictions"] for t in p["top"])


def test_bad_inputs(model, records, tmp_path):
    with pytest.raises(InputError, match="no records"):
        evaluate_retrieval(model, [], progress=False)
    with pytest.raises(InputError, match="empty or non-string caption"):
        evaluate_retrieval(model, [CaptionRecord(records[0].image, "  ", "x")], progress=False)
    clash = [records[0], CaptionRecord(records[1].image, "a caption", records[0].image_id)]
    with pytest.raises(InputError, match="two different images"):
        evaluate_retrieval(model, clash, progress=False)
    with pytest.raises(InputError, match="not a CaptionRecord"):
        evaluate_retrieval(model, [("img.png", "a caption")], progress=False)
    with pytest.raises(InputError, match="k must be"):
        evaluate_retrieval(model, records, k=0, progress=False)
    with pytest.raises(InputError, match="batch_size"):
        evaluate_retrieval(model, records, batch_size=0, progress=False)
    with pytest.raises(InputError, match="ks must be"):
        evaluate_retrieval(model, records, ks=(), progress=False)
    with pytest.raises(ImageError):
        evaluate_retrieval(model, [CaptionRecord(tmp_path / "missing.png", "a caption", "m")], progress=False)

    paths = [records[0].image, records[1].image]
    with pytest.raises(InputError, match="no images"):
        zero_shot_classify(model, [], ["a", "b"])
    with pytest.raises(InputError, match="no class_names"):
        zero_shot_classify(model, paths, [])
    with pytest.raises(InputError, match="duplicate class names"):
        zero_shot_classify(model, paths, ["cat", "cat"])
    with pytest.raises(InputError, match="2 images but 3 labels"):
        zero_shot_classify(model, paths, ["cat", "dog"], [0, 1, 1])
    with pytest.raises(InputError, match="labels must lie"):
        zero_shot_classify(model, paths, ["cat", "dog"], [0, 2])
    with pytest.raises(InputError, match="template"):
        zero_shot_classify(model, paths, ["cat", "dog"], template="a photo")
    with pytest.raises(InputError, match="JSON"):
        write_report({"x": float("nan")}, tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


def test_model_mode_is_restored(model, records):
    model.train()
    try:
        evaluate_retrieval(model, records[:4], k=2, progress=False)
        assert model.training
    finally:
        model.eval()


def test_itm_batch_size_does_not_change_scores(model, records):
    small = retrieval_scores(model, records, k=4, progress=False, itm_batch_size=3)
    large = retrieval_scores(model, records, k=4, progress=False, itm_batch_size=256)
    assert small.itm_pairs == large.itm_pairs
    torch.testing.assert_close(small.i2t, large.i2t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small.t2i, large.t2i, atol=1e-5, rtol=1e-5)


def test_default_k_follows_the_gallery(model, records):
    from vlbridge.inference.retrieval import default_k

    assert default_k(6) == 6 and default_k(100) == 16 and default_k(1000) == 50 and default_k(25000) == 128
    scores = retrieval_scores(model, records, progress=False)  # k=None: every candidate of this small set
    assert scores.k == {"i2t": 12, "t2i": 6}
    assert bool(torch.isfinite(scores.i2t).all())


def test_repeated_captions_tie_exactly_and_warn(model, records):
    shared = [CaptionRecord(image=r.image, caption="a shape", image_id=r.image_id) for r in records[:3]]
    with pytest.warns(UserWarning, match="belong to several images"):
        result = evaluate_retrieval(model, records + shared, k=3, progress=False)
    assert result["repeated_captions"]["texts"] == 1
    assert result["repeated_captions"]["examples"] == ["a shape"]
    scores = retrieval_scores(model, records + shared, rerank=False, progress=False)
    columns = scores.itc[:, len(records) :]
    assert torch.equal(columns, columns[:, :1].expand_as(columns))  # one encoding of the text: exact ties
