"""Each stage-1 loss equals a straightforward reference computation (no K/V reuse, per-sample loops)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stage1_factory import tiny_stage1
from vlbridge.objectives.itc import itc_loss, itc_similarity
from vlbridge.objectives.itm import sample_negatives
from vlbridge.objectives.stage1 import stage1_losses, trim_text_padding
from vlbridge.training.distributed import id_codes

DEC = 59


def batch(B=5, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, 5, 20, generator=g)
    ids = torch.randint(3, 58, (B, T), generator=g)
    ids[:, 0] = 1  # [CLS]
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, -3:] = 0
    mask[B - 1, -1:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return feats, ids, mask


def reference_losses(model, feats, ids, mask, codes, neg_image, neg_text):
    """LAVIS-style: every pass recomputes its cross-attention K/V and its queries; loops per sample."""
    q = model.qformer
    emb = model.ln_vision(feats)
    image_out = q(image_embeds=emb).query_output
    img = F.normalize(model.vision_proj(image_out), dim=-1)
    txt = F.normalize(
        model.text_proj(q(input_ids=ids, attention_mask=mask, use_queries=False).hidden_states[:, 0]), dim=-1
    )
    B = len(ids)
    sim_i2t = torch.stack([torch.stack([(img[i] @ txt[j]).max() for j in range(B)]) for i in range(B)])
    targets = torch.arange(B)
    itc = (
        F.cross_entropy(sim_i2t / model.temp, targets, label_smoothing=0.1)
        + F.cross_entropy(sim_i2t.t() / model.temp, targets, label_smoothing=0.1)
    ) / 2
    logits = []
    for i in range(B):  # positive, negative image for text i, negative text for image i
        for im, tx in ((i, i), (int(neg_image[i]), i), (i, int(neg_text[i]))):
            out = q(image_embeds=emb[im : im + 1], input_ids=ids[tx : tx + 1], attention_mask=mask[tx : tx + 1])
            logits.append(model.itm_head(out.query_output).mean(1))
    logits = torch.cat(logits).view(B, 3, 2).transpose(0, 1).reshape(3 * B, 2)
    labels = torch.tensor([1] * B + [0] * 2 * B)
    itm = F.cross_entropy(logits, labels)
    dec = ids.clone()
    dec[:, 0] = DEC
    full = q(image_embeds=emb, input_ids=dec, attention_mask=mask, regime="causal")
    lm = model.itg_head(full.text_output)
    target = dec.masked_fill(mask == 0, -100)
    itg = F.cross_entropy(lm[:, :-1].reshape(-1, lm.shape[-1]), target[:, 1:].reshape(-1), label_smoothing=0.1)
    return itc, itm, itg


def test_losses_equal_reference():
    model = tiny_stage1()
    feats, ids, mask = batch()
    codes = id_codes([f"img{i}" for i in range(len(ids))])
    out = stage1_losses(model, feats, ids, mask, codes, dec_token_id=DEC, generator=torch.Generator().manual_seed(4))
    # the negatives the objective drew, drawn again from the same generator state
    with torch.no_grad():
        emb = model.ln_vision(feats)
        img = F.normalize(model.vision_proj(model.qformer(image_embeds=emb).query_output), dim=-1)
        t = model.qformer(input_ids=ids, attention_mask=mask, use_queries=False).hidden_states[:, 0]
        sim = itc_similarity(img, F.normalize(model.text_proj(t), dim=-1))
    g = torch.Generator().manual_seed(4)
    neg_image, neg_text = sample_negatives(sim, codes, temperature=model.temp.detach(), generator=g)
    itc, itm, itg = reference_losses(model, feats, ids, mask, codes, neg_image, neg_text)
    assert out.itc_loss == pytest.approx(float(itc), abs=1e-5)
    assert out.itm_loss == pytest.approx(float(itm), abs=1e-5)
    assert out.itg_loss == pytest.approx(float(itg), abs=1e-5)


def test_itc_soft_targets_reduce_to_label_smoothing_with_unique_ids():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(6, 6, generator=g)
    temp = torch.tensor(0.07)
    ids = torch.arange(6)
    ref = (
        F.cross_entropy(sim / temp, ids, label_smoothing=0.1)
        + F.cross_entropy(sim.t() / temp, ids, label_smoothing=0.1)
    ) / 2
    assert float(itc_loss(sim, temp, ids)) == pytest.approx(float(ref), rel=1e-6)
    # two captions of one image: both are positives for that image
    dup = torch.tensor([0, 0, 1, 2, 3, 4])
    assert float(itc_loss(sim, temp, dup)) != pytest.approx(float(ref), abs=1e-4)


def test_negatives_never_share_an_image_id_and_follow_similarity():
    ids = id_codes(["a", "a", "b", "c", "d", "e"])  # string ids; the first two captions share an image
    sim = torch.zeros(6, 6)
    sim[:, 5] = 5.0  # text 5 looks like every image: the hardest negative text for all
    counts = torch.zeros(6)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        neg_image, neg_text = sample_negatives(sim, ids, generator=g)
        assert (ids[neg_image] != ids).all() and (ids[neg_text] != ids).all()
        counts += torch.bincount(neg_text[:5], minlength=6)
    assert counts[5] > 0.8 * counts.sum()  # drawn in proportion to softmax(similarity)


def test_negatives_are_drawn_from_the_itc_logits():
    """Weights are softmax(sim / temperature): cosine similarities alone would be nearly uniform."""
    ids = torch.arange(8)
    sim = torch.full((8, 8), 0.2)
    sim[:, 7] = 0.6  # a hard negative text, only slightly more similar in cosine terms
    sim[7, 7] = 1.0
    hard = {}
    for temperature in (1.0, 0.07):
        g = torch.Generator().manual_seed(0)
        picks = torch.cat([sample_negatives(sim, ids, temperature=temperature, generator=g)[1][:7] for _ in range(200)])
        hard[temperature] = float((picks == 7).float().mean())
    # weight of text 7 among 7 candidates: e^0.4 / (e^0.4 + 6) = 0.20 at T=1, e^(0.4/0.07) / (... + 6) = 0.98
    assert hard[1.0] == pytest.approx(0.20, abs=0.04)
    assert hard[0.07] > 0.95


def test_all_same_id_does_not_crash():
    ids = id_codes(["x"] * 4)
    neg_image, neg_text = sample_negatives(torch.randn(4, 4), ids)
    assert (neg_image != torch.arange(4)).all()


def test_gradients_reach_trainable_parts_and_never_the_frozen_encoder():
    model = tiny_stage1()
    model.train()
    pixels = torch.randn(3, 3, 16, 16)
    feats = model.vision(pixels)
    _, ids, mask = batch(B=3)
    out = stage1_losses(model, feats, ids, mask, id_codes(["1", "2", "3"]), dec_token_id=DEC)
    out.loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("vision."):
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_batch_size_one():
    model = tiny_stage1()
    feats, ids, mask = batch(B=1)
    out = stage1_losses(model, feats, ids, mask, id_codes(["only"]), dec_token_id=DEC)
    assert torch.isfinite(out.loss)


def test_trimming_padding_shared_by_the_whole_batch_changes_no_loss_or_gradient():
    model = tiny_stage1()
    feats, ids, mask = batch()
    codes = id_codes([f"img{i}" for i in range(len(ids))])
    pad = torch.zeros(len(ids), 6, dtype=torch.long)  # max_length padding beyond the longest caption
    ids, mask = torch.cat([ids, pad], 1), torch.cat([mask, pad], 1)
    assert trim_text_padding(ids, mask)[1].shape[1] == ids.shape[1] - 6
    results = []
    for trim in (False, True):
        model.zero_grad(set_to_none=True)
        g = torch.Generator().manual_seed(2)
        out = stage1_losses(model, feats, ids, mask, codes, dec_token_id=DEC, generator=g, trim_padding=trim)
        out.loss.backward()
        results.append((out, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (a, ga), (b, gb) = results
    for name in ("itc_loss", "itm_loss", "itg_loss"):
        assert float(getattr(a, name)) == pytest.approx(float(getattr(b, name)), abs=1e-6)
    assert len(ga) == len(gb) and all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ga, gb))


# ------------------------------------------------------------------------------- true matches beyond the image id
def test_identical_texts_on_different_images_are_itc_positives_and_never_itm_negatives():
    from vlbridge.objectives.positives import positive_pairs, text_codes

    feats, ids, mask = batch(B=6)
    ids[3], mask[3] = ids[1], mask[1]  # image 3 has the same caption as image 1
    codes = id_codes([f"img{i}" for i in range(6)])
    pos = positive_pairs(codes, text_codes(ids, mask))
    assert pos[1, 3] and pos[3, 1] and pos.sum() == 6 + 2
    # a text that is a prefix of another is another text, whatever the padding holds
    ids2, mask2 = ids.clone(), mask.clone()
    ids2[5], mask2[5] = ids[4], mask[4]
    mask2[5, -2:] = 0
    codes2 = text_codes(ids2, mask2)
    assert codes2[5] != codes2[4]
    sim = torch.zeros(6, 6)
    sim[1, 3] = sim[3, 1] = 5.0  # the duplicate looks like the hardest negative
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        neg_image, neg_text = sample_negatives(sim, pos, generator=g)
        assert not pos[neg_image, torch.arange(6)].any() and not pos[torch.arange(6), neg_text].any()
    # by image id alone (LAVIS) the duplicate is drawn almost always
    neg_image, _ = sample_negatives(sim, codes, temperature=0.07, generator=g)
    assert neg_image[1] == 3 and neg_image[3] == 1
    # ITC shares the target mass between the two true matches
    from vlbridge.objectives.itc import soft_targets

    t = soft_targets(pos, 0.0)
    assert t[1, 1] == pytest.approx(0.5) and t[1, 3] == pytest.approx(0.5) and t[0, 0] == 1


def test_text_positives_decide_the_itm_pairs_in_the_objective():
    model = tiny_stage1()
    feats, ids, mask = batch(B=2)
    ids[1], mask[1] = ids[0], mask[0]  # two images, one caption: no true negative exists in this batch
    codes = id_codes(["a", "b"])
    with torch.no_grad():  # an ITM head that says "no match" to everything: right on every kept negative
        model.itm_head.weight.zero_()
        model.itm_head.bias.copy_(torch.tensor([5.0, -5.0]))
    run = lambda **kw: stage1_losses(model, feats, ids, mask, codes, dec_token_id=DEC, **kw)  # noqa: E731
    by_id = run(text_positives=False)  # LAVIS: the other image is drawn as a "negative" and counted
    assert float(by_id.itm_accuracy_neg) == 1.0 and float(by_id.itm_accuracy) == pytest.approx(2 / 3)
    by_text = run(text_positives=True)  # the false negatives are left out: only the positives are scored
    assert float(by_text.itm_accuracy_neg) == 0.0 and float(by_text.itm_accuracy) == 0.0
    assert float(by_text.itm_loss) == pytest.approx(
        float(F.cross_entropy(torch.tensor([[5.0, -5.0]]), torch.tensor([1])))
    )
    # a user label groups samples too: with one label for all there is no negative either
    out = run(text_positives=False, labels=id_codes(["same", "same"]))
    assert torch.isfinite(out.loss) and float(out.itm_accuracy_neg) == 0.0


def test_itm_accuracy_is_logged_on_positives_and_negatives_separately():
    model = tiny_stage1()
    feats, ids, mask = batch(B=4)
    with torch.no_grad():
        model.itm_head.bias.copy_(torch.tensor([5.0, -5.0]))  # the trivial "never a match" head
        model.itm_head.weight.zero_()
    out = stage1_losses(model, feats, ids, mask, id_codes(list("abcd")), dec_token_id=DEC)
    logs = out.logs()
    assert logs["itm_acc_pos"] == 0.0 and logs["itm_acc_neg"] == 1.0
    assert logs["itm_acc"] == pytest.approx(2 / 3)


def test_negatives_that_are_true_matches_are_left_out_of_the_itm_loss():
    from vlbridge.objectives.itm import itm_loss, negative_is_valid

    pos = torch.eye(3, dtype=torch.bool)
    pos[0, 1] = pos[1, 0] = True
    valid_image, valid_text = negative_is_valid(pos, torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1]))
    assert valid_image.tolist() == [False, True, True] and valid_text.tolist() == [True, False, True]
    logits = torch.randn(9, 2)
    w = torch.ones(9)
    w[3] = 0
    keep = torch.tensor([i for i in range(9) if i != 3])
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0])
    assert float(itm_loss(logits, w)) == pytest.approx(float(F.cross_entropy(logits[keep], labels[keep])))


def test_loss_weights_scale_each_term_of_the_backpropagated_sum():
    model = tiny_stage1()
    feats, ids, mask = batch()
    codes = id_codes([f"img{i}" for i in range(len(ids))])

    def run(weights):
        return stage1_losses(
            model, feats, ids, mask, codes, dec_token_id=DEC, generator=torch.Generator().manual_seed(4),
            loss_weights=weights,
        )  # fmt: skip

    equal, weighted = run((1.0, 1.0, 1.0)), run((2.0, 0.0, 0.5))
    assert float(equal.loss) == pytest.approx(float(equal.itc_loss + equal.itm_loss + equal.itg_loss), abs=1e-5)
    assert float(weighted.loss) == pytest.approx(float(2 * weighted.itc_loss + 0.5 * weighted.itg_loss), abs=1e-5)
    model.zero_grad()
    run((0.0, 1.0, 0.0)).loss.backward()  # ITM alone: the text projection (ITC only) gets no gradient
    assert model.text_proj.weight.grad is None or not model.text_proj.weight.grad.any()
    assert model.itm_head.weight.grad.abs().sum() > 0


def test_cross_attention_init_is_fan_in_by_default_and_bert_on_request():
    from vlbridge.bridges.qformer import QFormer, QFormerConfig

    def cross_std(init: str) -> float:
        torch.manual_seed(0)
        q = QFormer(config=QFormerConfig(hidden_size=64, num_layers=1, num_heads=4, intermediate_size=64,
                                         encoder_hidden_size=256, cross_attention_init=init))  # fmt: skip
        return float(q.layers[0].crossattention.key.weight.std())

    assert cross_std("fan_in") == pytest.approx(256**-0.5, rel=0.1)
    assert cross_std("bert") == pytest.approx(0.02, rel=0.1)
    with pytest.raises(ValueError, match="cross_attention_init"):
        QFormerConfig(cross_attention_init="xavier")
