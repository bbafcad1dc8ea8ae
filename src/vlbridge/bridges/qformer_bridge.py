"""BLIP-2's bridge: LayerNorm -> Q-Former -> linear projection into the LM, with the stage-1 heads beside it.

The Q-Former's learned queries read the frozen image tokens through cross-attention and come out as Q soft
tokens; `language_projection` maps them to the LM's width (BLIP-2's soft visual prompt). The same module owns
the heads of stage 1 and retrieval — ITC projections and temperature, the ITM head, the ITG (captioning) head —
so the feature maths is written once, here, and used by training, `itm`/`itc`, retrieval and the index.

Variants by config: InstructBLIP (`instruct`: the instruction's tokens join the queries in the Q-Former) and
MiniGPT-4 (`freeze_qformer`: the Q-Former, its LayerNorm and heads are frozen, only the projection trains).

Shapes: B batch, N image tokens, Dv image width, Q queries, H Q-Former width, T text tokens, D LM width,
E ITC embedding width.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlbridge.bridges.base import Bridge, BridgeOutput, register_bridge
from vlbridge.bridges.qformer import KV, QFormer, QFormerConfig


@dataclass
class QFormerBridgeConfig:
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    vision_norm_eps: float = 1e-6  # ln_vision
    embed_dim: int | None = 256  # ITC projection width; None: no stage-1 heads (a generation checkpoint)
    instruct: bool = False  # InstructBLIP: the instruction also goes into the Q-Former
    freeze_qformer: bool = False  # MiniGPT-4: only the projection into the LM trains
    instruction_max_length: int = 512  # InstructBLIP's Q-Former text length limit
    text_max_length: int = 35  # ITM/ITC text length limit (LAVIS max_txt_len)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QFormerBridgeConfig:
        d = dict(d)
        if isinstance(d.get("qformer"), dict):
            d["qformer"] = QFormerConfig(**d["qformer"])
        return cls(**d)


class LMHead(nn.Module):
    """BERT's masked-LM head, used for ITG: transform (dense, GELU, LayerNorm) then the tied word embeddings."""

    def __init__(self, config: QFormerConfig, *, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        H = config.hidden_size
        self.dense = nn.Linear(H, H)
        self.norm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(H, config.vocab_size)
        self.decoder.weight = word_embeddings.weight  # tied, as in BERT
        nn.init.zeros_(self.decoder.bias)
        nn.init.normal_(self.dense.weight, std=0.02)
        nn.init.zeros_(self.dense.bias)

    def forward(self, x: Tensor) -> Tensor:
        """[B, T, H] -> logits [B, T, V]."""
        return self.decoder(self.norm(F.gelu(self.dense(x))))


@register_bridge("qformer", QFormerBridgeConfig)
class QFormerBridge(Bridge):
    """ln_vision + Q-Former (+ projection into the LM) (+ ITC/ITM/ITG heads)."""

    def __init__(self, *, config: QFormerBridgeConfig, vision_width: int, lm_width: int | None) -> None:
        super().__init__()
        self.config = config
        qcfg = config.qformer
        if qcfg.encoder_hidden_size != vision_width:
            qcfg = dataclasses.replace(qcfg, encoder_hidden_size=vision_width)
            config.qformer = qcfg
        self.instruction_aware = config.instruct
        self.ln_vision = nn.LayerNorm(vision_width, eps=config.vision_norm_eps)  # trainable, unlike the encoder
        self.qformer = QFormer(config=qcfg)
        if config.embed_dim is not None:
            self.vision_proj = nn.Linear(qcfg.hidden_size, config.embed_dim)
            self.text_proj = nn.Linear(qcfg.hidden_size, config.embed_dim)
            self.itm_head = nn.Linear(qcfg.hidden_size, 2)
            self.temp = nn.Parameter(torch.tensor(0.07))
            self.itg_head = LMHead(qcfg, word_embeddings=self.qformer.embeddings.word_embeddings)
        if lm_width is not None:
            self.language_projection = nn.Linear(qcfg.hidden_size, lm_width)
        if config.freeze_qformer:
            for name, p in self.named_parameters():
                if not name.startswith("language_projection."):
                    p.requires_grad_(False)

    # --------------------------------------------------------------------------------- the bridge contract
    def forward(
        self, image_tokens: Tensor, *, instruction_ids: Tensor | None = None, instruction_mask: Tensor | None = None
    ) -> BridgeOutput:
        """image tokens [B, N, Dv] (+ instruction [B, T]) -> soft prompt [B, Q, D]."""
        if not hasattr(self, "language_projection"):
            raise ValueError("this model has no language model (a stage-1 / retrieval checkpoint)")
        query = self.query_output(self.normalize(image_tokens), instruction_ids, instruction_mask)  # [B, Q, H]
        return BridgeOutput(prefix=self.language_projection(query))

    def num_output_tokens(self, num_image_tokens: int) -> int:
        return int(self.qformer.query_tokens.shape[1])

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.qformer.gradient_checkpointing = enabled

    @property
    def instruction_max_length(self) -> int:
        return self.config.instruction_max_length

    # --------------------------------------------------------------------------------- features
    def normalize(self, image_tokens: Tensor) -> Tensor:
        """Frozen image tokens [B, N, Dv] -> the LayerNormed tokens the Q-Former reads."""
        return self.ln_vision(image_tokens.to(self.ln_vision.weight.dtype))

    def query_output(
        self, image_embeds: Tensor, qformer_ids: Tensor | None = None, qformer_mask: Tensor | None = None
    ) -> Tensor:
        """Query outputs [B, Q, H] of normalised tokens; with `qformer_ids` [B, T] the instruction joins them."""
        out = self.qformer(
            image_embeds=image_embeds, input_ids=qformer_ids, attention_mask=qformer_mask, regime="bidirectional"
        )
        return out.query_output

    # --------------------------------------------------------------------------------- retrieval heads
    @property
    def has_retrieval(self) -> bool:
        return self.config.embed_dim is not None

    @property
    def text_max_length(self) -> int:
        return self.config.text_max_length

    def image_state(self, image_tokens: Tensor) -> list[KV | None]:
        """What an image contributes to every ITC/ITM pass, computed once: the cross-attention K/V per layer."""
        return self.qformer.image_kv(self.normalize(image_tokens))

    def image_embeddings(self, state: list[KV | None]) -> Tensor:
        """L2-normalised per-query image embeddings [B, Q, E] (multi-vector: a text scores by the best one)."""
        q = self.qformer(image_kv=state).query_output
        return F.normalize(self.vision_proj(q), dim=-1)

    def text_embeddings(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """L2-normalised text embeddings [B, E] from the [CLS] output of a text-only pass."""
        out = self.qformer(input_ids=input_ids, attention_mask=attention_mask, use_queries=False)
        return F.normalize(self.text_proj(out.hidden_states[:, 0]), dim=-1)

    def match_logits(self, state: list[KV | None], input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """ITM logits [B, 2] (no-match, match) of aligned (image, text) rows: the head averaged over queries."""
        out = self.qformer(image_kv=state, input_ids=input_ids, attention_mask=attention_mask, regime="bidirectional")
        return self.itm_head(out.query_output).mean(dim=1)

    @staticmethod
    def select_state(state: list[KV | None], rows: Tensor) -> list[KV | None]:
        """The image states of `rows` (an index tensor) of a batch."""
        return [None if kv is None else (kv[0][rows], kv[1][rows]) for kv in state]

    # Legacy names (the BLIP-2 model's methods), over normalised image embeddings.
    def itc_image_features(self, image_embeds: Tensor) -> Tensor:
        return self.image_embeddings(self.qformer.image_kv(image_embeds))

    def itc_text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.text_embeddings(input_ids, attention_mask)

    def itm_logits(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.match_logits(self.qformer.image_kv(image_embeds), input_ids, attention_mask)
