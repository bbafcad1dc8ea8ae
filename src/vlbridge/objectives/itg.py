"""Image-grounded text generation (ITG): the Q-Former's text side as a causal decoder over the queries.

The first token becomes `[DEC]`; each text token sees every query and the text before it. The queries'
keys/values come from the ITC image pass (same regime for queries: they see only queries), so they are
not recomputed.

Shapes: B batch, T text tokens, V vocabulary.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def itg_loss(
    logits: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    label_smoothing: float = 0.1,
    num_tokens: Tensor | float | None = None,
) -> Tensor:
    """Next-token cross-entropy: logits [B, T, V] at position t predict token t + 1; padding is ignored.

    Averaged over `num_tokens` (default: this batch's target tokens); pass the global count divided by the
    world size so that averaging over ranks gives the mean over every token of the global batch.
    """
    labels = input_ids.masked_fill(attention_mask == 0, -100)[:, 1:]  # [B, T-1]
    logits = logits[:, :-1]
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=-100,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    if num_tokens is None:
        num_tokens = (labels != -100).sum()
    return total / num_tokens
