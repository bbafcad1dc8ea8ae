"""Assemble a BLIP-2 model from parts for training: any frozen vision encoder, a Q-Former initialised
from BERT or from scratch, optionally a frozen LLM — the stage-1 / stage-2 starting points."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlbridge.bridges.base import bridge_config
from vlbridge.bridges.qformer_init import initial_qformer
from vlbridge.encoders.vision import FrozenVisionEncoder, build_vision_model, load_vision_model
from vlbridge.errors import CheckpointError, ConfigError
from vlbridge.models.vlm import PromptStyle, VisionLanguageModel, VLMConfig
from vlbridge.utils.hub import resolve
from vlbridge.utils.state import legacy_keys


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
    # Position on the Q-Former's image keys (`bridges.position`): "none" (BLIP-2 as published, exportable to
    # transformers), "sincos" or "learned".
    image_position: str = "none"
    embed_dim: int | None = 256  # ITC/ITM/ITG heads (stage 1); None for stage 2
    language_model: str | None = None  # stage 2: a causal LM or T5 (frozen)
    init_from: str | None = None  # start from a vlbridge checkpoint (e.g. the stage-1 result)
    instruct: bool = False  # InstructBLIP: prompts also go into the Q-Former
    caption_prompt: str = ""  # stage 2: prompt for caption data (e.g. "a photo of")
    dtype: str = "float32"  # dtype of the frozen encoder / LLM
    # Another bridge than the Q-Former fields above: a spec {"kind": ..., **fields}, e.g. LLaVA's
    # {"kind": "projector", "projector_type": "mlp2x_gelu"} (`vlbridge.bridges`); None: the Q-Former.
    bridge: dict[str, Any] | None = None
    vision_select: str = "all"  # "patch": drop the encoder's [CLS] token (LLaVA's default)
    freeze_qformer: bool = False  # MiniGPT-4: the (init_from) Q-Former stays frozen, only the projection trains
    language_training: str = "frozen"  # "frozen" | "full" | "lora" (LLaVA stage 2)
    lora: dict[str, Any] = field(default_factory=dict)  # r, alpha, dropout
    # Weights of init_from NOT to load (name prefixes), e.g. ["bridge.language_projection"] when the LLM changes.
    init_skip: list[str] = field(default_factory=list)


def build_model(cfg: ModelConfig) -> VisionLanguageModel:
    """A trainable BLIP-2 model: frozen parts loaded, bridge initialised, tokenizers and preprocessing set.

    transformers' load reports and progress bars are silenced while loading: the parts are loaded into other
    architectures on purpose (a BERT without its pooler, a CLIP vision tower out of a dual encoder), so their
    "UNEXPECTED" keys are expected; what must fit is checked here (`load_trainable`).
    """
    with quiet_transformers():
        return _build_model(cfg)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers at error verbosity and without progress bars, restored afterwards."""
    import transformers

    verbosity = transformers.utils.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _build_model(cfg: ModelConfig) -> VisionLanguageModel:
    import transformers

    from vlbridge.data.images import ImageProcessor, ImageProcessorConfig

    saved = None
    other_bridge = cfg.bridge is not None and cfg.bridge.get("kind", "qformer") != "qformer"
    if cfg.init_from is not None:  # the architecture the checkpoint was saved with, unless the config says otherwise
        saved = saved_architecture(cfg.init_from)
        if saved is not None and not other_bridge:
            cfg = inherit_architecture(cfg, saved, cfg.init_from)
    if not cfg.vision and saved is None:
        raise ConfigError("model.vision is required: a vision model folder or hub id")
    dtype = getattr(torch, cfg.dtype)
    if cfg.vision:
        vision_path = resolve(cfg.vision)
        vision = FrozenVisionEncoder(load_vision_model(vision_path, dtype=dtype), layer=cfg.vision_layer)
    else:  # the frozen encoder stored in the init_from checkpoint (config + weights)
        vision_path = Path(cfg.init_from)
        vision = FrozenVisionEncoder(build_vision_model(saved.vision).to(dtype), layer=cfg.vision_layer)
    if other_bridge:
        bridge, qformer, tokenizer = dict(cfg.bridge), None, None
    else:
        bridge, qformer, tokenizer = initial_qformer(cfg, vision)
    lm = lm_tokenizer = None
    if cfg.language_model is not None:
        lm_path = resolve(cfg.language_model)
        lm_config = transformers.AutoConfig.from_pretrained(lm_path)
        auto = transformers.AutoModelForSeq2SeqLM if lm_config.is_encoder_decoder else transformers.AutoModelForCausalLM
        lm = auto.from_pretrained(lm_path, dtype=dtype)
        lm_tokenizer = transformers.AutoTokenizer.from_pretrained(lm_path)
    t5 = lm is not None and lm.config.is_encoder_decoder
    config = VLMConfig(
        bridge=bridge,
        vision=_vision_config(vision),
        vision_layer=cfg.vision_layer,
        vision_select=cfg.vision_select,
        language=None if lm is None else lm.config.to_dict(),
        prompts=PromptStyle(
            vqa_template="Question: {} Short answer:" if t5 else "Question: {} Answer:",
            caption_prompt=cfg.caption_prompt,
            # Without a placeholder, a projector's image goes first in the text (LLaVA); a Q-Former's before it all.
            image_first="<image>\n" if other_bridge else None,
        ),
        language_training=cfg.language_training,
        lora=dict(cfg.lora),
    )
    model = VisionLanguageModel(config=config, vision=vision, language_model=lm)
    if qformer is not None:
        model.bridge.qformer.load_state_dict(qformer.state_dict())
    model.bridge_tokenizer = tokenizer
    model.tokenizer = lm_tokenizer
    if (vision_path / "preprocessor_config.json").exists():
        image_config = ImageProcessorConfig.from_pretrained(vision_path)
    else:
        image_config = ImageProcessorConfig(image_size=(vision.image_size, vision.image_size))
    model.image_processor = ImageProcessor(image_config)
    if cfg.init_from is not None:
        load_trainable(model, cfg.init_from, vision=not cfg.vision, skip=tuple(cfg.init_skip))
    return model


