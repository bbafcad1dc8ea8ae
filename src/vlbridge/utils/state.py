"""Weight names across releases: checkpoints written before bridges were parts keep BLIP-2's bridge weights
at the top of the state dict (`qformer.*`, `ln_vision.*`, `temp`, ...); they now live under `bridge.`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

V = TypeVar("V")
PARTS = ("vision.", "bridge.", "language_model.")


def legacy_keys(state: Mapping[str, V]) -> dict[str, V]:
    """`state` with every weight outside the model's parts moved under `bridge.`."""
    return {k if k.startswith(PARTS) else f"bridge.{k}": v for k, v in state.items()}
