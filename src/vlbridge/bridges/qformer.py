"""The Querying Transformer (Q-Former) of BLIP-2.

A BERT-style post-LN encoder whose first Q positions are learned query embeddings. Queries and text share
the self-attention layers; every `cross_attention_frequency`-th layer lets the *query* positions (only)
cross-attend to the frozen image features; query and text positions run through separate feed-forward
networks. Three self-attention regimes select what may see what:

- ``"unimodal"``: queries and text never attend to each other (run them as two separate passes: ITC).
- ``"bidirectional"``: every position sees every other (ITM, InstructBLIP instruction-aware queries).
- ``"causal"``: queries see only queries; each text token sees all queries and earlier text (ITG).

In the causal regime the queries' self-attention keys/values are exactly those of a query-only pass, so
they can be computed once (``return_query_kv=True`` on the ITC image pass) and passed as ``query_kv``.

Shapes: B batch, Q queries, T text tokens, S = Q + T, N image tokens, H hidden, Dv image feature width,
nh heads, hd head width (H = nh * hd), L layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlbridge.bridges.position import KINDS, ImagePositions

Regime = Literal["unimodal", "bidirectional", "causal"]
KV = tuple[Tensor, Tensor]  # ([B, nh, len, hd], [B, nh, len, hd])
CROSS_ATTENTION_INITS = ("fan_in", "bert")


@dataclass
class QFormerConfig:
    """Sizes of a Q-Former. The defaults are the paper's (BERT-base with 32 queries)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    num_query_tokens: int = 32
    cross_attention_frequency: int = 2  # layer i has cross-attention iff i % frequency == 0
    encoder_hidden_size: int = 1408  # width Dv of the frozen image features
    vocab_size: int = 30523  # BERT uncased + [DEC]
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    hidden_act: str = "gelu"
    # Generation-only checkpoints (BLIP-2 OPT/T5) carry neither text embeddings nor the text FFN.
    text_input: bool = True
    # Position added to the image tokens on the cross-attention key path (`bridges.position`): "none" is BLIP-2
    # as published; "sincos" / "learned" let queries look by place. "learned" needs the encoder's token count.
    image_position: str = "none"
    num_image_tokens: int | None = None
    # Initialisation of the (always new) cross-attention projections: "fan_in" draws normal(0, 1/sqrt(fan_in)) so
    # that query-key logits start O(1) and attention starts selective (it learns *where* to look, issue 14's
    # measured fix: 2x faster to read a layout); "bert" is BERT's normal(0, 0.02) of LAVIS, under which the logits
    # start ~0 and every query begins as a uniform average of the image (colour, not shape). Pretrained weights
    # load over either.
    cross_attention_init: str = "fan_in"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.cross_attention_frequency < 1:
            raise ValueError("cross_attention_frequency must be >= 1")
        if self.image_position not in KINDS:
            raise ValueError(f"unknown image_position {self.image_position!r}: choose one of {', '.join(KINDS)}")
        if self.cross_attention_init not in CROSS_ATTENTION_INITS:
            raise ValueError(
                f"unknown cross_attention_init {self.cross_attention_init!r}: choose one of "
                + ", ".join(CROSS_ATTENTION_INITS)
            )


_ACTIVATIONS = {"gelu": nn.GELU(), "gelu_new": nn.GELU(approximate="tanh"), "relu": nn.ReLU()}


class Attention(nn.Module):
    """Multi-head attention followed by BERT's output projection, dropout, residual and post-LayerNorm."""

    def __init__(self, *, config: QFormerConfig, kv_width: int) -> None:
        super().__init__()
        H = config.hidden_size
        self.num_heads = config.num_heads
        self.attention_dropout = config.attention_dropout
        self.query = nn.Linear(H, H)
        self.key = nn.Linear(kv_width, H)
        self.value = nn.Linear(kv_width, H)
        self.out = nn.Linear(H, H)
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(H, eps=config.layer_norm_eps)

    def split_heads(self, x: Tensor) -> Tensor:
        B, S, _ = x.shape
        return x.view(B, S, self.num_heads, -1).transpose(1, 2)  # [B, nh, S, hd]

    def project_kv(self, x: Tensor, key_position: Tensor | None = None) -> KV:
        """Keys and values of `x` ([B, S, *]) as [B, nh, S, hd] each; `key_position` [S, *] joins the keys only."""
        k = self.key(x if key_position is None else x + key_position)
        return self.split_heads(k), self.split_heads(self.value(x))

    def forward(self, x: Tensor, kv: KV, mask: Tensor | None) -> Tensor:
        """Attend from `x` [B, S, H] to `kv`; `mask` is a boolean [B|1, 1, S, S_kv] (True = may attend)."""
        q = self.split_heads(self.query(x))
        k, v = kv
        p = self.attention_dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # [B, nh, S, hd]
        o = o.transpose(1, 2).flatten(2)  # [B, S, H]
        return self.norm(self.dropout(self.out(o)) + x)


