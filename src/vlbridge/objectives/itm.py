"""Image-text matching (ITM) with hard negatives mined from the contrastive similarities.

For every text one negative image, for every image one negative text, drawn with probability
proportional to softmax(similarity / temperature) — the ITC logits, as in BLIP-2 — among candidates that are
*not* true matches (`objectives.positives`: a caption of the same image, the identical text on another image
or a shared label is never a negative). All in one vectorised draw. (Without the temperature, cosine
similarities in [-1, 1] give nearly uniform weights: random, easy negatives.)

Shapes: B local batch, G global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlbridge.objectives.positives import as_positive_mask


def sample_negatives(
    sim: Tensor, positives: Tensor, *, temperature: float | Tensor = 1.0, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Hard negatives from a [G, G] image-text similarity (rows images, columns texts).

    Args:
        sim: Similarities; divided by ``temperature`` before the softmax (pass the ITC temperature).
        positives: [G] image id codes (equal ids are never negatives of each other) or a [G, G] mask of true
            matches (`positives.positive_pairs`).
        temperature: Softmax temperature.
        generator: Random generator of the draw.

    Returns:
        (negative image index for each text [G], negative text index for each image [G]). A row with no
        candidate at all (every other sample is a match) falls back to another sample, which is then no true
        negative: check with `negative_is_valid` and leave such pairs out of the loss.
    """
    same = as_positive_mask(positives)  # [G, G] pairs that must not be negatives
    with torch.no_grad():
        logits = sim.float() / float(temperature)
        w_t2i = F.softmax(logits.t(), dim=1).masked_fill(same.t(), 0)  # each text's weights over images
        w_i2t = F.softmax(logits, dim=1).masked_fill(same, 0)  # each image's weights over texts
        G = w_t2i.shape[0]
        fallback = (~torch.eye(G, dtype=torch.bool, device=sim.device)).float() if G > 1 else torch.ones(1, 1)
        for w in (w_t2i, w_i2t):
            empty = w.sum(dim=1) == 0
            if empty.any():
                w[empty] = fallback[empty]
        neg_image = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)
        neg_text = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)
    return neg_image, neg_text


def negative_is_valid(positives: Tensor, neg_image: Tensor, neg_text: Tensor) -> tuple[Tensor, Tensor]:
    """Boolean [G] each: is the drawn negative image of text j (negative text of image i) a true non-match?"""
    same = as_positive_mask(positives)
    rows = torch.arange(same.shape[0], device=same.device)
    return ~same[neg_image, rows], ~same[rows, neg_text]


def itm_loss(logits: Tensor, weights: Tensor | None = None) -> Tensor:
    """Cross-entropy of [3B, 2] logits ordered (positive pairs, negative images, negative texts).

    `weights` [3B] (0 or 1) leaves pairs out, e.g. a "negative" that is a true match; the loss is the mean over
    the pairs kept.
    """
    B = logits.shape[0] // 3
    labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
    if weights is None:
        return F.cross_entropy(logits, labels)
    per_pair = F.cross_entropy(logits, labels, reduction="none")
    return (per_pair * weights).sum() / weights.sum().clamp(min=1)
