"""How a Q-Former bridge starts training: from BERT's weights (BLIP-2's recipe) or from scratch, with the BERT
tokenizer it reads text with (`[DEC]` added for ITG)."""

from __future__ import annotations

import dataclasses
from typing import Any

from vlbridge.bridges.qformer import QFormer, QFormerConfig, qformer_from_bert, qformer_tokenizer
from vlbridge.encoders.vision import FrozenVisionEncoder
from vlbridge.errors import ConfigError
from vlbridge.utils.hub import resolve


def initial_qformer(cfg: Any, vision: FrozenVisionEncoder) -> tuple[dict[str, Any], QFormer, Any]:
    """(bridge spec, initial Q-Former, its tokenizer) from a `ModelConfig`: initialised from a BERT checkpoint
    (`qformer_init`, as BLIP-2) or from scratch (`qformer` sizes, `tokenizer`).

    Raises:
        ConfigError: No tokenizer for a from-scratch Q-Former, or a tokenizer larger than its vocabulary.
    """
    import transformers

    position = {"image_position": cfg.image_position, "num_image_tokens": None}
    if cfg.image_position == "learned":
        position["num_image_tokens"] = vision.num_tokens

    if cfg.qformer_init is not None:
        bert_path = resolve(cfg.qformer_init)
        bert = transformers.BertModel.from_pretrained(bert_path, add_pooling_layer=False)
        qformer = qformer_from_bert(
            bert,
            num_query_tokens=cfg.num_query_tokens,
            cross_attention_frequency=cfg.cross_attention_frequency,
            encoder_hidden_size=vision.width,
            **position,
        )
        tokenizer_source = cfg.tokenizer or bert_path
    else:
        if cfg.tokenizer is None:
            raise ConfigError("model.tokenizer is required when model.qformer_init is not given")
        tokenizer_source = resolve(cfg.tokenizer)
        qformer = None
    tokenizer = qformer_tokenizer(transformers.AutoTokenizer.from_pretrained(tokenizer_source))
    if qformer is None:
        fields = {"vocab_size": len(tokenizer), **cfg.qformer}
        qcfg = QFormerConfig(
            num_query_tokens=cfg.num_query_tokens,
            cross_attention_frequency=cfg.cross_attention_frequency,
            encoder_hidden_size=vision.width,
            **position,
            **fields,
        )
        qformer = QFormer(config=qcfg)
    if len(tokenizer) > qformer.config.vocab_size:
        raise ConfigError(
            f"tokenizer has {len(tokenizer)} tokens but the Q-Former vocabulary is {qformer.config.vocab_size}"
        )

    bridge = {
        "kind": "qformer",
        "qformer": dataclasses.asdict(qformer.config),
        # BLIP-2's own EVA ViT keeps ln_vision as its post_layernorm (same eps); other encoders get nn.LayerNorm's.
        "vision_norm_eps": getattr(vision.model.config, "layer_norm_eps", 1e-5)
        if vision.family.replaced_norm
        else 1e-5,
        "embed_dim": cfg.embed_dim,
        "instruct": cfg.instruct,
        "freeze_qformer": cfg.freeze_qformer,
    }
    return bridge, qformer, tokenizer