def saved_architecture(source: str | os.PathLike) -> VLMConfig | None:
    """The model config a vlbridge checkpoint folder was saved with (its `vlbridge.json`), or None without one."""
    file = Path(source) / "vlbridge.json"
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
        return VLMConfig.from_dict(meta["config"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: unreadable model config ({type(exc).__name__}: {exc})") from exc


# Q-Former fields that follow the vision encoder (or are ModelConfig fields of their own) rather than `model.qformer`.
_NOT_QFORMER_FIELDS = {"num_query_tokens", "cross_attention_frequency", "encoder_hidden_size", "image_position",
                       "num_image_tokens"}  # fmt: skip


def inherit_architecture(cfg: ModelConfig, saved: VLMConfig, source: str | os.PathLike) -> ModelConfig:
    """`cfg` with the architecture of an `init_from` checkpoint filled in.

    Inherited, so a stage-2 config need not repeat them: the Q-Former's sizes, query count, cross-attention
    frequency and image position (the checkpoint's weights replace any BERT initialisation, so `qformer_init` is
    not loaded), its Q-Former tokenizer, the vision layer, and — when `model.vision` is empty — the frozen vision
    encoder stored in the checkpoint. A field the config sets to something other than its default and other than
    the checkpoint's value is an error, since the weights could not fit.

    Raises:
        ConfigError: naming each conflicting field with both values.
    """
    defaults = ModelConfig()
    if saved.bridge.get("kind") != "qformer":
        raise ConfigError(
            f"model.init_from={source} has a {saved.bridge.get('kind')!r} bridge; this builder makes a Q-Former"
        )
    q = bridge_config(saved.bridge)[1].qformer
    changes: dict[str, Any] = {}
    conflicts = []

    def take(name: str, theirs: Any) -> None:
        mine = getattr(cfg, name)
        if mine == theirs:
            return
        if mine != getattr(defaults, name):
            conflicts.append(f"model.{name}={mine!r} (saved with {theirs!r})")
        changes[name] = theirs

    take("num_query_tokens", q.num_query_tokens)
    take("cross_attention_frequency", q.cross_attention_frequency)
    if hasattr(defaults, "image_position") and hasattr(q, "image_position"):
        take("image_position", q.image_position)
    if not cfg.vision:
        take("vision_layer", saved.vision_layer)
    sizes = {f.name: getattr(q, f.name) for f in dataclasses.fields(q) if f.name not in _NOT_QFORMER_FIELDS}
    for key, value in cfg.qformer.items():
        if key in sizes and sizes[key] != value and key not in ("dropout", "attention_dropout"):
            conflicts.append(f"model.qformer.{key}={value!r} (saved with {sizes[key]!r})")
    if conflicts:
        raise ConfigError(
            f"model.init_from={source} was saved with another architecture: {'; '.join(conflicts)}. "
            "Drop these settings to inherit the checkpoint's"
        )
    changes["qformer"] = {**sizes, **{k: v for k, v in cfg.qformer.items() if k in ("dropout", "attention_dropout")}}
    changes["qformer_init"] = None
    tokenizer = Path(source) / "qformer_tokenizer"
    if cfg.tokenizer is None and tokenizer.is_dir():
        changes["tokenizer"] = str(tokenizer)
    elif cfg.tokenizer is None and cfg.qformer_init is not None:
        changes["tokenizer"] = cfg.qformer_init
    return dataclasses.replace(cfg, **changes)


def _vision_config(vision: FrozenVisionEncoder) -> dict[str, Any]:
    d = vision.model.config.to_dict()
    d["model_type"] = vision.model.config.model_type
    return d


def load_trainable(
    model: VisionLanguageModel, source: str, *, vision: bool = False, skip: tuple[str, ...] = ()
) -> None:
    """Copy the bridge weights of a vlbridge checkpoint (native or training) into `model`.

    Every weight of the checkpoint that this model has must fit its shape; weights the model lacks (e.g. the
    stage-1 heads in a stage-2 model) are left out, and the model's weights the checkpoint lacks (e.g. a new
    language projection) keep their initialisation.

    Args:
        model: The freshly built model.
        source: A vlbridge checkpoint folder (or its `model.safetensors`).
        vision: Also load the frozen vision encoder's weights from the checkpoint (it was built from there).
        skip: Name prefixes not to load (they keep their initialisation).

    Raises:
        CheckpointError: No weights file, no weight in common, or shapes that differ (each tensor named, with
            both shapes), or vision weights missing when `vision` is set.
    """
    from safetensors.torch import load_file

    path = Path(source)
    weights = path / "model.safetensors" if path.is_dir() else path
    if not weights.exists():
        raise CheckpointError(f"{source}: no model.safetensors")
    everything = load_file(str(weights))
    everything = legacy_keys(everything)
    state = {k: v for k, v in everything.items() if not k.startswith(("vision.", "language_model.", *skip))}
    own = model.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and own[k].shape != v.shape]  # fmt: skip
    if mismatched:
        raise CheckpointError(
            f"{source}: {len(mismatched)} weights do not fit this model (checkpoint vs model): "
            f"{'; '.join(mismatched[:6])}{' ...' if len(mismatched) > 6 else ''}. The model config differs from the "
            "one the checkpoint was saved with (Q-Former sizes, query count, vision width, embed_dim)"
        )
    usable = {k: v for k, v in state.items() if k in own}
    if not usable:
        raise CheckpointError(f"{source}: no weights fit this model")
    if vision:
        prefix = "vision."
        vision_state = {k[len(prefix) :]: v for k, v in everything.items() if k.startswith(prefix)}
        try:
            result = model.vision.load_state_dict(vision_state, strict=False)
        except RuntimeError as exc:
            raise CheckpointError(f"{source}: vision weights do not fit ({' '.join(str(exc).split())[:300]})") from exc
        if result.missing_keys:
            raise CheckpointError(
                f"{source}: has no frozen vision weights ({result.missing_keys[:3]} ...): set model.vision"
            )
    model.load_state_dict(usable, strict=False)
