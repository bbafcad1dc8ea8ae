"""The three stage-1 losses computed the way LAVIS's ``blip2_qformer.py`` computes them, on vlbridge's modules.

This is the *reference* side of ``benchmarks/stage1_step.py``: the same weights (a vlbridge :class:`Blip2`), the
same three losses, but LAVIS's data flow (``Blip2Qformer.forward``, single process):

- image pass: queries only, cross-attention keys/values projected *inside* the Q-Former from ``image_embeds``,
  keeping the queries' self-attention keys/values (``use_cache=True`` -> ``past_key_values``);
- text pass: text only, ``[CLS]`` -> ``text_proj``;
- ITC: ``sim_q2t``/``sim_t2q`` similarity tensors by broadcast ``matmul``, max over queries, divided by the
  temperature, cross-entropy against ``arange(B)`` with label smoothing 0.1;
- ITM: weights ``softmax(sim / temp) + 1e-4`` with the diagonal zeroed, one ``torch.multinomial(w[b], 1).item()``
  per sample in a Python loop (negative image per text, negative text per image), the negative image features
  *re-stacked* with ``torch.stack`` and the 3B pairs passed through the Q-Former with ``image_embeds`` concatenated,
  so the cross-attention keys/values are projected again for all 3B images;
- ITG: ``[DEC]`` replaces ``[CLS]``, labels = ids with padding -> -100, the text runs causally over the query
  ``past_key_values`` of the image pass (LAVIS does reuse them), mean cross-entropy with label smoothing 0.1.

``attention="eager"`` additionally swaps vlbridge's ``scaled_dot_product_attention`` for LAVIS's attention
(``matmul`` -> ``/ sqrt(d)`` -> additive ``-10000`` mask -> softmax -> dropout -> ``matmul``), see
:func:`lavis_attention`. The frozen vision encoder is not part of this function: its features are an input.

``draw_negatives`` replaces the per-sample loop by a given sampler, so that both implementations can be fed
identical negatives and their losses and gradients compared exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from vlbridge.bridges import qformer as qformer_module
from vlbridge.models.blip2 import Blip2

NegativeSampler = Callable[[Tensor], tuple[Tensor, Tensor]]  # sim [B, B] (images x texts) -> (neg image, neg text)


@dataclass
class LavisOutput:
    loss: Tensor
    itc_loss: Tensor
    itm_loss: Tensor
    itg_loss: Tensor


def _eager_attention_forward(self: qformer_module.Attention, x: Tensor, kv: qformer_module.KV, mask: Tensor | None):
    """LAVIS's ``BertSelfAttention`` + ``BertSelfOutput`` on the weights of a vlbridge ``Attention``."""
    q = self.split_heads(self.query(x))
    k, v = kv
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:  # LAVIS's "extended attention mask": 0 where allowed, -10000 where not
        scores = scores + (1.0 - mask.to(scores.dtype)) * -10000.0
    probs = F.dropout(scores.softmax(dim=-1), p=self.attention_dropout, training=self.training)
    o = torch.matmul(probs, v).transpose(1, 2).flatten(2)  # [B, S, H]
    return self.norm(self.dropout(self.out(o)) + x)


@contextmanager
def lavis_attention(kind: Literal["sdpa", "eager"]) -> Iterator[None]:
    """Within the block, every vlbridge Q-Former attention runs LAVIS's eager attention (``kind="eager"``)."""
    if kind == "sdpa":
        yield
        return
    original = qformer_module.Attention.forward
    qformer_module.Attention.forward = _eager_attention_forward
    try:
        yield
    finally:
        qformer_module.Attention.forward = original


def lavis_stage1_losses(
    model: Blip2,
    vision_feats: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    dec_token_id: int,
    pad_token_id: int = 0,
    draw_negatives: NegativeSampler | None = None,
    attention: Literal["sdpa", "eager"] = "sdpa",
) -> LavisOutput:
    """ITC + ITM + ITG as LAVIS computes them (single process; unique images in the batch, as LAVIS assumes).

    Args:
        model: a vlbridge stage-1 ``Blip2`` (its Q-Former, ``ln_vision``, heads and temperature are used).
        vision_feats: frozen encoder output [B, N, Dv].
        input_ids: [B, T] starting with [CLS], padded with `pad_token_id`; attention_mask: [B, T].
        dec_token_id: id of [DEC].
        draw_negatives: None for LAVIS's per-sample ``multinomial(...).item()`` loop; otherwise a function of the
            un-scaled [B, B] image-text similarity returning (negative image per text, negative text per image).
        attention: "sdpa" (vlbridge's attention) or "eager" (LAVIS's), see :func:`lavis_attention`.
    """
    with lavis_attention(attention):
        return _losses(model, vision_feats, input_ids, attention_mask, dec_token_id, pad_token_id, draw_negatives)


