"""A tiny stage-1 model (frozen random ViT, Q-Former with heads, no LLM) for objective and training tests."""

from __future__ import annotations

import torch
import transformers

from vlbridge.bridges.qformer import QFormerConfig
from vlbridge.encoders.vision import FrozenVisionEncoder
from vlbridge.models.blip2 import Blip2, Blip2Config


def tiny_stage1(
    *, dropout: float = 0.0, seed: int = 0, queries: int = 4, vision_width: int = 20, image_position: str = "none"
) -> Blip2:
    torch.manual_seed(seed)
    vcfg = transformers.Blip2VisionConfig(
        hidden_size=vision_width,
        intermediate_size=40,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    vision = FrozenVisionEncoder(transformers.Blip2VisionModel(vcfg), layer=-1)
    qcfg = QFormerConfig(
        hidden_size=24,
        num_layers=2,
        num_heads=3,
        intermediate_size=40,
        num_query_tokens=queries,
        cross_attention_frequency=1,
        encoder_hidden_size=vision_width,
        vocab_size=60,
        max_position_embeddings=32,
        dropout=dropout,
        attention_dropout=dropout,
        image_position=image_position,
        num_image_tokens=5,  # 2x2 patches + [CLS]
    )
    config = Blip2Config(qformer=qcfg, vision=vcfg.to_dict(), embed_dim=12)
    return Blip2(config=config, vision=vision)
