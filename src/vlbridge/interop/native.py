"""vlbridge's own checkpoint format: `vlbridge.json` (config) + `model.safetensors` + tokenizers + processor.

Unlike the transformers format it can hold any supported vision family and layer choice, the ITC
temperature, and the stage-1 heads next to an LLM. Written atomically; read without unpickling anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from vlbridge.encoders.vision import FrozenVisionEncoder, build_vision_model
from vlbridge.errors import CheckpointError
from vlbridge.interop.hf import _write_atomically
from vlbridge.models.blip2 import Blip2, Blip2Config

CONFIG_NAME = "vlbridge.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


def is_native(path: Path) -> bool:
    return (path / CONFIG_NAME).exists()


def save_native(model: Blip2, directory: str | os.PathLike) -> Path:
    def write(tmp: Path) -> None:
        meta = {"format_version": FORMAT_VERSION, "model": "blip2", "config": model.config.to_dict()}
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        state = {}
        seen: dict[int, str] = {}
        for key, value in model.state_dict().items():
            ptr = value.data_ptr()
            if ptr in seen and value.numel():  # tied weights (an LLM's lm_head): stored once
                continue
            seen[ptr] = key
            state[key] = value.detach().contiguous()
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp / "tokenizer")
        if model.qformer_tokenizer is not None:
            model.qformer_tokenizer.save_pretrained(tmp / "qformer_tokenizer")
        if model.image_processor is not None:
            (tmp / "preprocessor_config.json").write_text(json.dumps(model.image_processor.config.to_hf_dict()))

    return _write_atomically(directory, write)


def load_native(path: Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Blip2:
    from transformers import AutoTokenizer

    from vlbridge.data.images import ImageProcessor, ImageProcessorConfig

    meta = json.loads((path / CONFIG_NAME).read_text())
    if meta.get("format_version") != FORMAT_VERSION or meta.get("model") != "blip2":
        raise CheckpointError(
            f"{path}: unsupported vlbridge checkpoint {meta.get('model')} v{meta.get('format_version')}"
        )
    config = Blip2Config.from_dict(meta["config"])
    vision = FrozenVisionEncoder(build_vision_model(config.vision), layer=config.vision_layer)
    lm = None
    if config.language is not None:
        lm_config = transformers.AutoConfig.for_model(**config.language)
        auto = transformers.AutoModelForSeq2SeqLM if lm_config.is_encoder_decoder else transformers.AutoModelForCausalLM
        lm = auto.from_config(lm_config)
    model = Blip2(config=config, vision=vision, language_model=lm)
    weights = path / WEIGHTS_NAME
    if not weights.exists():
        raise CheckpointError(f"{path}: {WEIGHTS_NAME} is missing")
    state = load_file(str(weights))
    if lm is not None:
        lm.tie_weights()
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not _alias_loaded(model, k, state)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{weights}: missing {missing[:8]}, unexpected {result.unexpected_keys[:8]}")
    if (path / "tokenizer").exists():
        model.tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    if (path / "qformer_tokenizer").exists():
        model.qformer_tokenizer = AutoTokenizer.from_pretrained(path / "qformer_tokenizer")
    if (path / "preprocessor_config.json").exists():
        model.image_processor = ImageProcessor(ImageProcessorConfig.from_pretrained(path))
    if dtype is not None:
        model.vision.to(dtype)
        if lm is not None:
            lm.to(dtype)
    return model.to(device)


def _alias_loaded(model: Blip2, key: str, state: dict) -> bool:
    """A tied parameter (stored once under another name) counts as loaded if one of its names was."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if key not in params:
        return False
    return any(other in state for other, p in params.items() if p is params[key] and other != key)