def _losses(
    model: Blip2,
    vision_feats: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    dec_token_id: int,
    pad_token_id: int,
    draw_negatives: NegativeSampler | None,
) -> LavisOutput:
    qformer = model.qformer
    image_embeds = model.ln_vision(vision_feats.to(model.ln_vision.weight.dtype))  # [B, N, Dv]

    # Image pass: cross-attention K/V computed inside; keep the queries' self-attention K/V (past_key_values).
    query_output = qformer(image_embeds=image_embeds, return_query_kv=True)
    image_feats = F.normalize(model.vision_proj(query_output.query_output), dim=-1)  # [B, Q, E]
    text_output = qformer(input_ids=input_ids, attention_mask=attention_mask, use_queries=False)
    text_feat = F.normalize(model.text_proj(text_output.hidden_states[:, 0]), dim=-1)  # [B, E]

    # ============== Image-text Contrastive ===================
    sim_q2t = torch.matmul(image_feats.unsqueeze(1), text_feat.unsqueeze(-1)).squeeze(-1)  # [B, B, Q]
    sim_i2t_raw, _ = sim_q2t.max(-1)
    sim_i2t = sim_i2t_raw / model.temp
    sim_t2q = torch.matmul(text_feat.unsqueeze(1).unsqueeze(1), image_feats.permute(0, 2, 1)).squeeze(-2)  # [B,B,Q]
    sim_t2i, _ = sim_t2q.max(-1)
    sim_t2i = sim_t2i / model.temp
    bs = input_ids.shape[0]
    targets = torch.arange(bs, device=input_ids.device)
    loss_itc = (
        F.cross_entropy(sim_i2t, targets, label_smoothing=0.1) + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)
    ) / 2

    # ============== Image-text Matching ===================
    if draw_negatives is None:
        with torch.no_grad():
            weights_t2i = F.softmax(sim_t2i, dim=1) + 1e-4
            weights_t2i.fill_diagonal_(0)
            weights_i2t = F.softmax(sim_i2t, dim=1) + 1e-4
            weights_i2t.fill_diagonal_(0)
        neg_images = [torch.multinomial(weights_t2i[b], 1).item() for b in range(bs)]
        neg_texts = [torch.multinomial(weights_i2t[b], 1).item() for b in range(bs)]
    else:
        with torch.no_grad():
            neg_image, neg_text = draw_negatives(sim_i2t_raw.detach())
        neg_images, neg_texts = neg_image.tolist(), neg_text.tolist()
    # select a negative image for each text (re-stacked), a negative text for each image
    image_embeds_neg = torch.stack([image_embeds[i] for i in neg_images], dim=0)
    text_ids_neg = torch.stack([input_ids[i] for i in neg_texts], dim=0)
    text_atts_neg = torch.stack([attention_mask[i] for i in neg_texts], dim=0)

    text_ids_all = torch.cat([input_ids, input_ids, text_ids_neg], dim=0)  # pos, pos, neg
    text_atts_all = torch.cat([attention_mask, attention_mask, text_atts_neg], dim=0)
    image_embeds_all = torch.cat([image_embeds, image_embeds_neg, image_embeds], dim=0)  # pos, neg, pos
    output_itm = qformer(
        image_embeds=image_embeds_all, input_ids=text_ids_all, attention_mask=text_atts_all, regime="bidirectional"
    )
    logits = model.itm_head(output_itm.query_output).mean(dim=1)  # [3B, 2]
    itm_labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)]).to(logits.device)
    loss_itm = F.cross_entropy(logits, itm_labels)

    # ================= Image Captioning ========================
    decoder_input_ids = input_ids.clone()
    decoder_input_ids[:, 0] = dec_token_id
    labels = decoder_input_ids.masked_fill(decoder_input_ids == pad_token_id, -100)
    lm_output = qformer(
        input_ids=decoder_input_ids,
        attention_mask=attention_mask,
        use_queries=False,
        query_kv=query_output.query_kv,
        regime="causal",
    )
    prediction_scores = model.itg_head(lm_output.hidden_states)  # [B, T, V]
    shifted = prediction_scores[:, :-1, :].contiguous()
    loss_lm = F.cross_entropy(
        shifted.view(-1, shifted.shape[-1]), labels[:, 1:].contiguous().view(-1), label_smoothing=0.1
    )
    return LavisOutput(loss_itc + loss_itm + loss_lm, loss_itc, loss_itm, loss_lm)
