"""vlbridge's own checkpoint format: `vlbridge.json` (config) + `model.safetensors` + tokenizers + processor.

Unlike the transformers format it can hold any supported vision family and layer choice, the ITC
temperature, and the stage-1 heads next to an LLM. Written atomically; read without unpickling anything.

`vlbridge.json` lists the size and digests of every other file (`"files"`). Loading checks each file's size
and a sample digest (a few blocks, milliseconds for any size), so a truncated, zeroed or swapped file is refused
with its name; :func:`verify_native` (or `vlbridge.load(..., verify=True)`) checks every byte. Folders written
before the table existed load without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from vlbridge.encoders.vision import FrozenVisionEncoder, build_vision_model
from vlbridge.errors import CheckpointError, VlbridgeError
from vlbridge.models.vlm import VisionLanguageModel, VLMConfig
from vlbridge.utils.formats import register_saver
from vlbridge.utils.io import atomic_dir, folder_digests, storage_error, verify_digests
from vlbridge.utils.state import legacy_keys

CONFIG_NAME = "vlbridge.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
MODEL_NAME = "vision-language"  # "blip2" before bridges were parts; both are read
BRIDGE_TOKENIZER = "qformer_tokenizer"  # the folder of the bridge's own tokenizer (BLIP-2's name for it)
_EDITED = f'if you edited it on purpose, save the model again (or delete "files" from {CONFIG_NAME})'


def is_native(path: Path) -> bool:
    return (path / CONFIG_NAME).exists()


@register_saver("native")
def save_native(model: VisionLanguageModel, directory: str | os.PathLike) -> Path:
    """Write `model` as a vlbridge checkpoint folder (atomically: the old folder stays until the new one is whole).

    Raises:
        CheckpointError: A weight is NaN or infinite (nothing is written).
        StorageError: The folder cannot be written (full disk, read-only).
    """
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"refusing to save a model with non-finite weights: {len(bad)} tensors (e.g. {bad[0]})")

    def write(tmp: Path) -> None:
        state = {}
        seen: dict[int, str] = {}
        for key, value in model.state_dict().items():
            ptr = value.data_ptr()
            if ptr in seen and value.numel():  # tied weights (an LLM's lm_head): stored once
                continue
            seen[ptr] = key
            state[key] = value.detach().contiguous()
        try:
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        except Exception as exc:  # safetensors reports a full disk as its own error type
            raise storage_error(exc, Path(directory) / WEIGHTS_NAME) from exc
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp / "tokenizer")
        if model.bridge_tokenizer is not None:
            model.bridge_tokenizer.save_pretrained(tmp / BRIDGE_TOKENIZER)
        if model.image_processor is not None:
            (tmp / "preprocessor_config.json").write_text(json.dumps(model.image_processor.config.to_hf_dict()))
        meta = {"format_version": FORMAT_VERSION, "model": MODEL_NAME, "config": model.config.to_dict()}
        meta["files"] = folder_digests(tmp)  # written last: everything but itself
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))

    return atomic_dir(directory, write)


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / CONFIG_NAME}: unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / CONFIG_NAME}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION or meta.get("model") not in (MODEL_NAME, "blip2"):
        raise CheckpointError(
            f"{path}: unsupported vlbridge checkpoint {meta.get('model')} v{meta.get('format_version')}"
        )
    if "files" in meta and not isinstance(meta["files"], dict):
        raise CheckpointError(f"{path / CONFIG_NAME}: 'files' must be a mapping")
    return meta


def verify_native(path: str | os.PathLike, *, full: bool = True) -> None:
    """Check every file of a vlbridge checkpoint against the digests in its `vlbridge.json`.

    Args:
        path: The checkpoint folder.
        full: Every byte (default); False: sizes and sampled blocks only, as every load does.

    Raises:
        CheckpointError: A file is missing, truncated or corrupted, or the folder has no checksum table.
    """
    path = Path(path)
    meta = _read_meta(path)
    if "files" not in meta:
        raise CheckpointError(f"{path}: written without checksums (an older vlbridge); cannot verify it")
    problem = verify_digests(path, meta["files"], full=full)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}; {_EDITED}")


def load_native(
    path: Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, verify: bool = False
) -> VisionLanguageModel:
    """Read a vlbridge checkpoint folder.

    Args:
        path: The folder.
        device: Where to put the model.
        dtype: dtype of the frozen vision encoder and LLM.
        verify: Check every byte against the stored digests first (sizes and sampled blocks are always checked).

    Raises:
        CheckpointError: Any damage or inconsistency, named: unreadable or malformed `vlbridge.json`, an unknown
            or mistyped config key, a truncated or corrupted file, missing / unexpected / misshapen weights, an
            unreadable tokenizer or processor config.
    """
    from transformers import AutoTokenizer

    from vlbridge.data.images import ImageProcessor, ImageProcessorConfig

    meta = _read_meta(path)
    if "files" in meta:
        problem = verify_digests(path, meta["files"], full=verify)
        if problem is not None:
            raise CheckpointError(f"{path}: {problem}; {_EDITED}")
    elif verify:
        raise CheckpointError(f"{path}: written without checksums (an older vlbridge); cannot verify it")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{path}: {WEIGHTS_NAME} is missing")
    try:
        if not isinstance(meta.get("config"), dict):
            raise TypeError("'config' must be a JSON object")
        config = VLMConfig.from_dict(meta["config"])
        vision = FrozenVisionEncoder(build_vision_model(config.vision), layer=config.vision_layer)
        lm = None
        if config.language is not None:
            lm_config = transformers.AutoConfig.for_model(**config.language)
            auto = (
                transformers.AutoModelForSeq2SeqLM
                if lm_config.is_encoder_decoder
                else transformers.AutoModelForCausalLM
            )
            lm = auto.from_config(lm_config)
        model = VisionLanguageModel(config=config, vision=vision, language_model=lm)
    except VlbridgeError as exc:
        raise CheckpointError(f"{path / CONFIG_NAME}: {exc}") from exc
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # unknown key, wrong type, bad value
        raise CheckpointError(f"{path / CONFIG_NAME}: invalid model config ({type(exc).__name__}: {exc})") from exc
    try:
        state = legacy_keys(load_file(str(weights)))
    except Exception as exc:  # safetensors' own error for a truncated or garbled file
        raise CheckpointError(f"{weights}: unreadable ({exc})") from exc
    if lm is not None:
        lm.tie_weights()
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a size mismatch
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{weights}: weights do not fit the config in {CONFIG_NAME} ({detail})") from exc
    missing = [k for k in result.missing_keys if not _alias_loaded(model, k, state)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{weights}: missing {missing[:8]}, unexpected {result.unexpected_keys[:8]}")
    try:
        if (path / "tokenizer").exists():
            model.tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        if (path / BRIDGE_TOKENIZER).exists():
            model.bridge_tokenizer = AutoTokenizer.from_pretrained(path / BRIDGE_TOKENIZER)
        if (path / "preprocessor_config.json").exists():
            model.image_processor = ImageProcessor(ImageProcessorConfig.from_pretrained(path))
    except VlbridgeError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    except Exception as exc:  # tokenizers / transformers raise many kinds for a corrupt JSON file
        raise CheckpointError(f"{path}: unreadable tokenizer or processor files ({type(exc).__name__}: {exc})") from exc
    if dtype is not None:
        model.vision.to(dtype)
        if lm is not None:
            lm.to(dtype)
    return model.to(device)


def _alias_loaded(model: VisionLanguageModel, key: str, state: dict) -> bool:
    """A tied parameter (stored once under another name) counts as loaded if one of its names was."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if key not in params:
        return False
    return any(other in state for other, p in params.items() if p is params[key] and other != key)
