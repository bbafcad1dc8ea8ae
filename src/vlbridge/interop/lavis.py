"""Convert Salesforce LAVIS BLIP-2 / InstructBLIP checkpoints to transformers state-dict naming.

LAVIS stores its models as ``torch.save({"model": state_dict, ...})`` with its own module names
(``Qformer.bert.*``, ``visual_encoder.*`` of an EVA ViT, ``ln_vision``, ``opt_proj`` ...). The rest of
vlbridge speaks transformers names (`Blip2ForConditionalGeneration`, `InstructBlipForConditionalGeneration`,
`Blip2ForImageTextRetrieval`), so this module only renames and reshapes tensors; it never builds a model.

Key table (LAVIS → transformers), ``N`` a layer index:

=====================================================  =============================================================
LAVIS                                                  transformers
=====================================================  =============================================================
``query_tokens``                                       ``query_tokens``
``visual_encoder.cls_token``                           ``vision_model.embeddings.class_embedding``
``visual_encoder.pos_embed``                           ``vision_model.embeddings.position_embedding``
``visual_encoder.patch_embed.proj.*``                  ``vision_model.embeddings.patch_embedding.*``
``visual_encoder.blocks.N.norm1/norm2.*``              ``vision_model.encoder.layers.N.layer_norm1/layer_norm2.*``
``visual_encoder.blocks.N.attn.qkv.weight``            ``vision_model.encoder.layers.N.self_attn.qkv.weight``
``visual_encoder.blocks.N.attn.q_bias`` + ``v_bias``   ``vision_model.encoder.layers.N.self_attn.qkv.bias``
                                                       = ``cat([q_bias, zeros, v_bias])``
``visual_encoder.blocks.N.attn.proj.*``                ``vision_model.encoder.layers.N.self_attn.projection.*``
``visual_encoder.blocks.N.mlp.fc1/fc2.*``              ``vision_model.encoder.layers.N.mlp.fc1/fc2.*``
``ln_vision.*``                                        ``vision_model.post_layernorm.*``
``Qformer.bert.embeddings.LayerNorm.*``                ``qformer.layernorm.*`` (BLIP-2 kinds and ``blip2_qformer``),
                                                       ``qformer.embeddings.layernorm.*`` (InstructBLIP kinds)
``Qformer.bert.embeddings.{word,position}_embeddings`` ``embeddings.*`` (``blip2_qformer``),
                                                       ``qformer.embeddings.*`` (InstructBLIP kinds),
                                                       ``lavis_extra.*`` (BLIP-2 generation kinds: unused there)
``Qformer.bert.encoder.layer.N.attention.self.*``      ``qformer.encoder.layer.N.attention.attention.*``
``Qformer.bert.encoder.layer.N.crossattention.self.*`` ``qformer.encoder.layer.N.crossattention.attention.*``
``Qformer.bert.encoder.layer.N.{attention,crossattention}.output.*``, ``intermediate_query.*``, ``output_query.*``
                                                       same names under ``qformer.encoder.layer.N.``
``Qformer.bert.encoder.layer.N.{intermediate,output}.*`` (text FFN)
                                                       ``qformer.encoder.layer.N.{intermediate,output}.*``
                                                       (``blip2_qformer``, InstructBLIP kinds), ``lavis_extra.*``
                                                       (BLIP-2 generation kinds: LAVIS deletes them, HF has them only
                                                       with ``use_qformer_text_input=True``, and they are unused)
``opt_proj`` / ``t5_proj`` / ``llm_proj``              ``language_projection``
``opt_model.*`` / ``t5_model.*`` / ``llm_model.*``     ``language_model.*`` (LAVIS usually omits the frozen LLM)
``vision_proj`` / ``text_proj`` / ``itm_head``         ``vision_projection`` / ``text_projection`` / ``itm_head``
``temp`` (ITC temperature), ``Qformer.cls.*`` (ITG)    ``lavis_extra.temp``, ``lavis_extra.Qformer.cls.*``
=====================================================  =============================================================

Dropped on purpose (buffers that transformers rebuilds itself): ``Qformer.bert.embeddings.position_ids`` and
``*.rotary_emb.inv_freq`` of the LLM. Anything else that is not in the table raises `CheckpointError` listing the
keys: nothing is dropped silently.

Facts worth knowing when loading the result:

* LAVIS's EVA ViT-g has no final norm (the 40th block and the norm are removed; features are those of the
  penultimate block), ``ln_vision`` plays that role, and it is exactly transformers' ``post_layernorm``.
* The key-bias third of ``qkv.bias`` is always zero in LAVIS. transformers keeps it as a trainable slice; a
  non-zero key bias adds the same ``q · b_k`` to every score of a query, so softmax attention is invariant to it.
  A checkpoint that already stores a fused ``attn.qkv.bias`` (not LAVIS's layout) is passed through unchanged.
* ``blip2_qformer`` maps onto `Blip2ForImageTextRetrieval` whose Q-Former config must have
  ``use_qformer_text_input=True`` (that flag is what creates the text FFN ``intermediate``/``output``).
* Names of the LLM inside ``language_model`` are passed through as stored; LAVIS's OPT/T5/LLaMA names match
  transformers'.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from vlbridge.errors import CheckpointError

__all__ = [
    "LAVIS_EXTRA_PREFIX",
    "LAVIS_KINDS",
    "TRANSFORMERS_CLASS_FOR_KIND",
    "convert_lavis_state_dict",
    "detect_lavis_kind",
    "read_lavis_checkpoint",
    "split_lavis_extras",
]

LAVIS_EXTRA_PREFIX = "lavis_extra."
"""Prefix of tensors that have no transformers name but may be useful (ITC temperature, ITG head, ...)."""

LAVIS_KINDS: tuple[str, ...] = (
    "blip2_opt",
    "blip2_t5",
    "blip2_llm",
    "instructblip_t5",
    "instructblip_llm",
    "blip2_qformer",
)
"""Checkpoint kinds understood by `convert_lavis_state_dict`."""

TRANSFORMERS_CLASS_FOR_KIND: dict[str, str] = {
    "blip2_opt": "Blip2ForConditionalGeneration",
    "blip2_t5": "Blip2ForConditionalGeneration",
    "blip2_llm": "Blip2ForConditionalGeneration",
    "instructblip_t5": "InstructBlipForConditionalGeneration",
    "instructblip_llm": "InstructBlipForConditionalGeneration",
    "blip2_qformer": "Blip2ForImageTextRetrieval",
}
"""The transformers model class whose state-dict names each kind is converted to."""

# LAVIS attribute names of the LLM projection and of the LLM itself, per family.
_FAMILY_PROJ = {"opt": "opt_proj", "t5": "t5_proj", "llm": "llm_proj"}
_FAMILY_LLM = {"opt": "opt_model", "t5": "t5_model", "llm": "llm_model"}
_KIND_FAMILY = {
    "blip2_opt": "opt",
    "blip2_t5": "t5",
    "blip2_llm": "llm",
    "instructblip_t5": "t5",
    "instructblip_llm": "llm",
}
_INSTRUCT_KINDS = frozenset({"instructblip_t5", "instructblip_llm"})

_WORD_EMB = "Qformer.bert.embeddings.word_embeddings.weight"

# Per-block EVA ViT names (after ``visual_encoder.blocks.N.``) → transformers names (after ``...layers.N.``).
_VIT_BLOCK = {
    "norm1.weight": "layer_norm1.weight",
    "norm1.bias": "layer_norm1.bias",
    "norm2.weight": "layer_norm2.weight",
    "norm2.bias": "layer_norm2.bias",
    "attn.qkv.weight": "self_attn.qkv.weight",
    "attn.qkv.bias": "self_attn.qkv.bias",
    "attn.proj.weight": "self_attn.projection.weight",
    "attn.proj.bias": "self_attn.projection.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
_VIT_TOP = {
    "visual_encoder.cls_token": "vision_model.embeddings.class_embedding",
    "visual_encoder.pos_embed": "vision_model.embeddings.position_embedding",
    "visual_encoder.patch_embed.proj.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual_encoder.patch_embed.proj.bias": "vision_model.embeddings.patch_embedding.bias",
    "ln_vision.weight": "vision_model.post_layernorm.weight",
    "ln_vision.bias": "vision_model.post_layernorm.bias",
}
_VIT_BLOCK_RE = re.compile(r"^visual_encoder\.blocks\.(\d+)\.(.+)$")
_QKV_SPLIT_RE = re.compile(r"^visual_encoder\.blocks\.(\d+)\.attn\.([qv])_bias$")

# Q-Former layer parts (after ``Qformer.bert.encoder.layer.N.``).
_QF_ATTN_RE = re.compile(
    r"^(attention|crossattention)\.(self\.(?:query|key|value)|output\.(?:dense|LayerNorm))\.(weight|bias)$"
)
_QF_QUERY_FFN_RE = re.compile(r"^(intermediate_query\.dense|output_query\.(?:dense|LayerNorm))\.(weight|bias)$")
_QF_TEXT_FFN_RE = re.compile(r"^(intermediate\.dense|output\.(?:dense|LayerNorm))\.(weight|bias)$")
_QF_LAYER_RE = re.compile(r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(.+)$")

_DROPPED_BUFFERS = frozenset({"Qformer.bert.embeddings.position_ids"})
_ROTARY_BUFFER_RE = re.compile(r"\.rotary_emb\.(?:inv_freq|original_inv_freq)$")

# Hints for unknown keys that mean "this is a LAVIS variant transformers cannot represent".
_HINTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"^visual_encoder\.(norm|fc_norm|head)\."),
        "the EVA ViT's final norm/head is not part of BLIP-2 (LAVIS drops it; ln_vision is the post-layernorm)",
    ),
    (re.compile(r"gamma_[12]$"), "ViT layer scale (gamma_1/gamma_2) has no transformers equivalent"),
    (re.compile(r"rel(ative)?_pos"), "relative position bias in the ViT has no transformers equivalent"),
    (
        re.compile(r"^visual_encoder\.(transformer|conv1|class_embedding|ln_pre|ln_post|positional_embedding)"),
        "a CLIP ViT vision encoder (LAVIS 'clip_L') is not convertible to transformers' Blip2VisionModel",
    ),
    (re.compile(r"distance_embedding"), "relative position embeddings in the Q-Former are not supported"),
)


def read_lavis_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a LAVIS checkpoint file into a flat state dict, without executing pickled code.

    The file is read with ``torch.load(path, map_location="cpu", weights_only=True)``, so a file holding anything
    but tensors and plain containers is refused rather than unpickled. ``.safetensors`` files are read with
    safetensors. LAVIS wraps the weights as ``{"model": state_dict, "optimizer": ..., "epoch": ...}``; a
    ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper is unwrapped, and a ``module.`` prefix on every key
    (DistributedDataParallel) is removed.

    Args:
        path: The ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` file.

    Returns:
        The state dict, LAVIS names unchanged, tensors on CPU.

    Raises:
        CheckpointError: The file is missing, is not a torch checkpoint, holds non-tensor objects that
            ``weights_only`` refuses, or holds no tensors.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"LAVIS checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"LAVIS checkpoint is not a file: {path}")
    obj = _load_file(path)

    state: object = obj
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), Mapping):
                state = obj[wrapper]
                break
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"{path} does not hold a state dict (found {type(state).__name__}); expected a mapping of tensor names "
            "to tensors, or {'model': state_dict}"
        )
    non_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        found = ", ".join(sorted(str(k) for k in state)[:10]) or "an empty mapping"
        raise CheckpointError(f"{path} holds no tensors (found: {found})")
    if non_tensors:
        raise CheckpointError(f"{path}: state dict entries that are not tensors: {_short_list(non_tensors)}")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    return tensors


def _load_file(path: Path) -> object:
    """Load ``path`` with safetensors or ``torch.load(weights_only=True)``, mapping failures to CheckpointError."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
        if found:
            raise CheckpointError(
                f"{path} holds objects other than tensors (it pickles {found.group(1)}); refusing to unpickle them "
                "(torch.load weights_only=True). Re-save the file as a plain state dict of tensors."
            ) from exc
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", message)
        reason = detail.group(1).strip() if detail else (message.splitlines()[0] if message else repr(exc))
        raise CheckpointError(
            f"{path} is not a torch checkpoint, or pickles data that torch.load(weights_only=True) refuses: {reason}"
        ) from exc
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, AttributeError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a torch checkpoint ({type(exc).__name__}: {exc})") from exc


