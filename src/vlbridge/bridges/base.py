"""The bridge contract and its registry: how a frozen image encoder's tokens reach a frozen language model.

A bridge reads the vision encoder's tokens `[B, N, Dv]` (and, if it is instruction-aware, the instruction's
token ids in its own vocabulary) and returns what the language model consumes:

- a **prefix** `[B, Q, D]` of soft tokens, spliced into the LM's input embeddings (BLIP-2's Q-Former, LLaVA's
  projector, MiniGPT-4's frozen Q-Former + linear layer, a perceiver used as a resampler), or
- **media** `[B, M, Dm]` for cross-attention layers inside the LM (Flamingo), with `prefix` None.

Everything downstream (generation, scoring, chat, the LM loss, interop) depends on this contract only. A bridge
registers under a `kind` with its config dataclass; `build_bridge` turns a config dict (`{"kind": ..., ...}`)
into a module, the way LLaVA's `build_vision_projector` turns a string into a projector.

Shapes: B batch, N image tokens, Dv image width, Q prefix tokens, D LM width, T instruction tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from torch import Tensor, nn

from vlbridge.errors import ConfigError


@dataclass
class BridgeOutput:
    """What a bridge hands the language model: a soft prefix, media for cross-attention, or both."""

    prefix: Tensor | None = None  # [B, Q, D] in the LM's embedding dtype
    media: Tensor | None = None  # [B, M, Dm]


class Bridge(nn.Module):
    """Base of every bridge. Subclasses set `kind`, take `config=`, `vision_width=`, `lm_width=` keywords and
    implement `forward` and `num_output_tokens`. `lm_width` is None for a model without a language model
    (a stage-1 / retrieval checkpoint): such a bridge has no projection into an LM.
    """

    kind: ClassVar[str] = ""
    instruction_aware: bool = False  # the bridge reads the instruction (InstructBLIP); set per instance
    has_retrieval: bool = False  # it has the `RetrievalHeads` (ITC/ITM): itm, itc, embeddings, search
    instruction_max_length: int = 512

    def forward(
        self, image_tokens: Tensor, *, instruction_ids: Tensor | None = None, instruction_mask: Tensor | None = None
    ) -> BridgeOutput:
        raise NotImplementedError

    def num_output_tokens(self, num_image_tokens: int) -> int:
        """How many prefix tokens the LM reads per image when the encoder gives `num_image_tokens`."""
        raise NotImplementedError

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute activations in the backward pass instead of keeping them, where the bridge supports it."""

    def normalize(self, image_tokens: Tensor) -> Tensor:
        """The bridge's own normalisation of the frozen tokens, where it has one (BLIP-2's `ln_vision`)."""
        return image_tokens


class RetrievalHeads(Protocol):
    """What a bridge with image-text matching heads offers (BLIP-2's ITC and ITM); retrieval, `itm`, `itc`,
    the index and validation use only this. The per-image `state` is computed once and reused by every pass."""

    text_max_length: int

    def image_state(self, image_tokens: Tensor) -> Any: ...

    def image_embeddings(self, state: Any) -> Tensor: ...  # [B, Q, E], L2-normalised

    def text_embeddings(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor: ...  # [B, E]

    def match_logits(self, state: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor: ...  # [B, 2]

    def select_state(self, state: Any, rows: Tensor) -> Any: ...


@dataclass(frozen=True)
class BridgeEntry:
    config_class: type
    module_class: type[Bridge]


BRIDGES: dict[str, BridgeEntry] = {}


def register_bridge(kind: str, config_class: type) -> Callable[[type[Bridge]], type[Bridge]]:
    """Class decorator: make a bridge buildable from `{"kind": kind, **fields of config_class}`."""

    def add(cls: type[Bridge]) -> type[Bridge]:
        if kind in BRIDGES and BRIDGES[kind].module_class is not cls:
            raise ValueError(f"bridge kind {kind!r} is registered twice")
        cls.kind = kind
        BRIDGES[kind] = BridgeEntry(config_class, cls)
        return cls

    return add


def bridge_kinds() -> list[str]:
    _import_builtin()
    return sorted(BRIDGES)


def bridge_config(spec: dict[str, Any]) -> tuple[str, Any]:
    """`{"kind": ..., **fields}` -> (kind, config dataclass); unknown kinds and fields are clear errors."""
    _import_builtin()
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in BRIDGES:
        raise ConfigError(f"unknown bridge kind {kind!r}; known: {', '.join(sorted(BRIDGES))}")
    cls = BRIDGES[kind].config_class
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(spec) - names)
    if unknown:
        raise ConfigError(
            f"unknown field(s) for bridge {kind!r}: {', '.join(unknown)}; known: {', '.join(sorted(names))}"
        )
    try:
        return kind, cls.from_dict(spec) if hasattr(cls, "from_dict") else cls(**spec)
    except TypeError as exc:
        raise ConfigError(f"bridge {kind!r}: {exc}") from exc


def bridge_spec(kind: str, config: Any) -> dict[str, Any]:
    """The inverse of `bridge_config`: a JSON/YAML-ready dict."""
    return {"kind": kind, **dataclasses.asdict(config)}


def build_bridge(spec: dict[str, Any], *, vision_width: int, lm_width: int | None) -> Bridge:
    """A bridge module from its spec dict, for an encoder of width `vision_width` and an LM of `lm_width`."""
    kind, config = bridge_config(spec)
    return BRIDGES[kind].module_class(config=config, vision_width=vision_width, lm_width=lm_width)


def _import_builtin() -> None:
    """The built-in bridges register themselves on import."""
    from vlbridge.bridges import projector, qformer_bridge  # noqa: F401
