"""Read and write transformers BLIP-2 / InstructBLIP checkpoints.

Loading goes through transformers itself for the parts we keep frozen (its vision model and its LLM
classes, sharding, dtypes); the bridge — queries, Q-Former, `ln_vision`, projections, heads — is copied
into our own modules by the name table below. Saving inverts the table and lets transformers write the
files, so what we save is what transformers loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from vlbridge.bridges.qformer import QFormerConfig
from vlbridge.encoders.vision import FrozenVisionEncoder
from vlbridge.errors import CheckpointError
from vlbridge.inference.prefix import image_token_id
from vlbridge.models.vlm import PromptStyle, VisionLanguageModel, VLMConfig
from vlbridge.utils.formats import register_saver
from vlbridge.utils.hub import resolve

SUPPORTED = {
    "Blip2ForConditionalGeneration": "blip-2",
    "InstructBlipForConditionalGeneration": "instructblip",
    "Blip2ForImageTextRetrieval": "blip-2",
}

# Q-Former names: transformers (inside `qformer.encoder.layer.N.`) -> ours (inside `qformer.layers.N.`).
_LAYER_NAMES = {
    "attention.attention.": "attention.",
    "attention.output.dense.": "attention.out.",
    "attention.output.LayerNorm.": "attention.norm.",
    "crossattention.attention.": "crossattention.",
    "crossattention.output.dense.": "crossattention.out.",
    "crossattention.output.LayerNorm.": "crossattention.norm.",
    "intermediate_query.dense.": "query_ffn.fc1.",
    "output_query.dense.": "query_ffn.fc2.",
    "output_query.LayerNorm.": "query_ffn.norm.",
    "intermediate.dense.": "text_ffn.fc1.",
    "output.dense.": "text_ffn.fc2.",
    "output.LayerNorm.": "text_ffn.norm.",
}
# Everything outside the layers. Retrieval keeps the text embeddings outside the Q-Former, InstructBLIP inside.
_TOP_NAMES = {
    "query_tokens": "qformer.query_tokens",
    "qformer.layernorm.": "qformer.embeddings.layernorm.",
    "qformer.embeddings.layernorm.": "qformer.embeddings.layernorm.",
    "qformer.embeddings.word_embeddings.": "qformer.embeddings.word_embeddings.",
    "qformer.embeddings.position_embeddings.": "qformer.embeddings.position_embeddings.",
    "embeddings.word_embeddings.": "qformer.embeddings.word_embeddings.",
    "embeddings.position_embeddings.": "qformer.embeddings.position_embeddings.",
    "vision_model.post_layernorm.": "ln_vision.",
    "language_projection.": "language_projection.",
    "vision_projection.": "vision_proj.",
    "text_projection.": "text_proj.",
    "itm_head.": "itm_head.",
}
_LAYER_RE = re.compile(r"^qformer\.encoder\.layer\.(\d+)\.(.*)$")


def hf_to_ours(key: str) -> str | None:
    """Our name for a transformers bridge parameter; None for frozen parts and buffers."""
    m = _LAYER_RE.match(key)
    if m:
        index, rest = m.groups()
        for theirs, ours in _LAYER_NAMES.items():
            if rest.startswith(theirs):
                return f"qformer.layers.{index}.{ours}{rest[len(theirs) :]}"
        raise CheckpointError(f"unrecognised Q-Former parameter {key!r}")
    for theirs, ours in _TOP_NAMES.items():
        if key == theirs or (theirs.endswith(".") and key.startswith(theirs)):
            return ours + key[len(theirs) :]
    return None


def ours_to_hf(key: str, architecture: str) -> str | None:
    """Inverse of `hf_to_ours` for one target architecture; None for names transformers has no place for."""
    m = re.match(r"^qformer\.layers\.(\d+)\.(.*)$", key)
    if m:
        index, rest = m.groups()
        if rest.startswith("text_ffn.") and architecture == "Blip2ForConditionalGeneration":
            return None  # generation checkpoints carry no text side (use_qformer_text_input=False)
        for theirs, ours in sorted(_LAYER_NAMES.items(), key=lambda kv: -len(kv[1])):  # longest prefix first
            if rest.startswith(ours):
                return f"qformer.encoder.layer.{index}.{theirs}{rest[len(ours) :]}"
    retrieval = architecture == "Blip2ForImageTextRetrieval"
    instruct = architecture == "InstructBlipForConditionalGeneration"
    table = {
        "qformer.query_tokens": "query_tokens",
        "qformer.embeddings.layernorm.": "qformer.embeddings.layernorm." if instruct else "qformer.layernorm.",
        "qformer.embeddings.word_embeddings.": "qformer.embeddings.word_embeddings."
        if instruct
        else ("embeddings.word_embeddings." if retrieval else None),
        "qformer.embeddings.position_embeddings.": "qformer.embeddings.position_embeddings."
        if instruct
        else ("embeddings.position_embeddings." if retrieval else None),
        "ln_vision.": "vision_model.post_layernorm.",
        "language_projection.": "language_projection.",
        "vision_proj.": "vision_projection." if retrieval else None,
        "text_proj.": "text_projection." if retrieval else None,
        "itm_head.": "itm_head." if retrieval else None,
    }
    for ours, theirs in table.items():
        if key == ours or (ours.endswith(".") and key.startswith(ours)):
            return None if theirs is None else theirs + key[len(ours) :]
    return None


# ------------------------------------------------------------------------------------------------ loading
def read_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.exists():
        raise CheckpointError(f"{path}: no config.json (not a transformers or vlbridge checkpoint)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from exc


def architecture_of(config: dict[str, Any], path: Path) -> str:
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch is None and config.get("model_type") == "blip-2":
        arch = "Blip2ForConditionalGeneration"
    if arch is None and config.get("model_type") == "instructblip":
        arch = "InstructBlipForConditionalGeneration"
    if arch not in SUPPORTED:
        found = arch or f"model_type {config.get('model_type')!r}"
        raise CheckpointError(
            f"{path}: found {found}; supported: {', '.join(SUPPORTED)}, LAVIS .pth files, and vlbridge checkpoints"
        )
    return arch


def load_hf(
    source: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> VisionLanguageModel:
    """Load a transformers BLIP-2 / InstructBLIP / BLIP-2 retrieval checkpoint into our model."""
    path = resolve(source)
    config = read_config(path)
    arch = architecture_of(config, path)
    hf_cls = getattr(transformers, arch)
    try:  # float32 first: transformers would round the bridge to bf16 too (it keeps fp32 modules only for fp16)
        hf = hf_cls.from_pretrained(path, dtype=torch.float32)
    except Exception as exc:
        raise CheckpointError(f"{path}: transformers could not load this {arch} checkpoint: {exc}") from exc
    model = from_hf_model(hf)
    if dtype is not None and dtype != torch.float32:  # only the frozen parts change dtype
        model.vision.to(dtype)
        if model.language_model is not None:
            model.language_model.to(dtype)
    _attach_preprocessing(model, path, arch)
    return model.to(device)


def from_hf_model(hf: nn.Module) -> VisionLanguageModel:
    """Build our model around the frozen parts of a transformers BLIP-2 model and copy its bridge weights."""
    arch = type(hf).__name__
    cfg = hf.config
    q = cfg.qformer_config
    retrieval = arch == "Blip2ForImageTextRetrieval"
    instruct = arch == "InstructBlipForConditionalGeneration"
    qcfg = QFormerConfig(
        hidden_size=q.hidden_size,
        num_layers=q.num_hidden_layers,
        num_heads=q.num_attention_heads,
        intermediate_size=q.intermediate_size,
        num_query_tokens=cfg.num_query_tokens,
        cross_attention_frequency=q.cross_attention_frequency,
        encoder_hidden_size=cfg.vision_config.hidden_size,
        vocab_size=q.vocab_size,
        max_position_embeddings=q.max_position_embeddings,
        layer_norm_eps=q.layer_norm_eps,
        dropout=q.hidden_dropout_prob,
        attention_dropout=q.attention_probs_dropout_prob,
        pad_token_id=q.pad_token_id if q.pad_token_id is not None else 0,
        hidden_act=q.hidden_act,
        text_input=retrieval or instruct or bool(getattr(q, "use_qformer_text_input", False)),
    )
    lm = None if retrieval else hf.language_model
    t5 = lm is not None and lm.config.is_encoder_decoder
    prompts = PromptStyle(
        vqa_template="Question: {} Short answer:" if t5 else "Question: {} Answer:",
        caption_prompt="A short image caption:" if instruct else "",
    )
    bridge_cfg = {
        "kind": "qformer",
        "qformer": dataclasses.asdict(qcfg),
        "vision_norm_eps": cfg.vision_config.layer_norm_eps,
        "embed_dim": cfg.image_text_hidden_size if retrieval else None,
        "instruct": instruct,
    }
    ours_cfg = VLMConfig(
        bridge=bridge_cfg,
        vision=cfg.vision_config.to_dict(),
        vision_layer=-1,
        language=None if lm is None else lm.config.to_dict(),
        prompts=prompts,
    )
    state = hf.state_dict()
    # The vision model's post_layernorm is BLIP-2's trainable ln_vision: the wrapper drops it, the bridge has it.
    model = VisionLanguageModel(
        config=ours_cfg, vision=FrozenVisionEncoder(hf.vision_model, layer=-1), language_model=lm
    )
    bridge = {}
    for key, value in state.items():
        ours = hf_to_ours(key)
        if ours is not None:
            bridge[ours] = value.float()
    # transformers has no ITC temperature and no ITG head: those keep their initial values.
    expected = {n for n in model.bridge.state_dict() if not n.startswith(("temp", "itg_head."))}
    missing = sorted(expected - bridge.keys())
    unexpected = sorted(bridge.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{arch} weights do not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    model.bridge.load_state_dict(bridge, strict=False)
    return model


def _attach_preprocessing(model: VisionLanguageModel, path: Path, arch: str) -> None:
    from transformers import AutoTokenizer

    def tokenizer(folder: Path):
        if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
            return None
        return AutoTokenizer.from_pretrained(folder)

    if arch == "Blip2ForImageTextRetrieval":
        model.qformer_tokenizer = tokenizer(path)
    else:
        model.tokenizer = tokenizer(path)
        if arch == "InstructBlipForConditionalGeneration":
            model.qformer_tokenizer = tokenizer(path / "qformer_tokenizer")
    model.image_processor = image_processor(path, model.vision.image_size)


def image_processor(path: Path, image_size: int):
    """The checkpoint's image preprocessing (its processor config), or a plain resize to the encoder's size."""
    from vlbridge.data.images import ImageProcessor, ImageProcessorConfig

    if (path / "preprocessor_config.json").exists() or (path / "processor_config.json").exists():
        return ImageProcessor(ImageProcessorConfig.from_pretrained(path))
    return ImageProcessor(ImageProcessorConfig(image_size=(image_size, image_size)))


# ------------------------------------------------------------------------------------------------ saving
def hf_architecture(model: VisionLanguageModel) -> str:
    if model.language_model is None:
        return "Blip2ForImageTextRetrieval"
    return "InstructBlipForConditionalGeneration" if model.bridge.instruction_aware else "Blip2ForConditionalGeneration"


def _hf_config(model: VisionLanguageModel, arch: str, image_token_index: int | None):
    q = model.bridge.config.qformer
    vision_type = model.vision.model.config.model_type
    if vision_type not in ("blip_2_vision_model", "instructblip_vision_model") or model.vision.index != len(
        model.vision.model.encoder.layers
    ):
        raise CheckpointError(
            f"a transformers BLIP-2 checkpoint needs a full Blip2VisionModel encoder; this model uses "
            f"{vision_type} (layer {model.vision.layer}): save it with format='native'"
        )
    qformer_config = dict(
        vocab_size=q.vocab_size,
        hidden_size=q.hidden_size,
        num_hidden_layers=q.num_layers,
        num_attention_heads=q.num_heads,
        intermediate_size=q.intermediate_size,
        hidden_act=q.hidden_act,
        hidden_dropout_prob=q.dropout,
        attention_probs_dropout_prob=q.attention_dropout,
        max_position_embeddings=q.max_position_embeddings,
        layer_norm_eps=q.layer_norm_eps,
        pad_token_id=q.pad_token_id,
        cross_attention_frequency=q.cross_attention_frequency,
        encoder_hidden_size=q.encoder_hidden_size,
    )
    vision_config = dict(model.vision.model.config.to_dict())
    if abs(vision_config.get("layer_norm_eps", 1e-6) - model.bridge.ln_vision.eps) > 1e-12:
        import warnings

        warnings.warn(  # LAVIS checkpoints: ln_vision eps 1e-5, EVA blocks 1e-6; transformers has one field
            "transformers stores one LayerNorm eps for the whole vision model: "
            f"ln_vision's {model.bridge.ln_vision.eps} "
            f"becomes {vision_config.get('layer_norm_eps')} in the saved checkpoint (outputs differ very slightly)",
            stacklevel=3,
        )
    if arch == "InstructBlipForConditionalGeneration":
        return transformers.InstructBlipConfig(
            vision_config=vision_config,
            qformer_config=qformer_config,
            text_config=model.config.language,
            num_query_tokens=q.num_query_tokens,
            image_token_index=image_token_index,
        )
    if arch == "Blip2ForConditionalGeneration":
        qformer_config["use_qformer_text_input"] = False
    else:
        qformer_config["use_qformer_text_input"] = True
    return transformers.Blip2Config(
        vision_config=vision_config,
        qformer_config=qformer_config,
        text_config=model.config.language,
        num_query_tokens=q.num_query_tokens,
        image_token_index=image_token_index,
        image_text_hidden_size=model.bridge.config.embed_dim or 256,
    )


def image_token_index(model: VisionLanguageModel) -> int | None:
    """Id of the prompt's image placeholder, where transformers scatters the visual prefix (added if missing); it
    must be a row of the LLM's embeddings, since transformers embeds it before replacing it."""
    tok = model.tokenizer
    if tok is None:
        return None
    marker = model.config.prompts.image_token
    index = image_token_id(tok, marker)
    rows = model.language_model.get_input_embeddings().weight.shape[0]
    if index >= rows:
        raise CheckpointError(
            f"the LLM's embedding matrix has {rows} rows but the {marker} token needs id {index}: "
            "resize the LLM's embeddings before saving in transformers format"
        )
    return index


