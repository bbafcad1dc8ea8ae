"""Dynamic padding: texts padded to the longest caption of the batch give the losses of max_length padding."""

from __future__ import annotations

import pytest
import torch

from stage1_factory import tiny_stage1
from vlbridge.bridges.qformer import qformer_tokenizer
from vlbridge.objectives import stage1 as S
from vlbridge.training.data import TokenizingCollate
from vlbridge.training.distributed import id_codes

from factory import bert_tokenizer

CAPTIONS = ["a red square", "two small blue circles on the left", "a star", "the green triangle", "a cross"]


def samples(n_feats: int = 4, width: int = 20):
    g = torch.Generator().manual_seed(0)
    return [
        {"vision_feats": torch.randn(n_feats, width, generator=g), "text": c, "image_id": f"img{i}"}
        for i, c in enumerate(CAPTIONS)
    ]


def losses(model, batch, dec):
    model.zero_grad(set_to_none=True)
    ids = batch["input_ids"] % 60  # the tiny model's vocabulary; [PAD]=0 stays 0, [CLS] stays one token
    out = S.stage1_losses(
        model, batch["vision_feats"], ids, batch["attention_mask"], id_codes(batch["image_id"]),
        dec_token_id=dec, generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    out.loss.backward()
    return out, [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_collate_pads_to_the_longest_caption_and_matches_max_length_padding():
    tokenizer = qformer_tokenizer(bert_tokenizer())
    model = tiny_stage1(vision_width=20)
    dynamic = TokenizingCollate(tokenizer, 32, "vision_feats")(samples())
    longest = max(len(tokenizer(c).input_ids) for c in CAPTIONS)
    assert dynamic["input_ids"].shape == (5, longest) and longest < 32
    padded = dynamic.copy()
    enc = tokenizer(CAPTIONS, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    padded["input_ids"], padded["attention_mask"] = enc.input_ids, enc.attention_mask
    assert torch.equal(padded["input_ids"][:, :longest], dynamic["input_ids"])
    (a, ga), (b, gb) = losses(model, dynamic, 59), losses(model, padded, 59)
    for name in ("itc_loss", "itm_loss", "itg_loss"):
        assert float(getattr(a, name)) == pytest.approx(float(getattr(b, name)), abs=1e-5)
    assert len(ga) == len(gb) and all(torch.allclose(x, y, atol=1e-5) for x, y in zip(ga, gb))


def test_ranks_agree_on_the_global_longest_caption(monkeypatch):
    ids = torch.tensor([[101, 7, 8, 102], [101, 9, 102, 0]])
    mask = (ids != 0).long()
    # Another rank's longest caption has 6 tokens: this rank pads with masked columns up to 6.
    monkeypatch.setattr(S.D, "gather_no_grad", lambda x: torch.cat([x, torch.tensor([6])]))
    new_ids, new_mask = S.trim_text_padding(ids, mask)
    assert new_ids.shape == (2, 6) and torch.equal(new_ids[:, :4], ids) and int(new_ids[:, 4:].abs().sum()) == 0
    assert torch.equal(new_mask[:, :4], mask) and int(new_mask[:, 4:].sum()) == 0
    # All ranks shorter than this one's padding: trimmed to the global longest (3 here, 4 on this rank).
    monkeypatch.setattr(S.D, "gather_no_grad", lambda x: torch.cat([x, torch.tensor([2])]))
    assert S.trim_text_padding(torch.cat([ids, ids.new_zeros(2, 3)], 1), torch.cat([mask, mask.new_zeros(2, 3)], 1))[
        0
    ].shape == (2, 4)