class FeedForward(nn.Module):
    """BERT's intermediate + output block: Linear -> GELU -> Linear -> dropout -> residual -> LayerNorm."""

    def __init__(self, *, config: QFormerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _ACTIVATIONS[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.dropout(self.fc2(self.act(self.fc1(x)))) + x)


class QFormerLayer(nn.Module):
    def __init__(self, *, config: QFormerConfig, index: int) -> None:
        super().__init__()
        H = config.hidden_size
        self.attention = Attention(config=config, kv_width=H)
        self.has_cross_attention = index % config.cross_attention_frequency == 0
        self.crossattention = (
            Attention(config=config, kv_width=config.encoder_hidden_size) if self.has_cross_attention else None
        )
        self.query_ffn = FeedForward(config=config)
        self.text_ffn = FeedForward(config=config) if config.text_input else None

    def forward(
        self,
        x: Tensor,
        *,
        num_queries: int,
        mask: Tensor | None,
        image_kv: KV | None,
        image_mask: Tensor | None,
        query_kv: KV | None,
    ) -> tuple[Tensor, KV]:
        """One layer over x [B, S, H] whose first `num_queries` positions are queries.

        If `query_kv` is given, x holds text only and the cached query keys/values are prepended to the
        text's own keys/values. Returns the new hidden states and this layer's self-attention K/V of the
        query positions (for reuse by a later causal pass).
        """
        k, v = self.attention.project_kv(x)
        if query_kv is not None:
            k, v = torch.cat([query_kv[0], k], dim=2), torch.cat([query_kv[1], v], dim=2)  # [B, nh, Q+T, hd]
        h = self.attention(x, (k, v), mask)
        own_query_kv = (k[:, :, :num_queries], v[:, :, :num_queries])

        queries, text = h[:, :num_queries], h[:, num_queries:]
        parts = []
        if num_queries:
            if self.crossattention is not None:
                if image_kv is None:
                    raise ValueError("image features are required: this layer cross-attends")
                queries = self.crossattention(queries, image_kv, image_mask)
            parts.append(self.query_ffn(queries))
        if text.shape[1]:
            if self.text_ffn is None:
                raise ValueError("this Q-Former has no text feed-forward network (a generation-only checkpoint)")
            parts.append(self.text_ffn(text))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0], own_query_kv


class TextEmbeddings(nn.Module):
    """Word + absolute position embeddings for text; queries get none. One LayerNorm over the whole sequence."""

    def __init__(self, *, config: QFormerConfig) -> None:
        super().__init__()
        H = config.hidden_size
        if config.text_input:
            self.word_embeddings = nn.Embedding(config.vocab_size, H, padding_idx=config.pad_token_id)
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, H)
        self.layernorm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, query_embeds: Tensor | None, input_ids: Tensor | None) -> Tensor:
        parts = [] if query_embeds is None else [query_embeds]
        if input_ids is not None:
            T = input_ids.shape[1]
            positions = torch.arange(T, device=input_ids.device)  # text positions start at 0 after the queries
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(positions))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # [B, S, H]
        return self.dropout(self.layernorm(x))


@dataclass
class QFormerOutput:
    """`hidden_states` [B, S, H]: queries first (if any), then text. `query_kv`: per layer, the query
    positions' self-attention keys/values (only when requested)."""

    hidden_states: Tensor
    num_queries: int
    query_kv: list[KV] | None = None

    @property
    def query_output(self) -> Tensor:
        return self.hidden_states[:, : self.num_queries]  # [B, Q, H]

    @property
    def text_output(self) -> Tensor:
        return self.hidden_states[:, self.num_queries :]  # [B, T, H]


