"""Image-text matching (ITM) with hard negatives mined from the contrastive similarities.

For every text one negative image, for every image one negative text, drawn with probability
proportional to softmax(similarity / temperature) — the ITC logits, as in BLIP-2 — among candidates with a
*different* image id (ids may be any string; a caption of the same image is never a negative). All in one
vectorised draw. (Without the temperature, cosine similarities in [-1, 1] give nearly uniform weights: random, easy
negatives.)

Shapes: B local batch, G global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sample_negatives(
    sim: Tensor, ids: Tensor, *, temperature: float | Tensor = 1.0, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Hard negatives from a [G, G] image-text similarity (rows images, columns texts).

    Args:
        sim: Similarities; divided by ``temperature`` before the softmax (pass the ITC temperature).
        ids: Image id codes [G]; equal ids are never negatives of each other.
        temperature: Softmax temperature.
        generator: Random generator of the draw.

    Returns:
        (negative image index for each text [G], negative text index for each image [G]).
    """
    same = ids[:, None] == ids[None, :]  # [G, G] pairs that must not be negatives
    with torch.no_grad():
        logits = sim.float() / float(temperature)
        w_t2i = F.softmax(logits.t(), dim=1).masked_fill(same, 0)  # each text's weights over images
        w_i2t = F.softmax(logits, dim=1).masked_fill(same, 0)  # each image's weights over texts
        # A row without any valid candidate (every sample shares one id) falls back to uniform over the other
        # samples; a batch of one has no other sample and pairs with itself (a wrong but harmless label).
        G = w_t2i.shape[0]
        fallback = (~torch.eye(G, dtype=torch.bool, device=sim.device)).float() if G > 1 else torch.ones(1, 1)
        for w in (w_t2i, w_i2t):
            empty = w.sum(dim=1) == 0
            if empty.any():
                w[empty] = fallback[empty]
        neg_image = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)
        neg_text = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)
    return neg_image, neg_text


def itm_loss(logits: Tensor) -> Tensor:
    """Cross-entropy of [3B, 2] logits ordered (positive pairs, negative images, negative texts)."""
    B = logits.shape[0] // 3
    labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
    return F.cross_entropy(logits, labels)
