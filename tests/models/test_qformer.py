"""The Q-Former: BERT initialisation reproduces BertModel, the three attention regimes, cached query K/V."""

from __future__ import annotations

import pytest
import torch
import transformers

from vlbridge.bridges.qformer import QFormer, QFormerConfig, qformer_from_bert, qformer_tokenizer

from factory import minilm_path


@pytest.fixture(scope="module")
def bert():
    return transformers.BertModel.from_pretrained(minilm_path()).eval()


def test_text_side_from_real_bert_reproduces_bert(bert):
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
    qf = qformer_from_bert(bert, num_query_tokens=8, encoder_hidden_size=40).eval()
    enc = tok(["a dog runs on the beach", "two red circles"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = bert(**enc).last_hidden_state
        got = qf(input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_queries=False).hidden_states
    real = enc.attention_mask.bool()
    assert (got[real] - ref[real]).abs().max() < 1e-5
    # the query FFN starts as a copy of the text FFN; cross-attention is new
    layer = qf.layers[0]
    assert torch.equal(layer.query_ffn.fc1.weight, layer.text_ffn.fc1.weight)
    assert layer.crossattention.key.weight.shape == (bert.config.hidden_size, 40)
    assert qf.config.vocab_size == bert.config.vocab_size + 1


def test_dec_token_is_added():
    tok = qformer_tokenizer(transformers.AutoTokenizer.from_pretrained(minilm_path()))
    assert tok.bos_token == "[DEC]" and tok.convert_tokens_to_ids("[DEC]") == 30522


def small(**kw) -> QFormer:
    cfg = dict(
        hidden_size=24,
        num_layers=3,
        num_heads=3,
        intermediate_size=40,
        num_query_tokens=4,
        cross_attention_frequency=2,
        encoder_hidden_size=20,
        vocab_size=50,
        dropout=0.0,
        attention_dropout=0.0,
    )
    cfg.update(kw)
    torch.manual_seed(0)
    return QFormer(config=QFormerConfig(**cfg)).eval()


def inputs(seed=0, B=2, T=6, N=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[-1, -2:] = 0
    return torch.randn(B, N, 20, generator=g), ids, mask


def test_unimodal_text_does_not_change_queries():
    qf = small()
    image, ids, mask = inputs()
    q1 = qf(image_embeds=image).query_output
    # the ITC image pass has no text at all; and text passes never see the image
    t1 = qf(input_ids=ids, attention_mask=mask, use_queries=False).hidden_states
    t2 = qf(input_ids=ids, attention_mask=mask, use_queries=False).hidden_states
    assert torch.equal(t1, t2)
    with pytest.raises(ValueError, match="separate passes"):
        qf(image_embeds=image, input_ids=ids, attention_mask=mask, regime="unimodal")
    assert q1.shape == (2, 4, 24)


def test_bidirectional_text_changes_queries():
    qf = small()
    image, ids, mask = inputs()
    a = qf(image_embeds=image, input_ids=ids, attention_mask=mask, regime="bidirectional").query_output
    ids2 = ids.clone()
    ids2[:, 0] = (ids2[:, 0] % 49) + 1
    b = qf(image_embeds=image, input_ids=ids2, attention_mask=mask, regime="bidirectional").query_output
    assert not torch.allclose(a, b)


def test_causal_regime_later_text_does_not_change_earlier():
    qf = small()
    image, ids, mask = inputs()
    a = qf(image_embeds=image, input_ids=ids, attention_mask=mask, regime="causal")
    ids2 = ids.clone()
    ids2[:, 3] = (ids2[:, 3] % 49) + 1
    b = qf(image_embeds=image, input_ids=ids2, attention_mask=mask, regime="causal")
    assert torch.allclose(a.text_output[:, :3], b.text_output[:, :3], atol=1e-6)
    assert not torch.allclose(a.text_output[:, 3:], b.text_output[:, 3:])
    # queries see only queries: identical to a query-only pass
    assert torch.allclose(a.query_output, qf(image_embeds=image).query_output, atol=1e-6)


def test_padding_does_not_leak():
    qf = small()
    image, ids, mask = inputs()
    ids2 = ids.clone()
    ids2[1, -2:] = 7  # change only padded tokens
    for regime in ("bidirectional", "causal"):
        a = qf(image_embeds=image, input_ids=ids, attention_mask=mask, regime=regime).hidden_states
        b = qf(image_embeds=image, input_ids=ids2, attention_mask=mask, regime=regime).hidden_states
        assert torch.allclose(a[1, :-2], b[1, :-2], atol=1e-6)


def test_cached_query_kv_equals_full_causal_pass():
    qf = small()
    image, ids, mask = inputs()
    full = qf(image_embeds=image, input_ids=ids, attention_mask=mask, regime="causal")
    itc = qf(image_embeds=image, return_query_kv=True)
    text = qf(input_ids=ids, attention_mask=mask, use_queries=False, query_kv=itc.query_kv, regime="causal")
    assert text.num_queries == 0
    assert torch.allclose(text.hidden_states, full.text_output, atol=1e-5)


def test_precomputed_image_kv_can_be_indexed():
    qf = small()
    image, ids, mask = inputs()
    kv = qf.image_kv(image)
    order = torch.tensor([1, 0, 1])
    picked = [None if x is None else (x[0][order], x[1][order]) for x in kv]
    a = qf(image_kv=picked, input_ids=ids[order], attention_mask=mask[order]).query_output
    b = qf(image_embeds=image[order], input_ids=ids[order], attention_mask=mask[order]).query_output
    assert torch.allclose(a, b, atol=1e-6)


def test_every_parameter_gets_a_gradient():
    qf = small()
    qf.train()
    image, ids, mask = inputs()
    out = qf(image_embeds=image, input_ids=ids, attention_mask=mask)
    out.hidden_states.square().mean().backward()
    for name, p in qf.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_batch_size_one():
    qf = small()
    image, ids, mask = inputs(B=1)
    assert qf(image_embeds=image, input_ids=ids, attention_mask=mask).hidden_states.shape == (1, 4 + 6, 24)


# ------------------------------------------------------------------------------------ position on the image keys
def test_image_positions_make_cross_attention_see_where_tokens_are():
    """Without positions, permuting the image tokens leaves the query outputs unchanged (a set); with them not."""
    from vlbridge.bridges.qformer import QFormer, QFormerConfig

    feats = torch.randn(2, 17, 20)  # [CLS] + 4x4 patches
    perm = torch.cat([torch.tensor([0]), 1 + torch.randperm(16, generator=torch.Generator().manual_seed(0))])
    for kind in ("none", "sincos", "learned"):
        torch.manual_seed(0)
        cfg = QFormerConfig(
            hidden_size=24, num_layers=2, num_heads=3, intermediate_size=40, num_query_tokens=3,
            encoder_hidden_size=20, vocab_size=50, dropout=0.0, attention_dropout=0.0,
            image_position=kind, num_image_tokens=17,
        )  # fmt: skip
        q = QFormer(config=cfg).eval()
        a = q(image_embeds=feats).query_output
        b = q(image_embeds=feats[:, perm]).query_output
        assert torch.allclose(a, b, atol=1e-5) == (kind == "none"), kind


def test_sincos_positions_are_distinct_per_patch_and_zero_for_cls():
    from vlbridge.bridges.position import grid_side, sincos_2d

    table = sincos_2d(65, 128)
    assert table.shape == (65, 128) and table[0].abs().sum() == 0
    assert torch.cdist(table[1:], table[1:]).add(torch.eye(64)).min() > 0.1
    assert grid_side(64) == (8, 0) and grid_side(50) == (7, 1)
    with pytest.raises(ValueError, match="square grid"):
        sincos_2d(40, 16)


def test_learned_positions_train_and_round_trip_natively(tmp_path):
    import vlbridge
    from stage1_factory import tiny_stage1

    model = tiny_stage1(image_position="learned")
    assert model.qformer.image_position.table.requires_grad
    model.qformer.image_position.table.data.add_(torch.randn(5, 20))
    model.eval()
    pixels = torch.randn(2, 3, 16, 16)
    before = model.itc_image_features(model.image_embeds(pixels))
    from vlbridge.interop.native import save_native

    save_native(model, tmp_path / "m")
    loaded = vlbridge.load(str(tmp_path / "m"))
    assert loaded.qformer.config.image_position == "learned"
    assert torch.allclose(loaded.itc_image_features(loaded.image_embeds(pixels)), before, atol=1e-6)


def test_positions_cannot_be_exported_to_transformers(tmp_path):
    from stage1_factory import tiny_stage1
    from vlbridge.errors import CheckpointError
    from vlbridge.interop.hf import save_hf

    with pytest.raises(CheckpointError, match="format='native'"):
        save_hf(tiny_stage1(image_position="sincos"), tmp_path / "hf")
