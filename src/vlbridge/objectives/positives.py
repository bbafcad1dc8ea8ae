"""Which (image, text) pairs of a batch are true matches.

Contrastive (ITC) targets and ITM negatives are only as good as this decision. Deciding by image id alone is
wrong whenever captions repeat: templated captions, class-name captions and synthetic grammars give many images
the *same* text, and each such pair is a true match that an id-only rule labels negative (ALBEF issue 126) — ITC
then pushes identical texts apart and ITM's "hard negatives" are mostly positives, which leaves the ITM head at
its trivial solution. Here a pair is positive when the two samples share any grouping: the same image id, the
identical text (same token ids), or the same user-given label.

Shapes: G global batch, T text tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor


def text_codes(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """[G, T] tokens -> [G] codes, equal exactly when the texts' tokens are equal (padding ignored)."""
    tokens = input_ids.masked_fill(attention_mask == 0, -1)  # [G, T]; -1 never collides with a real token id
    return torch.unique(tokens, dim=0, return_inverse=True)[1]


def positive_pairs(*codes: Tensor | None) -> Tensor:
    """[G, G] boolean: True where samples i and j share a code in any of the given [G] code vectors.

    `None` entries are skipped; the diagonal is always True.
    """
    given = [c for c in codes if c is not None]
    if not given:
        raise ValueError("positive_pairs needs at least one code vector")
    same = given[0][:, None] == given[0][None, :]
    for c in given[1:]:
        same = same | (c[:, None] == c[None, :])
    return same


def as_positive_mask(positives: Tensor) -> Tensor:
    """Accept [G] id codes (equal codes are positives) or an already-built [G, G] boolean mask."""
    if positives.dim() == 1:
        return positive_pairs(positives)
    if positives.dim() != 2 or positives.shape[0] != positives.shape[1]:
        raise ValueError(f"positives must be [G] codes or a [G, G] mask, got {tuple(positives.shape)}")
    return positives.bool()