class QFormer(nn.Module):
    """Learned queries + BERT-style encoder with interleaved cross-attention to frozen image features."""

    def __init__(self, *, config: QFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.hidden_size))
        self.embeddings = TextEmbeddings(config=config)
        self.layers = nn.ModuleList([QFormerLayer(config=config, index=i) for i in range(config.num_layers)])
        self.gradient_checkpointing = False
        self.reset_parameters()
        self.image_position = None  # after reset_parameters: a learned table starts as sine-cosine, not noise
        if config.image_position != "none":
            self.image_position = ImagePositions(
                kind=config.image_position, width=config.encoder_hidden_size, num_tokens=config.num_image_tokens
            )

    def reset_parameters(self) -> None:
        """BERT initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms; queries normal(0, 0.02).

        Cross-attention follows `config.cross_attention_init` ("fan_in": normal(0, 1/sqrt(fan_in)) weights).
        """
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    nn.init.zeros_(module.weight[module.padding_idx])
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.query_tokens, std=0.02)
        if self.config.cross_attention_init == "fan_in":
            for layer in self.layers:
                if layer.crossattention is not None:
                    for name in ("query", "key", "value", "out"):
                        weight = getattr(layer.crossattention, name).weight
                        nn.init.normal_(weight, std=weight.shape[1] ** -0.5)

    def image_kv(self, image_embeds: Tensor) -> list[KV | None]:
        """Cross-attention keys/values of the image features [B, N, Dv], one entry per layer.

        They depend only on the image, so one projection serves all passes over that image (ITC, ITM
        positives and negatives, generation): index the batch dimension to reuse them.
        """
        image_embeds = image_embeds.to(self.query_tokens.dtype)
        position = None
        if self.image_position is not None:
            position = self.image_position(image_embeds.shape[1], dtype=image_embeds.dtype, device=image_embeds.device)
        return [
            layer.crossattention.project_kv(image_embeds, position) if layer.crossattention else None
            for layer in self.layers
        ]

    def forward(
        self,
        *,
        image_embeds: Tensor | None = None,
        image_kv: list[KV | None] | None = None,
        image_mask: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        use_queries: bool = True,
        regime: Regime = "bidirectional",
        query_kv: list[KV] | None = None,
        return_query_kv: bool = False,
    ) -> QFormerOutput:
        """Run the Q-Former.

        Args:
            image_embeds: frozen image features [B, N, Dv] (or pass `image_kv` from `image_kv()`).
            image_kv: precomputed cross-attention keys/values, one per layer.
            image_mask: [B, N] 1 for valid image tokens (default: all valid).
            input_ids: text tokens [B, T].
            attention_mask: [B, T] 1 for real text tokens, 0 for padding.
            use_queries: prepend the learned queries (False: a text-only pass, e.g. ITC's text side).
            regime: "unimodal" | "bidirectional" | "causal" (see the module docstring).
            query_kv: cached query keys/values from a query-only pass; the text then runs alone and
                attends to them (causal regime).
            return_query_kv: also return the query positions' self-attention keys/values per layer.
        """
        if query_kv is not None and use_queries:
            raise ValueError("pass either use_queries=True or cached query_kv, not both")
        if input_ids is None and not use_queries:
            raise ValueError("nothing to encode: no text and no queries")
        if regime == "unimodal" and use_queries and input_ids is not None:
            raise ValueError("the unimodal regime runs queries and text as separate passes")
        if image_embeds is not None and image_kv is None:
            image_kv = self.image_kv(image_embeds)

        batch = input_ids.shape[0] if input_ids is not None else (image_kv[0][0].shape[0] if image_kv else 1)
        queries = self.query_tokens.expand(batch, -1, -1) if use_queries else None  # [B, Q, H]
        x = self.embeddings(queries, input_ids)  # [B, S, H]
        num_queries = self.config.num_query_tokens if use_queries else 0
        num_cached = query_kv[0][0].shape[2] if query_kv is not None else 0

        mask = self._self_attention_mask(x, num_queries, num_cached, attention_mask, regime)
        cross_mask = None
        if image_mask is not None:
            cross_mask = image_mask.bool()[:, None, None, :]  # [B, 1, 1, N]

        new_query_kv: list[KV] = []
        for i, layer in enumerate(self.layers):
            kv_i = image_kv[i] if image_kv is not None else None
            cached_i = query_kv[i] if query_kv is not None else None
            if self.gradient_checkpointing and self.training:
                x, own = torch.utils.checkpoint.checkpoint(
                    layer,
                    x,
                    num_queries=num_queries,
                    mask=mask,
                    image_kv=kv_i,
                    image_mask=cross_mask,
                    query_kv=cached_i,
                    use_reentrant=False,
                )
            else:
                x, own = layer(
                    x, num_queries=num_queries, mask=mask, image_kv=kv_i, image_mask=cross_mask, query_kv=cached_i
                )
            new_query_kv.append(own)
        return QFormerOutput(x, num_queries, new_query_kv if return_query_kv else None)

    @staticmethod
    def _self_attention_mask(
        x: Tensor, num_queries: int, num_cached: int, attention_mask: Tensor | None, regime: Regime
    ) -> Tensor | None:
        """Boolean [B|1, 1, S, K] mask (True = may attend), K = keys incl. cached queries; None = attend all."""
        B, S, _ = x.shape
        Qk = num_queries + num_cached  # query keys, computed now or cached
        K = num_cached + S
        T = S - num_queries
        key_ok = None
        if attention_mask is not None and T:
            ones = torch.ones(B, Qk, dtype=torch.bool, device=x.device)
            key_ok = torch.cat([ones, attention_mask.bool()], dim=1)[:, None, None, :]  # [B, 1, 1, K]
        if regime != "causal" or T == 0:
            return key_ok
        # causal: rows are [queries (num_queries), text (T)]; columns are [query keys (Qk), text keys (T)].
        rows = torch.arange(S, device=x.device)[:, None] - num_queries  # text index of each row, <0 for queries
        cols = torch.arange(K, device=x.device)[None, :] - Qk  # text index of each key, <0 for query keys
        allowed = torch.where(rows < 0, cols < 0, cols <= rows)  # [S, K]
        allowed = allowed[None, None]  # [1, 1, S, K]
        return allowed if key_ok is None else allowed & key_ok


