"""LLaVA's projector: every image token goes through a linear layer or a small GELU MLP into the LM's width.

`linear` is one Linear(Dv -> D) (LLaVA v1); `mlpNx_gelu` is Linear(Dv -> D) followed by N - 1 (GELU, Linear(D -> D))
pairs (v1.5: `mlp2x_gelu`). PyTorch's default initialisation, as LLaVA. The prefix is as long as the encoder's
token sequence (which tokens — CLS kept or dropped, which layer — is the vision encoder's choice).

Shapes: B batch, N image tokens, Dv image width, D LM width.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor, nn

from vlbridge.bridges.base import Bridge, BridgeOutput, register_bridge
from vlbridge.errors import ConfigError

_MLP = re.compile(r"^mlp(\d+)x_gelu$")


@dataclass
class ProjectorConfig:
    projector_type: str = "mlp2x_gelu"  # "linear" | "mlpNx_gelu"
    bias: bool = True  # transformers' `multimodal_projector_bias`

    def __post_init__(self) -> None:
        if self.projector_type != "linear" and not _MLP.match(self.projector_type):
            raise ConfigError(f"unknown projector_type {self.projector_type!r}: use 'linear' or 'mlpNx_gelu' (N >= 1)")

    @property
    def depth(self) -> int:
        """Number of Linear layers."""
        m = _MLP.match(self.projector_type)
        return int(m.group(1)) if m else 1


@register_bridge("projector", ProjectorConfig)
class ProjectorBridge(Bridge):
    def __init__(self, *, config: ProjectorConfig, vision_width: int, lm_width: int | None) -> None:
        super().__init__()
        if lm_width is None:
            raise ConfigError("a projector bridge needs a language model (it has no use without one)")
        if config.depth < 1:
            raise ConfigError("a projector needs at least one layer")
        self.config = config
        layers: list[nn.Module] = [nn.Linear(vision_width, lm_width, bias=config.bias)]
        for _ in range(config.depth - 1):
            layers += [nn.GELU(), nn.Linear(lm_width, lm_width, bias=config.bias)]
        self.layers = nn.Sequential(*layers)

    def forward(
        self, image_tokens: Tensor, *, instruction_ids: Tensor | None = None, instruction_mask: Tensor | None = None
    ) -> BridgeOutput:
        """image tokens [B, N, Dv] -> prefix [B, N, D]."""
        return BridgeOutput(prefix=self.layers(image_tokens.to(self.layers[0].weight.dtype)))

    def num_output_tokens(self, num_image_tokens: int) -> int:
        return num_image_tokens