def detect_lavis_kind(state_dict: Mapping[str, object]) -> str:
    """Tell which LAVIS model a state dict comes from.

    Rules, from the LAVIS model classes: ``opt_proj`` → ``blip2_opt``; ``t5_proj`` → ``instructblip_t5`` when the
    Q-Former keeps its word embeddings (InstructBLIP feeds the instruction to the Q-Former) else ``blip2_t5``;
    ``llm_proj`` (Vicuna/LLaMA) → ``instructblip_llm`` / ``blip2_llm`` by the same test; no LLM projection but
    ``vision_proj`` / ``text_proj`` / ``itm_head`` → ``blip2_qformer`` (stage 1). The stored LLM weights
    (``opt_model.*`` ...) count like the projection when the projection is absent.

    Args:
        state_dict: A LAVIS-named state dict (only its keys are looked at).

    Returns:
        One of `LAVIS_KINDS`.

    Raises:
        CheckpointError: No rule matches, or the keys mix several LLM families; the message lists the supported
            kinds and the top-level key prefixes found.
    """
    keys = [str(k) for k in state_dict]
    prefixes = {k.split(".", 1)[0] for k in keys}
    families = sorted(family for family in _FAMILY_PROJ if {_FAMILY_PROJ[family], _FAMILY_LLM[family]} & prefixes)
    if len(families) > 1:
        raise CheckpointError(
            f"state dict mixes LLM families {families} (prefixes found: {sorted(prefixes)}); "
            f"supported kinds: {', '.join(LAVIS_KINDS)}"
        )
    text_input = _WORD_EMB in state_dict
    if families == ["opt"]:
        return "blip2_opt"
    if families == ["t5"]:
        return "instructblip_t5" if text_input else "blip2_t5"
    if families == ["llm"]:
        return "instructblip_llm" if text_input else "blip2_llm"
    if {"vision_proj", "text_proj", "itm_head"} & prefixes:
        return "blip2_qformer"
    raise CheckpointError(
        "not a recognised LAVIS BLIP-2 / InstructBLIP state dict: expected an LLM projection "
        "(opt_proj / t5_proj / llm_proj) or stage-1 heads (vision_proj / text_proj / itm_head). "
        f"Supported kinds: {', '.join(LAVIS_KINDS)}. Top-level key prefixes found: {sorted(prefixes) or 'none'}"
    )