@register_saver("hf", kind="qformer")
def save_hf(model: VisionLanguageModel, directory: str | os.PathLike) -> Path:
    """Write a transformers checkpoint (atomically: a temporary folder renamed into place)."""
    position = model.bridge.config.qformer.image_position
    if position != "none":
        raise CheckpointError(
            f"this Q-Former adds {position!r} positions to its image keys, which "
            "transformers' BLIP-2 classes cannot represent: save it with format='native' (or train with "
            "model.image_position=none for a transformers export)"
        )
    arch = hf_architecture(model)
    image_index = image_token_index(model) if model.language_model is not None else None
    hf_config = _hf_config(model, arch, image_index)
    hf_config.architectures = [arch]
    state: dict[str, torch.Tensor] = {}
    for key, value in model.vision.model.state_dict().items():
        state[f"vision_model.{key}"] = value
    if model.language_model is not None:
        for key, value in model.language_model.state_dict().items():
            state[f"language_model.{key}"] = value
    for key, value in model.bridge.state_dict().items():
        theirs = ours_to_hf(key, arch)
        if theirs is not None:
            state[theirs] = value
    with torch.device("meta"):
        hf = getattr(transformers, arch)(hf_config)
    result = hf.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    tied = set(getattr(hf, "all_tied_weights_keys", {}) or {})
    missing = [k for k in missing if k not in tied and not k.startswith("language_model.lm_head")]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"cannot map onto {arch}: missing {missing[:8]}, unexpected {result.unexpected_keys[:8]}")
    hf.tie_weights()
    return _write_atomically(directory, lambda tmp: _write_hf_files(model, hf, tmp, arch))


def _write_hf_files(model: VisionLanguageModel, hf: nn.Module, tmp: Path, arch: str) -> None:
    hf.save_pretrained(tmp, safe_serialization=True)
    if model.image_processor is not None:
        processor = model.image_processor.config.to_hf_dict()
        (tmp / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    if arch == "Blip2ForImageTextRetrieval":
        if model.qformer_tokenizer is not None:
            model.qformer_tokenizer.save_pretrained(tmp)
        return
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(tmp)
    if arch == "InstructBlipForConditionalGeneration" and model.qformer_tokenizer is not None:
        model.qformer_tokenizer.save_pretrained(tmp / "qformer_tokenizer")
    (tmp / "processor_config.json").write_text(
        json.dumps({"num_query_tokens": model.bridge.config.qformer.num_query_tokens}, indent=2)
    )


def _write_atomically(directory: str | os.PathLike, write) -> Path:
    """Write a checkpoint folder atomically (see :func:`vlbridge.utils.io.atomic_dir`)."""
    from vlbridge.utils.io import atomic_dir

    return atomic_dir(directory, write)
