"""Position for the image tokens a bridge cross-attends to.

Attention is blind to order: a cross-attention layer sees its keys as a *set*. Whatever a frozen encoder did
not write into its tokens about where they came from is lost to the bridge — and a small or convolutional
encoder writes little. For data whose content is a layout (a digit, a shape, "left of"), the class lives in
which token holds what: on real scanned digits a linear probe reads the class at 94% from the flattened tokens
and at 32% from their mean. Qwen-VL's adapter adds 2D absolute positions to the query-key pairs of its
cross-attention for this reason. Here a position table `[N, Dv]` is added to the image tokens on the *key*
path only (values stay the encoder's features, so what is read out is unchanged; where to look can depend on
place).

Kinds: ``"none"`` (BLIP-2 as published), ``"sincos"`` (fixed 2D sine-cosine, MAE style), ``"learned"`` (a
trainable table, initialised to the 2D sine-cosine so it starts informative).

Shapes: N image tokens (a square grid of patches, optionally after one leading [CLS] token), Dv image width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

KINDS = ("none", "sincos", "learned")


def grid_side(num_tokens: int) -> tuple[int, int]:
    """(side, leading) for N tokens: a side x side patch grid after `leading` (0 or 1, a [CLS]) tokens."""
    for leading in (0, 1):
        side = math.isqrt(num_tokens - leading)
        if side > 0 and side * side == num_tokens - leading:
            return side, leading
    raise ValueError(
        f"{num_tokens} image tokens are not a square grid of patches (with or without one leading [CLS] token); "
        "use image_position='none' or 'learned' with this encoder"
    )


def sincos_2d(num_tokens: int, width: int) -> Tensor:
    """[N, Dv] fixed 2D sine-cosine positions: half the channels encode the row, half the column; [CLS] gets 0."""
    side, leading = grid_side(num_tokens)
    quarter = width // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1)))  # [Dv/4]
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")  # [side, side] each

    def encode(coord: Tensor) -> Tensor:
        angles = coord.flatten().double()[:, None] * freqs[None]  # [side*side, Dv/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [side*side, Dv/2]

    table = torch.zeros(num_tokens, width, dtype=torch.float64)
    table[leading:, : 4 * quarter] = torch.cat([encode(rows), encode(cols)], dim=1)  # [side*side, 4*(Dv/4)]
    return table.float()


class ImagePositions(nn.Module):
    """The key-path position table of one bridge (shared by all its cross-attention layers)."""

    def __init__(self, *, kind: str, width: int, num_tokens: int | None = None) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown image_position {kind!r}: choose one of {', '.join(KINDS)}")
        self.kind, self.width = kind, width
        if kind == "learned":
            if not num_tokens:
                raise ValueError("image_position='learned' needs num_image_tokens (the encoder's token count)")
            try:
                init = sincos_2d(num_tokens, width)
            except ValueError:  # not a grid: start from small random positions instead
                init = torch.randn(num_tokens, width) * 0.02
            self.table = nn.Parameter(init)

    def forward(self, num_tokens: int, *, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """[N, Dv] positions to add to the keys' input, or None for ``"none"``."""
        if self.kind == "none":
            return None
        if self.kind == "learned":
            if num_tokens != self.table.shape[0]:
                raise ValueError(
                    f"the learned image positions are for {self.table.shape[0]} tokens, got {num_tokens} "
                    "(an encoder with another image size or patch size)"
                )
            return self.table.to(dtype)
        return sincos_2d(num_tokens, self.width).to(device=device, dtype=dtype)
