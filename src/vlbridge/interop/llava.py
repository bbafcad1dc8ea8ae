"""Read and write transformers `LlavaForConditionalGeneration` checkpoints (a projector bridge).

LLaVA is the composition with a `projector` bridge: the vision tower's hidden state at `vision_feature_layer`
([CLS] dropped for the "default" strategy, kept for "full"), a 2-layer GELU MLP, and a causal LM that reads the
projected tokens where the prompt's `<image>` token is. Loading goes through transformers; the LM's base model
and head become one `AutoModelForCausalLM` of the text config (the modules are moved, not copied). Saving writes
a checkpoint transformers reloads with identical outputs: the vision tower is stored up to the layer read
(so the exported `vision_feature_layer` is -1 of a tower of that depth: the same features, no unused weights).

Shapes: N image tokens, Dv vision width, D LM width.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from vlbridge.encoders.vision import FrozenVisionEncoder
from vlbridge.errors import CheckpointError
from vlbridge.interop.hf import image_processor, image_token_index
from vlbridge.models.vlm import PromptStyle, VisionLanguageModel, VLMConfig
from vlbridge.utils.formats import register_saver
from vlbridge.utils.hub import resolve
from vlbridge.utils.io import atomic_dir

ARCHITECTURE = "LlavaForConditionalGeneration"
_SELECT = {"default": "patch", "full": "all"}  # transformers' strategy -> our vision_select
_VISION_TYPES = ("clip_vision_model", "siglip_vision_model")


def is_llava(config: dict[str, Any]) -> bool:
    """A transformers config dict of a LLaVA checkpoint."""
    return ARCHITECTURE in (config.get("architectures") or []) or config.get("model_type") == "llava"


def llava_prompts(image_token: str = "<image>") -> PromptStyle:
    """LLaVA-1.5's conversation format; a prompt without the placeholder gets the image first."""
    return PromptStyle(
        caption_prompt="",
        vqa_template=f"USER: {image_token}\n{{}} ASSISTANT:",
        chat_turn="USER: {} ASSISTANT: {}",
        image_token=image_token,
        image_first=f"{image_token}\n",
    )