# ------------------------------------------------------------------------------------------------ BERT init
def qformer_from_bert(
    bert: nn.Module,
    *,
    num_query_tokens: int = 32,
    cross_attention_frequency: int = 2,
    encoder_hidden_size: int,
    extra_tokens: int = 1,
    image_position: str = "none",
    num_image_tokens: int | None = None,
) -> QFormer:
    """A Q-Former initialised from a transformers `BertModel` (the BLIP-2 recipe).

    Self-attention, the text FFN and the embeddings come from BERT; the query FFN is a copy of BERT's FFN;
    cross-attention and the queries are random. BERT adds token-type embedding 0 to every token; the
    Q-Former has no token types, so that vector is folded into the position embeddings (an exact rewrite).
    `extra_tokens` rows are appended to the vocabulary for `[DEC]`; `image_position` / `num_image_tokens` as in
    `QFormerConfig`.
    """
    c = bert.config
    config = QFormerConfig(
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        intermediate_size=c.intermediate_size,
        num_query_tokens=num_query_tokens,
        cross_attention_frequency=cross_attention_frequency,
        encoder_hidden_size=encoder_hidden_size,
        vocab_size=c.vocab_size + extra_tokens,
        max_position_embeddings=c.max_position_embeddings,
        layer_norm_eps=c.layer_norm_eps,
        dropout=c.hidden_dropout_prob,
        attention_dropout=c.attention_probs_dropout_prob,
        pad_token_id=c.pad_token_id or 0,
        hidden_act=c.hidden_act,
        image_position=image_position,
        num_image_tokens=num_image_tokens,
    )
    qformer = QFormer(config=config)
    emb = bert.embeddings
    with torch.no_grad():
        qformer.embeddings.word_embeddings.weight[: c.vocab_size].copy_(emb.word_embeddings.weight)
        positions = emb.position_embeddings.weight + emb.token_type_embeddings.weight[0]
        qformer.embeddings.position_embeddings.weight.copy_(positions)
        qformer.embeddings.layernorm.load_state_dict(emb.LayerNorm.state_dict())
        for ours, theirs in zip(qformer.layers, bert.encoder.layer):
            a = theirs.attention
            for name in ("query", "key", "value"):
                getattr(ours.attention, name).load_state_dict(getattr(a.self, name).state_dict())
            ours.attention.out.load_state_dict(a.output.dense.state_dict())
            ours.attention.norm.load_state_dict(a.output.LayerNorm.state_dict())
            for ffn in (ours.text_ffn, ours.query_ffn):
                ffn.fc1.load_state_dict(theirs.intermediate.dense.state_dict())
                ffn.fc2.load_state_dict(theirs.output.dense.state_dict())
                ffn.norm.load_state_dict(theirs.output.LayerNorm.state_dict())
    return qformer


def qformer_tokenizer(bert_tokenizer):
    """BERT's tokenizer plus the `[DEC]` token that starts ITG (image-grounded generation) sequences."""
    bert_tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return bert_tokenizer
