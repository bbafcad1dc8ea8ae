"""Assemble a BLIP-2 model from parts for training: any frozen vision encoder, a Q-Former initialised
from BERT or from scratch, optionally a frozen LLM — the stage-1 / stage-2 starting points."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vlbridge.bridges.qformer import QFormer, QFormerConfig, qformer_from_bert, qformer_tokenizer
from vlbridge.encoders.vision import FrozenVisionEncoder, load_vision_model
from vlbridge.errors import ConfigError
from vlbridge.models.blip2 import Blip2, Blip2Config, PromptStyle


@dataclass
class ModelConfig:
    """What to build. Sources are local folders or hub ids."""

    vision: str = ""  # a vision model, a CLIP/SigLIP dual encoder or a transformers BLIP-2 checkpoint
    vision_layer: int = -2  # hidden state the Q-Former reads: EVA/CLIP's penultimate layer in the paper
    qformer_init: str | None = None  # a BERT checkpoint (and its tokenizer); None: from scratch
    tokenizer: str | None = None  # BERT tokenizer when qformer_init is None
    qformer: dict[str, Any] = field(default_factory=dict)  # QFormerConfig fields for a from-scratch Q-Former
    num_query_tokens: int = 32
    cross_attention_frequency: int = 2
    embed_dim: int | None = 256  # ITC/ITM/ITG heads (stage 1); None for stage 2
    language_model: str | None = None  # stage 2: a causal LM or T5 (frozen)
    init_from: str | None = None  # start from a vlbridge checkpoint (e.g. the stage-1 result)
    instruct: bool = False  # InstructBLIP: prompts also go into the Q-Former
    caption_prompt: str = ""  # stage 2: prompt for caption data (e.g. "a photo of")
    dtype: str = "float32"  # dtype of the frozen encoder / LLM


def build_model(cfg: ModelConfig) -> Blip2:
    """A trainable BLIP-2 model: frozen parts loaded, bridge initialised, tokenizers and preprocessing set."""
    import transformers

    from vlbridge.data.images import ImageProcessor, ImageProcessorConfig
    from vlbridge.interop.hf import resolve

    if not cfg.vision:
        raise ConfigError("model.vision is required: a vision model folder or hub id")
    dtype = getattr(torch, cfg.dtype)
    vision_path = resolve(cfg.vision)
    vision = FrozenVisionEncoder(load_vision_model(vision_path, dtype=dtype), layer=cfg.vision_layer)

    if cfg.qformer_init is not None:
        bert_path = resolve(cfg.qformer_init)
        bert = transformers.BertModel.from_pretrained(bert_path, add_pooling_layer=False)
        qformer = qformer_from_bert(
            bert,
            num_query_tokens=cfg.num_query_tokens,
            cross_attention_frequency=cfg.cross_attention_frequency,
            encoder_hidden_size=vision.width,
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
            **fields,
        )
        qformer = QFormer(config=qcfg)
    if len(tokenizer) > qformer.config.vocab_size:
        raise ConfigError(
            f"tokenizer has {len(tokenizer)} tokens but the Q-Former vocabulary is {qformer.config.vocab_size}"
        )

    lm = lm_tokenizer = None
    if cfg.language_model is not None:
        lm_path = resolve(cfg.language_model)
        lm_config = transformers.AutoConfig.from_pretrained(lm_path)
        auto = transformers.AutoModelForSeq2SeqLM if lm_config.is_encoder_decoder else transformers.AutoModelForCausalLM
        lm = auto.from_pretrained(lm_path, dtype=dtype)
        lm_tokenizer = transformers.AutoTokenizer.from_pretrained(lm_path)
    t5 = lm is not None and lm.config.is_encoder_decoder
    config = Blip2Config(
        qformer=qformer.config,
        vision=_vision_config(vision),
        vision_layer=cfg.vision_layer,
        # BLIP-2's own EVA ViT keeps ln_vision as its post_layernorm (same eps); other encoders get nn.LayerNorm's.
        vision_norm_eps=getattr(vision.model.config, "layer_norm_eps", 1e-5) if vision.family.replaced_norm else 1e-5,
        language=None if lm is None else lm.config.to_dict(),
        embed_dim=cfg.embed_dim,
        prompts=PromptStyle(
            vqa_template="Question: {} Short answer:" if t5 else "Question: {} Answer:",
            instruct=cfg.instruct,
            caption_prompt=cfg.caption_prompt,
        ),
    )
    model = Blip2(config=config, vision=vision, language_model=lm)
    model.qformer.load_state_dict(qformer.state_dict())
    model.qformer_tokenizer = tokenizer
    model.tokenizer = lm_tokenizer
    if (vision_path / "preprocessor_config.json").exists():
        image_config = ImageProcessorConfig.from_pretrained(vision_path)
    else:
        image_config = ImageProcessorConfig(image_size=(vision.image_size, vision.image_size))
    model.image_processor = ImageProcessor(image_config)
    if cfg.init_from is not None:
        load_trainable(model, cfg.init_from)
    return model


def _vision_config(vision: FrozenVisionEncoder) -> dict[str, Any]:
    d = vision.model.config.to_dict()
    d["model_type"] = vision.model.config.model_type
    return d


def load_trainable(model: Blip2, source: str) -> None:
    """Copy the bridge weights of a vlbridge checkpoint (native or training) into `model` where names match."""
    from pathlib import Path

    from safetensors.torch import load_file

    from vlbridge.errors import CheckpointError

    path = Path(source)
    weights = path / "model.safetensors" if path.is_dir() else path
    if not weights.exists():
        raise CheckpointError(f"{source}: no model.safetensors")
    state = {k: v for k, v in load_file(str(weights)).items() if not k.startswith(("vision.", "language_model."))}
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise CheckpointError(f"{source}: no weights fit this model")
    model.load_state_dict(usable, strict=False)
