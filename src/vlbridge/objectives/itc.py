"""Image-text contrastive loss (ITC): each text against every image of the (global) batch, and back.

Similarity of an image and a text = the best-matching query: max over the Q query embeddings of the
cosine similarity with the text embedding, divided by a learnable temperature. Captions that share an
image id are all positives (soft targets), so duplicate images in a batch are not pushed apart; with
unique ids this is exactly cross-entropy with label smoothing.

Shapes: B local batch, G global batch (B x world size), Q queries, E embedding width.
"""

from __future__ import annotations

import torch
from torch import Tensor


def itc_similarity(image_feats: Tensor, text_feats: Tensor) -> Tensor:
    """[Gi, Q, E] x [Gt, E] -> [Gi, Gt]: max over queries of the cosine similarity."""
    return torch.einsum("iqe,te->iqt", image_feats, text_feats).amax(dim=1)


def soft_targets(ids: Tensor, label_smoothing: float) -> Tensor:
    """[G] id codes -> [G, G] target distribution: positives share the mass, smoothing spreads the rest."""
    positives = (ids[:, None] == ids[None, :]).float()
    positives = positives / positives.sum(dim=1, keepdim=True)
    return (1 - label_smoothing) * positives + label_smoothing / ids.numel()


def itc_loss(sim: Tensor, temperature: Tensor, ids: Tensor, *, label_smoothing: float = 0.1) -> Tensor:
    """Symmetric cross-entropy over a [G, G] image-text similarity matrix (rows images, columns texts)."""
    logits = sim / temperature
    targets = soft_targets(ids, label_smoothing)
    i2t = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
    t2i = -(targets * logits.t().log_softmax(dim=1)).sum(dim=1).mean()
    return (i2t + t2i) / 2
