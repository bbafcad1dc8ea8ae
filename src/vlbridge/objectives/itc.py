"""Image-text contrastive loss (ITC): each text against every image of the (global) batch, and back.

Similarity of an image and a text = the best-matching query: max over the Q query embeddings of the
cosine similarity with the text embedding, divided by a learnable temperature. Every true match of a row is a
positive and they share the target mass (soft targets): captions of the same image, and — through
`objectives.positives` — identical texts on different images or a shared label, so duplicates in a batch are
not pushed apart. With unique ids this is exactly cross-entropy with label smoothing.

Shapes: B local batch, G global batch (B x world size), Q queries, E embedding width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlbridge.objectives.positives import as_positive_mask


def itc_similarity(image_feats: Tensor, text_feats: Tensor) -> Tensor:
    """[Gi, Q, E] x [Gt, E] -> [Gi, Gt]: max over queries of the cosine similarity."""
    return torch.einsum("iqe,te->iqt", image_feats, text_feats).amax(dim=1)


def soft_targets(positives: Tensor, label_smoothing: float) -> Tensor:
    """[G] id codes or a [G, G] positive mask -> [G, G] targets: positives share the mass, smoothing the rest."""
    mask = as_positive_mask(positives).float()
    mask = mask / mask.sum(dim=1, keepdim=True)
    return (1 - label_smoothing) * mask + label_smoothing / mask.shape[1]


def itc_loss(sim: Tensor, temperature: Tensor, positives: Tensor, *, label_smoothing: float = 0.1) -> Tensor:
    """Symmetric cross-entropy over a [G, G] image-text similarity matrix (rows images, columns texts).

    `positives`: [G] image-id codes, or a symmetric [G, G] mask of true matches (`positives.positive_pairs`).
    """
    logits = sim / temperature
    targets = soft_targets(positives, label_smoothing)
    i2t = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    t2i = -(targets * logits.t().log_softmax(dim=1)).sum(dim=1).mean()
    return (i2t + t2i) / 2
