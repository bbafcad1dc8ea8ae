"""BLIP-2 as one configuration of the composition: `VisionLanguageModel` with a `qformer` bridge.

`Blip2` is the model class under its published name, and `Blip2Config` the single-model config layout of
earlier releases (Q-Former fields at the top), kept so that code building a BLIP-2 from parts still runs:
`Blip2(config=Blip2Config(qformer=..., vision=..., embed_dim=...), vision=...)`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from vlbridge.bridges.qformer import QFormerConfig
from vlbridge.bridges.qformer_bridge import LMHead
from vlbridge.models.vlm import PromptStyle, VisionLanguageModel, VLMConfig

Blip2 = VisionLanguageModel

__all__ = ["Blip2", "Blip2Config", "LMHead", "PromptStyle"]


@dataclass
class Blip2Config:
    """The BLIP-2 fields; `to_config()` gives the composition's config."""

    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    vision: dict[str, Any] = field(default_factory=dict)
    vision_layer: int = -1
    vision_norm_eps: float = 1e-6
    language: dict[str, Any] | None = None
    embed_dim: int | None = 256
    prompts: PromptStyle = field(default_factory=PromptStyle)
    instruct: bool = False

    def to_config(self) -> VLMConfig:
        bridge = {"kind": "qformer", "qformer": asdict(self.qformer), "vision_norm_eps": self.vision_norm_eps,
                  "embed_dim": self.embed_dim, "instruct": self.instruct}  # fmt: skip
        return VLMConfig(bridge=bridge, vision=self.vision, vision_layer=self.vision_layer, language=self.language,
                         prompts=self.prompts)  # fmt: skip