# ------------------------------------------------------------------------------------------------ loading
def load_llava(
    source: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> VisionLanguageModel:
    """Load a transformers LLaVA checkpoint (folder or hub id) with its tokenizer and image processor."""
    path = resolve(source)
    try:  # float32 first: the projector stays float32 whatever the frozen parts become
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    except Exception as exc:
        raise CheckpointError(f"{path}: transformers could not load this {ARCHITECTURE} checkpoint: {exc}") from exc
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = from_llava_model(hf, tokenizer=tokenizer)
    model.image_processor = image_processor(path, model.vision.image_size)
    if dtype is not None and dtype != torch.float32:
        model.vision.to(dtype)
        model.language_model.to(dtype)
    return model.to(device)


def from_llava_model(hf: nn.Module, *, tokenizer: Any = None) -> VisionLanguageModel:
    """Our model around the parts of a transformers `LlavaForConditionalGeneration` (its modules, not copies)."""
    cfg = hf.config
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise CheckpointError(
            f"vision_feature_layer={layer!r}: features concatenated from several layers are not supported"
        )
    if cfg.vision_feature_select_strategy not in _SELECT:
        raise CheckpointError(f"unknown vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}")
    if cfg.projector_hidden_act != "gelu":
        raise CheckpointError(f"projector_hidden_act={cfg.projector_hidden_act!r}: only LLaVA's GELU is supported")
    tower = hf.model.vision_tower
    if tower.config.model_type not in _VISION_TYPES:
        raise CheckpointError(f"vision tower {tower.config.model_type!r}: supported are {', '.join(_VISION_TYPES)}")
    vision = FrozenVisionEncoder(tower, layer=layer)
    with torch.device("meta"):
        lm = transformers.AutoModelForCausalLM.from_config(cfg.text_config)
    setattr(lm, lm.base_model_prefix, hf.model.language_model)
    lm.set_output_embeddings(hf.lm_head)
    lm.generation_config = copy.deepcopy(hf.generation_config)
    if any(p.is_meta for p in lm.parameters()):
        raise CheckpointError(f"{type(lm).__name__}: could not take over the LLaVA language model's weights")
    marker = "<image>"
    if tokenizer is not None and cfg.image_token_index < len(tokenizer):
        marker = tokenizer.convert_ids_to_tokens(cfg.image_token_index)
    config = VLMConfig(
        bridge={"kind": "projector", "projector_type": "mlp2x_gelu", "bias": cfg.multimodal_projector_bias},
        vision=_vision_config(tower),
        vision_layer=layer,
        vision_select=_SELECT[cfg.vision_feature_select_strategy],
        language=lm.config.to_dict(),
        prompts=llava_prompts(marker),
    )
    model = VisionLanguageModel(config=config, vision=vision, language_model=lm)
    projector = hf.model.multi_modal_projector
    model.bridge.layers[0].load_state_dict(projector.linear_1.state_dict())
    model.bridge.layers[2].load_state_dict(projector.linear_2.state_dict())
    model.tokenizer = tokenizer
    return model


def _vision_config(tower: nn.Module) -> dict[str, Any]:
    d = tower.config.to_dict()
    d["model_type"] = tower.config.model_type
    return d


# ------------------------------------------------------------------------------------------------ saving
@register_saver("hf", kind="projector")
def save_llava(model: VisionLanguageModel, directory: str | os.PathLike) -> Path:
    """Write `model` as a transformers `LlavaForConditionalGeneration` checkpoint (atomically).

    Raises:
        CheckpointError: What transformers' LLaVA cannot represent, named (another projector depth, a vision
            family it has no tower for, no LM or tokenizer, an `<image>` token outside the LM's vocabulary).
    """
    bridge, lm, tok = model.bridge, model.language_model, model.tokenizer
    if bridge.config.projector_type != "mlp2x_gelu":
        raise CheckpointError(
            f"transformers' LLaVA has a 2-layer GELU projector; this one is {bridge.config.projector_type!r}: "
            "save it with format='native'"
        )
    vision_type = model.vision.model.config.model_type
    if vision_type not in _VISION_TYPES:
        raise CheckpointError(f"transformers' LLaVA cannot hold a {vision_type!r} vision tower: use format='native'")
    if lm is None or tok is None or lm.config.is_encoder_decoder:
        raise CheckpointError("a transformers LLaVA checkpoint needs a causal language model and its tokenizer")
    image_index = image_token_index(model)
    vision_config = model.vision.model.config.to_dict()
    vision_config["num_hidden_layers"] = model.vision.index  # the tower up to the layer read
    hf_config = transformers.LlavaConfig(
        vision_config=vision_config,
        text_config=lm.config.to_dict(),
        image_token_index=image_index,
        image_seq_length=model.num_visual_tokens,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default" if model.config.vision_select == "patch" else "full",
        multimodal_projector_bias=bridge.config.bias,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    hf_config.architectures = [ARCHITECTURE]
    state: dict[str, torch.Tensor] = {}
    for key, value in model.vision.model.state_dict().items():
        state[f"model.vision_tower.{key}"] = value
    for ours, theirs in ((0, "linear_1"), (2, "linear_2")):
        for key, value in bridge.layers[ours].state_dict().items():
            state[f"model.multi_modal_projector.{theirs}.{key}"] = value
    for key, value in lm.base_model.state_dict().items():
        state[f"model.language_model.{key}"] = value
    state["lm_head.weight"] = lm.get_output_embeddings().weight
    with torch.device("meta"):
        hf = transformers.LlavaForConditionalGeneration(hf_config)
    result = hf.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"cannot map onto {ARCHITECTURE}: missing {missing[:8]}, unexpected {result.unexpected_keys[:8]}"
        )
    hf.tie_weights()
    hf.generation_config = copy.deepcopy(lm.generation_config)

    def write(tmp: Path) -> None:
        hf.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if model.image_processor is not None:
            processor = model.image_processor.config.to_hf_dict()
            (tmp / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))

    return atomic_dir(directory, write)