def convert_lavis_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, kind: str | None = None
) -> tuple[str, dict[str, torch.Tensor]]:
    """Rename a LAVIS BLIP-2 / InstructBLIP state dict to transformers names.

    See the module docstring for the full key table. The result holds transformers names only, plus tensors
    without a transformers home under ``lavis_extra.<LAVIS name>`` (the ITC temperature ``temp``, the ITG head
    ``Qformer.cls.*``, and the Q-Former text side of BLIP-2 generation checkpoints); use `split_lavis_extras` to
    separate them before ``load_state_dict``. Tensors are not copied, except the fused ViT ``qkv.bias``.

    Args:
        state_dict: LAVIS-named tensors, e.g. from `read_lavis_checkpoint`.
        kind: One of `LAVIS_KINDS`; detected with `detect_lavis_kind` when None.

    Returns:
        ``(kind, converted)``. Load ``converted`` (minus extras) into ``TRANSFORMERS_CLASS_FOR_KIND[kind]``.

    Raises:
        CheckpointError: Unknown ``kind``; keys with no known mapping (all of them are listed); inconsistent
            ViT attention biases (``q_bias`` without ``v_bias``, mismatched shapes, or both a fused and a split
            bias).
    """
    if kind is None:
        kind = detect_lavis_kind(state_dict)
    elif kind not in LAVIS_KINDS:
        raise CheckpointError(f"unknown LAVIS checkpoint kind {kind!r}; supported kinds: {', '.join(LAVIS_KINDS)}")

    family = _KIND_FAMILY.get(kind)
    instruct = kind in _INSTRUCT_KINDS
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    split_biases: dict[int, dict[str, torch.Tensor]] = {}

    def put(name: str, tensor: torch.Tensor, source: str) -> None:
        if name in converted:
            raise CheckpointError(f"two LAVIS keys map to {name!r} (the second is {source!r})")
        converted[name] = tensor

    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"state dict entry {key!r} is a {type(tensor).__name__}, not a tensor")
        if key in _DROPPED_BUFFERS:
            continue
        if key == "query_tokens":
            put(key, tensor, key)
            continue
        if key in _VIT_TOP:
            put(_VIT_TOP[key], tensor, key)
            continue
        match = _QKV_SPLIT_RE.match(key)
        if match:
            split_biases.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
            continue
        match = _VIT_BLOCK_RE.match(key)
        if match and match.group(2) in _VIT_BLOCK:
            put(f"vision_model.encoder.layers.{match.group(1)}.{_VIT_BLOCK[match.group(2)]}", tensor, key)
            continue
        if key.startswith("Qformer."):
            name = _qformer_name(key, kind, instruct)
            if name is None:
                unknown.append(key)
            else:
                put(name, tensor, key)
            continue
        if family is not None:
            proj, llm = _FAMILY_PROJ[family], _FAMILY_LLM[family]
            if key in (f"{proj}.weight", f"{proj}.bias"):
                put("language_projection" + key[len(proj) :], tensor, key)
                continue
            if key.startswith(llm + "."):
                if not _ROTARY_BUFFER_RE.search(key):
                    put("language_model" + key[len(llm) :], tensor, key)
                continue
        else:  # blip2_qformer: the stage-1 heads
            head = key.split(".", 1)
            if key == "temp":
                put(LAVIS_EXTRA_PREFIX + key, tensor, key)
                continue
            if len(head) == 2 and head[0] in ("vision_proj", "text_proj", "itm_head") and head[1] in ("weight", "bias"):
                new = {"vision_proj": "vision_projection", "text_proj": "text_projection"}.get(head[0], head[0])
                put(f"{new}.{head[1]}", tensor, key)
                continue
        unknown.append(key)

    if unknown:
        raise CheckpointError(_unknown_message(kind, unknown))
    for layer, biases in sorted(split_biases.items()):
        _fuse_qkv_bias(layer, biases, converted)
    return kind, converted


