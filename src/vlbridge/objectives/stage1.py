"""Stage-1 representation learning: ITC + ITM + ITG on one batch, summed (equal weights unless told).

Work is shared between the three objectives wherever the maths allows:
- the image's cross-attention keys/values are projected once and indexed for the ITM pairs;
- ITG reuses the queries' self-attention keys/values from the ITC image pass;
- hard negatives are drawn in one vectorised call;
- optionally, trailing columns that are padding in every caption of the global batch are dropped first.

Across ranks, ITC is computed over the whole global batch on every rank with gradient into the local
slice (scaled so DDP's gradient averaging reproduces the single-process gradient exactly); ITM negatives
come from the global batch (their image features gathered with gradient), drawn with a generator seeded
identically on every rank.

Shapes: B local batch, G global batch, N image tokens, Dv image width, Q queries, E ITC width, T text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlbridge.objectives.itc import itc_loss, itc_similarity
from vlbridge.objectives.itg import itg_loss
from vlbridge.objectives.itm import itm_loss, negative_is_valid, sample_negatives
from vlbridge.objectives.positives import positive_pairs, text_codes
from vlbridge.training import distributed as D

TEMPERATURE_RANGE = (0.001, 0.5)


@dataclass
class Stage1Output:
    loss: Tensor  # what to backpropagate (ITC scaled by world size, see module docstring)
    itc_loss: Tensor
    itm_loss: Tensor
    itg_loss: Tensor
    itm_accuracy: Tensor  # over the pairs in the loss; 2/3 is the trivial "always no match" with 1:2 positives
    itm_accuracy_pos: Tensor  # on the positive pairs alone
    itm_accuracy_neg: Tensor  # on the negative pairs alone

    def logs(self) -> dict[str, float]:
        return {
            "loss": float(self.itc_loss + self.itm_loss + self.itg_loss),
            "itc_loss": float(self.itc_loss),
            "itm_loss": float(self.itm_loss),
            "itg_loss": float(self.itg_loss),
            "itm_acc": float(self.itm_accuracy),
            "itm_acc_pos": float(self.itm_accuracy_pos),
            "itm_acc_neg": float(self.itm_accuracy_neg),
        }


def stage1_losses(
    model: nn.Module,
    vision_feats: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    ids: Tensor,
    *,
    labels: Tensor | None = None,
    text_positives: bool = True,
    dec_token_id: int,
    generator: torch.Generator | None = None,
    label_smoothing: float = 0.1,
    trim_padding: bool = False,
    loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> Stage1Output:
    """The three stage-1 losses.

    Args:
        model: the Q-Former bridge with its stage-1 heads (`embed_dim` set, text input enabled), or a model
            with one (its attributes read through to the bridge).
        vision_feats: frozen encoder output [B, N, Dv] (before `ln_vision`), computed or read from a cache.
        input_ids: Q-Former text tokens [B, T] starting with [CLS], padded to the same T on every rank.
        attention_mask: [B, T].
        ids: [B] image-id codes (`training.distributed.id_codes`): equal codes are the same image.
        labels: optional [B] codes of a user-given label (same code = a true match, e.g. a class); pass
            `id_codes` of the label strings (a missing label is unique to its sample).
        text_positives: identical texts on different images are true matches too (`objectives.positives`): ITC
            shares their target mass and ITM never draws them as negatives. False reproduces BLIP-2/LAVIS,
            which decide by image id alone.
        dec_token_id: id of `[DEC]`, which replaces [CLS] for ITG.
        generator: draws the ITM negatives; seed it identically on every rank.
        label_smoothing: for ITC and ITG (0.1 in the paper).
        trim_padding: first drop the trailing text columns that are padding in every caption of the global
            batch (`trim_text_padding`). The losses and gradients are the same, up to float rounding (the
            matmul shapes change, so a run is not bit-identical to an untrimmed one); the compute of padding
            to `max_length` is saved.
        loss_weights: of (ITC, ITM, ITG) in the loss to backpropagate (the paper's 1, 1, 1).
    """
    qformer = model.qformer
    B = input_ids.shape[0]
    with torch.no_grad():
        model.temp.clamp_(*TEMPERATURE_RANGE)
    if trim_padding:
        input_ids, attention_mask = trim_text_padding(input_ids, attention_mask)

    image_embeds = model.ln_vision(vision_feats.to(model.ln_vision.weight.dtype))  # [B, N, Dv]
    image_kv = qformer.image_kv(image_embeds)  # per layer ([B, nh, N, hd], [B, nh, N, hd]) or None

    # ITC: a query-only pass and a text-only pass (the unimodal regime).
    image_pass = qformer(image_kv=image_kv, return_query_kv=True)
    image_feats = F.normalize(model.vision_proj(image_pass.query_output), dim=-1)  # [B, Q, E]
    text_out = qformer(input_ids=input_ids, attention_mask=attention_mask, use_queries=False)
    text_feats = F.normalize(model.text_proj(text_out.hidden_states[:, 0]), dim=-1)  # [B, E]

    world = D.world_size()
    all_input_ids = D.gather_no_grad(input_ids)  # [G, T]
    all_mask = D.gather_no_grad(attention_mask)
    positives = positive_pairs(  # [G, G] true matches: same image, identical text, same label
        D.gather_no_grad(ids),
        text_codes(all_input_ids, all_mask) if text_positives else None,
        None if labels is None else D.gather_no_grad(labels),
    )
    sim = itc_similarity(D.gather_with_local_grad(image_feats), D.gather_with_local_grad(text_feats))  # [G, G]
    # The loss is scaled by the world size below for the features' sake; the temperature is shared by every
    # rank's copy of the loss, so its gradient is scaled back down.
    temperature = _scale_grad(model.temp, 1 / world)
    loss_itc = itc_loss(sim, temperature, positives, label_smoothing=label_smoothing)

    # ITM: positives, (negative image, text), (image, negative text) in one bidirectional pass of 3B pairs.
    neg_image, neg_text = sample_negatives(
        sim.detach(), positives, temperature=temperature.detach(), generator=generator
    )
    valid_image, valid_text = negative_is_valid(positives, neg_image, neg_text)  # [G]: a true non-match was found
    start = D.rank() * B
    local = slice(start, start + B)
    neg_image, neg_text = neg_image[local], neg_text[local]  # this rank's texts / images
    if world == 1:
        neg_kv = [None if kv is None else (kv[0][neg_image], kv[1][neg_image]) for kv in image_kv]
    else:  # negatives may live on other ranks: gather their features (with gradient) and project those
        neg_kv = qformer.image_kv(D.gather_with_grad(image_embeds)[neg_image])
    pair_kv = [
        None if kv is None else (torch.cat([kv[0], nkv[0], kv[0]]), torch.cat([kv[1], nkv[1], kv[1]]))
        for kv, nkv in zip(image_kv, neg_kv)
    ]
    pair_ids = torch.cat([input_ids, input_ids, all_input_ids[neg_text]])  # [3B, T]
    pair_mask = torch.cat([attention_mask, attention_mask, all_mask[neg_text]])
    pairs = qformer(image_kv=pair_kv, input_ids=pair_ids, attention_mask=pair_mask, regime="bidirectional")
    itm_logits = model.itm_head(pairs.query_output).mean(dim=1)  # [3B, 2]
    weights = torch.cat([valid_image.new_ones(B), valid_image[local], valid_text[local]]).float()  # [3B]
    loss_itm = itm_loss(itm_logits, weights)
    with torch.no_grad():
        targets = torch.cat([torch.ones(B), torch.zeros(2 * B)]).to(itm_logits.device)
        right = (itm_logits.argmax(-1).float() == targets).float() * weights
        itm_acc = right.sum() / weights.sum()
        itm_acc_pos = right[:B].mean()
        itm_acc_neg = right[B:].sum() / weights[B:].sum().clamp(min=1)

    # ITG: [DEC] + text, causal over the cached query keys/values.
    dec_ids = input_ids.clone()
    dec_ids[:, 0] = dec_token_id
    decoded = qformer(
        input_ids=dec_ids,
        attention_mask=attention_mask,
        use_queries=False,
        query_kv=image_pass.query_kv,
        regime="causal",
    )
    targets = attention_mask[:, 1:].sum().float()  # tokens predicted on this rank
    per_rank = D.all_reduce_mean(targets)  # global count / world: every rank's loss is on the same scale
    loss_itg = itg_loss(
        model.itg_head(decoded.hidden_states),
        dec_ids,
        attention_mask,
        label_smoothing=label_smoothing,
        num_tokens=per_rank,
    )

    # Every rank computed the whole-batch ITC loss but back-propagates only its slice: scale by the world size
    # so that DDP's averaging sums the slices.
    w_itc, w_itm, w_itg = loss_weights
    total = w_itc * world * loss_itc + w_itm * loss_itm + w_itg * loss_itg
    return Stage1Output(
        total, loss_itc.detach(), loss_itm.detach(), loss_itg.detach(), itm_acc, itm_acc_pos, itm_acc_neg
    )


def trim_text_padding(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Give the text the length of the longest caption of the global batch: trim or pad every rank's columns.

    Captions may be padded to a fixed `max_length` (mostly far longer than the longest caption of a batch), or
    per batch to the longest caption of each rank (`training.data.TokenizingCollate`), which differs between
    ranks. Padded keys are masked out and padded positions carry no loss, so removing the columns where every
    rank's every caption is padding, or appending such columns, changes no loss or gradient; trimming removes
    their compute from the text, ITM and ITG passes. Ranks agree on the new length, so gathered text has one
    shape.
    """
    real = attention_mask.bool().any(dim=0).nonzero()  # columns holding a real token in some caption
    used = int(real.max()) + 1 if len(real) else 1
    length = int(D.gather_no_grad(torch.tensor([used], device=attention_mask.device)).max())
    width = input_ids.shape[1]
    if length == width:
        return input_ids, attention_mask
    if length < width:
        return input_ids[:, :length], attention_mask[:, :length]
    extra = length - width  # another rank has a longer caption: append masked padding columns
    return F.pad(input_ids, (0, extra)), F.pad(attention_mask, (0, extra))


def _scale_grad(x: Tensor, scale: float) -> Tensor:
    """Identity forward; the gradient is multiplied by `scale`."""
    return x if scale == 1 else x * scale + x.detach() * (1 - scale)