def split_lavis_extras(
    converted: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Separate transformers-named tensors from the ``lavis_extra.`` ones.

    Args:
        converted: The second item returned by `convert_lavis_state_dict`.

    Returns:
        ``(model_state_dict, extras)``; ``extras`` keeps the original LAVIS names (the prefix removed), e.g.
        ``"temp"`` and ``"Qformer.cls.predictions.decoder.weight"``.
    """
    model = {k: v for k, v in converted.items() if not k.startswith(LAVIS_EXTRA_PREFIX)}
    extras = {k[len(LAVIS_EXTRA_PREFIX) :]: v for k, v in converted.items() if k.startswith(LAVIS_EXTRA_PREFIX)}
    return model, extras


def _qformer_name(key: str, kind: str, instruct: bool) -> str | None:
    """Return the transformers name of a ``Qformer.*`` key for ``kind``, or None when it has no mapping."""
    generation = kind != "blip2_qformer" and not instruct  # BLIP-2 + LLM: the Q-Former's text side is unused
    if key.startswith("Qformer.cls."):
        return LAVIS_EXTRA_PREFIX + key
    if key in ("Qformer.bert.embeddings.LayerNorm.weight", "Qformer.bert.embeddings.LayerNorm.bias"):
        suffix = key.rsplit(".", 1)[1]
        return f"qformer.embeddings.layernorm.{suffix}" if instruct else f"qformer.layernorm.{suffix}"
    match = re.match(r"^Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.weight$", key)
    if match:
        if generation:
            return LAVIS_EXTRA_PREFIX + key
        return f"qformer.embeddings.{match.group(1)}.weight" if instruct else f"embeddings.{match.group(1)}.weight"
    match = _QF_LAYER_RE.match(key)
    if not match:
        return None
    layer, rest = match.groups()
    if _QF_ATTN_RE.match(rest):
        rest = rest.replace(".self.", ".attention.", 1)
    elif _QF_QUERY_FFN_RE.match(rest):
        pass
    elif _QF_TEXT_FFN_RE.match(rest):
        if generation:
            return LAVIS_EXTRA_PREFIX + key
    else:
        return None
    return f"qformer.encoder.layer.{layer}.{rest}"


def _fuse_qkv_bias(layer: int, biases: dict[str, torch.Tensor], converted: dict[str, torch.Tensor]) -> None:
    """Write ``cat([q_bias, zeros, v_bias])`` as the fused qkv bias of ViT ``layer``, after checking shapes."""
    where = f"visual_encoder.blocks.{layer}.attn"
    if set(biases) != {"q", "v"}:
        have, lack = next(iter(biases)), ({"q", "v"} - set(biases)).pop()
        raise CheckpointError(f"{where}.{have}_bias is present but {where}.{lack}_bias is missing")
    q_bias, v_bias = biases["q"], biases["v"]
    if q_bias.dim() != 1 or q_bias.shape != v_bias.shape:
        raise CheckpointError(
            f"{where}: q_bias {tuple(q_bias.shape)} and v_bias {tuple(v_bias.shape)} must be 1-D of equal size"
        )
    name = f"vision_model.encoder.layers.{layer}.self_attn.qkv"
    if f"{name}.bias" in converted:
        raise CheckpointError(f"{where} has both a fused qkv.bias and q_bias/v_bias; keep one of them")
    weight = converted.get(f"{name}.weight")
    if weight is not None and weight.shape[0] != 3 * q_bias.shape[0]:
        raise CheckpointError(
            f"{where}: qkv.weight has {weight.shape[0]} output rows but q_bias/v_bias imply {3 * q_bias.shape[0]}"
        )
    converted[f"{name}.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias.to(q_bias.dtype)])


def _unknown_message(kind: str, unknown: list[str]) -> str:
    """Build the CheckpointError text for keys without a mapping, with hints for known unsupported variants."""
    hints = sorted({hint for key in unknown for pattern, hint in _HINTS if pattern.search(key)})
    counts: dict[str, int] = {}
    for key in unknown:
        counts[key.split(".", 1)[0]] = counts.get(key.split(".", 1)[0], 0) + 1
    by_prefix = ", ".join(f"{prefix} x{n}" for prefix, n in sorted(counts.items()))
    message = (
        f"{len(unknown)} LAVIS key(s) have no transformers name for kind {kind!r} (by prefix: {by_prefix}): "
        f"{_short_list(sorted(unknown))}"
    )
    if hints:
        message += ". Note: " + "; ".join(hints)
    return message


def _short_list(items: list[str], limit: int = 20) -> str:
    """Join ``items`` with commas, ending in '... (+N more)' past ``limit``."""
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... (+{len(items) - limit} more)"


# ------------------------------------------------------------------------------------------------ model loading
