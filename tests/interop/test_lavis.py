"""Round-trip tests for the LAVIS → transformers checkpoint converter.

Each test builds a tiny random transformers model, rewrites its state dict in LAVIS naming with an explicit inverse
table written here (independently of the converter), saves it like LAVIS does, and checks that reading and
converting gives back exactly the transformers state dict.
"""

from __future__ import annotations

import pathlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
)

from vlbridge.errors import CheckpointError
from vlbridge.interop.lavis import (
    LAVIS_KINDS,
    TRANSFORMERS_CLASS_FOR_KIND,
    convert_lavis_state_dict,
    detect_lavis_kind,
    read_lavis_checkpoint,
    split_lavis_extras,
)

VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
QF_POSITIONS = 16
OPT = dict(
    model_type="opt",
    hidden_size=16,
    word_embed_proj_dim=16,
    ffn_dim=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    vocab_size=50,
    max_position_embeddings=32,
)
T5 = dict(
    model_type="t5",
    d_model=16,
    d_kv=4,
    d_ff=32,
    num_layers=1,
    num_decoder_layers=1,
    num_heads=2,
    vocab_size=50,
    relative_attention_num_buckets=8,
)
LLAMA = dict(
    model_type="llama",
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    vocab_size=50,
    max_position_embeddings=64,
)


def _qformer(**extra: object) -> dict[str, object]:
    """Tiny Q-Former config; cross-attention every 2nd layer so layer 1 has none, as in BLIP-2."""
    return dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        cross_attention_frequency=2,
        encoder_hidden_size=32,
        vocab_size=64,
        max_position_embeddings=QF_POSITIONS,
        **extra,
    )


def _build(kind: str) -> torch.nn.Module:
    """A tiny transformers model of the class `kind` converts to."""
    if kind == "blip2_qformer":
        config = Blip2Config(
            vision_config=VISION, qformer_config=_qformer(use_qformer_text_input=True), num_query_tokens=4
        )
        return Blip2ForImageTextRetrieval(config).eval()
    text = {"blip2_opt": OPT, "blip2_t5": T5, "blip2_llm": LLAMA, "instructblip_t5": T5, "instructblip_llm": LLAMA}[
        kind
    ]
    if kind.startswith("instructblip"):
        config = InstructBlipConfig(
            vision_config=VISION, qformer_config=_qformer(), text_config=text, num_query_tokens=4
        )
        return InstructBlipForConditionalGeneration(config).eval()
    config = Blip2Config(vision_config=VISION, qformer_config=_qformer(), text_config=text, num_query_tokens=4)
    return Blip2ForConditionalGeneration(config).eval()


def _randomize(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fill every float tensor with distinct random values (zero key-bias third, as LAVIS has) and return a copy."""
    gen = torch.Generator().manual_seed(seed)
    new = {}
    for key, value in model.state_dict().items():
        tensor = torch.randn(value.shape, generator=gen) if value.is_floating_point() else value.clone()
        if key.endswith("self_attn.qkv.bias"):
            third = tensor.numel() // 3
            tensor[third : 2 * third] = 0
        new[key] = tensor
    model.load_state_dict(new)  # tied weights (lm_head / embeddings) end up sharing the last value written
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------------
# The inverse table (transformers → LAVIS), written out explicitly.
# ---------------------------------------------------------------------------------------------------------------------

VIT_BLOCK_INVERSE = [
    ("layer_norm1.weight", "norm1.weight"),
    ("layer_norm1.bias", "norm1.bias"),
    ("layer_norm2.weight", "norm2.weight"),
    ("layer_norm2.bias", "norm2.bias"),
    ("self_attn.qkv.weight", "attn.qkv.weight"),
    ("self_attn.projection.weight", "attn.proj.weight"),
    ("self_attn.projection.bias", "attn.proj.bias"),
    ("mlp.fc1.weight", "mlp.fc1.weight"),
    ("mlp.fc1.bias", "mlp.fc1.bias"),
    ("mlp.fc2.weight", "mlp.fc2.weight"),
    ("mlp.fc2.bias", "mlp.fc2.bias"),
]
QF_ATTENTION_INVERSE = [
    ("attention.query", "self.query"),
    ("attention.key", "self.key"),
    ("attention.value", "self.value"),
    ("output.dense", "output.dense"),
    ("output.LayerNorm", "output.LayerNorm"),
]
QF_FFN = ["intermediate_query.dense", "output_query.dense", "output_query.LayerNorm"]
QF_TEXT_FFN = ["intermediate.dense", "output.dense", "output.LayerNorm"]
LAVIS_PROJ = {"blip2_opt": "opt_proj", "blip2_t5": "t5_proj", "blip2_llm": "llm_proj"}
LAVIS_PROJ |= {"instructblip_t5": "t5_proj", "instructblip_llm": "llm_proj"}
LAVIS_LLM = {"blip2_opt": "opt_model", "blip2_t5": "t5_model", "blip2_llm": "llm_model"}
LAVIS_LLM |= {"instructblip_t5": "t5_model", "instructblip_llm": "llm_model"}


def to_lavis(hf: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """Rename a transformers state dict to LAVIS naming; every transformers key must be consumed."""
    hf = dict(hf)
    out: dict[str, torch.Tensor] = {}

    def move(src: str, dst: str) -> None:
        out[dst] = hf.pop(src)

    move("query_tokens", "query_tokens")
    move("vision_model.embeddings.class_embedding", "visual_encoder.cls_token")
    move("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed")
    move("vision_model.embeddings.patch_embedding.weight", "visual_encoder.patch_embed.proj.weight")
    move("vision_model.embeddings.patch_embedding.bias", "visual_encoder.patch_embed.proj.bias")
    move("vision_model.post_layernorm.weight", "ln_vision.weight")
    move("vision_model.post_layernorm.bias", "ln_vision.bias")
    for i in range(VISION["num_hidden_layers"]):
        src, dst = f"vision_model.encoder.layers.{i}.", f"visual_encoder.blocks.{i}."
        for hf_name, lavis_name in VIT_BLOCK_INVERSE:
            move(src + hf_name, dst + lavis_name)
        bias = hf.pop(src + "self_attn.qkv.bias")
        third = bias.numel() // 3
        if torch.any(bias[third : 2 * third] != 0):
            raise ValueError("LAVIS has no key bias: a non-zero middle third cannot be written in LAVIS naming")
        out[dst + "attn.q_bias"] = bias[:third].clone()
        out[dst + "attn.v_bias"] = bias[2 * third :].clone()

    instruct = kind.startswith("instructblip")
    text_side = instruct or kind == "blip2_qformer"
    for i in range(2):
        src, dst = f"qformer.encoder.layer.{i}.", f"Qformer.bert.encoder.layer.{i}."
        blocks = ["attention", "crossattention"] if i % 2 == 0 else ["attention"]
        for block in blocks:
            for hf_name, lavis_name in QF_ATTENTION_INVERSE:
                for param in ("weight", "bias"):
                    move(f"{src}{block}.{hf_name}.{param}", f"{dst}{block}.{lavis_name}.{param}")
        for name in QF_FFN + (QF_TEXT_FFN if text_side else []):
            for param in ("weight", "bias"):
                move(f"{src}{name}.{param}", f"{dst}{name}.{param}")
    out["Qformer.bert.embeddings.position_ids"] = torch.arange(QF_POSITIONS).expand(1, -1)  # persistent in LAVIS
    if instruct:
        move("qformer.embeddings.layernorm.weight", "Qformer.bert.embeddings.LayerNorm.weight")
        move("qformer.embeddings.layernorm.bias", "Qformer.bert.embeddings.LayerNorm.bias")
        move("qformer.embeddings.word_embeddings.weight", "Qformer.bert.embeddings.word_embeddings.weight")
        move("qformer.embeddings.position_embeddings.weight", "Qformer.bert.embeddings.position_embeddings.weight")
    else:
        move("qformer.layernorm.weight", "Qformer.bert.embeddings.LayerNorm.weight")
        move("qformer.layernorm.bias", "Qformer.bert.embeddings.LayerNorm.bias")
    if kind == "blip2_qformer":
        move("embeddings.word_embeddings.weight", "Qformer.bert.embeddings.word_embeddings.weight")
        move("embeddings.position_embeddings.weight", "Qformer.bert.embeddings.position_embeddings.weight")
        for hf_name, lavis_name in [("vision_projection", "vision_proj"), ("text_projection", "text_proj")]:
            move(f"{hf_name}.weight", f"{lavis_name}.weight")
            move(f"{hf_name}.bias", f"{lavis_name}.bias")
        move("itm_head.weight", "itm_head.weight")
        move("itm_head.bias", "itm_head.bias")
    else:
        move("language_projection.weight", f"{LAVIS_PROJ[kind]}.weight")
        move("language_projection.bias", f"{LAVIS_PROJ[kind]}.bias")
        for key in [k for k in hf if k.startswith("language_model.")]:
            move(key, LAVIS_LLM[kind] + key[len("language_model") :])
    assert not hf, f"inverse table missed {sorted(hf)}"
    return out


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].shape == value.shape, key
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


def _lavis_file(tmp_path: Path, kind: str, *, with_llm: bool = True) -> tuple[Path, dict[str, torch.Tensor]]:
    """Random model of `kind` → LAVIS-named checkpoint file (LAVIS's {'model': ..., 'epoch': ...} wrapper)."""
    reference = _randomize(_build(kind))
    lavis = to_lavis(reference, kind)
    if kind in ("blip2_llm", "instructblip_llm"):
        lavis["llm_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old HF LLaMA buffer
    if not with_llm:
        lavis = {k: v for k, v in lavis.items() if not k.startswith(LAVIS_LLM.get(kind, "-") + ".")}
    path = tmp_path / f"{kind}.pth"
    torch.save({"model": lavis, "epoch": 3, "config": {"arch": kind}}, path)
    return path, reference


# ---------------------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["blip2_opt", "blip2_t5", "blip2_llm", "instructblip_t5", "instructblip_llm"])
def test_generation_checkpoint_round_trip(tmp_path: Path, kind: str) -> None:
    path, reference = _lavis_file(tmp_path, kind)
    state = read_lavis_checkpoint(path)
    assert detect_lavis_kind(state) == kind
    got_kind, converted = convert_lavis_state_dict(state)
    assert got_kind == kind
    _assert_same(converted, reference)

    fresh = _build(kind)
    assert type(fresh).__name__ == TRANSFORMERS_CLASS_FOR_KIND[kind]
    fresh.load_state_dict(converted, strict=True)
    _assert_same({k: v for k, v in fresh.state_dict().items()}, reference)


def test_converted_model_computes_what_the_original_computes(tmp_path: Path) -> None:
    original = _build("blip2_opt")
    _randomize(original, seed=1)
    lavis = to_lavis(original.state_dict(), "blip2_opt")
    _, converted = convert_lavis_state_dict(lavis)
    loaded = _build("blip2_opt")
    loaded.load_state_dict(converted, strict=True)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = original.get_image_features(pixel_values=pixels)
        actual = loaded.get_image_features(pixel_values=pixels)
    expected = getattr(expected, "pooler_output", expected)
    actual = getattr(actual, "pooler_output", actual)
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("kind", ["blip2_opt", "blip2_t5", "instructblip_llm"])
def test_release_checkpoint_without_frozen_llm(tmp_path: Path, kind: str) -> None:
    path, reference = _lavis_file(tmp_path, kind, with_llm=False)
    got_kind, converted = convert_lavis_state_dict(read_lavis_checkpoint(path))
    assert got_kind == kind
    _assert_same(converted, {k: v for k, v in reference.items() if not k.startswith("language_model.")})
    result = _build(kind).load_state_dict(converted, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("language_model.") for k in result.missing_keys)


def test_stage1_qformer_round_trip_keeps_temperature_and_itg_head(tmp_path: Path) -> None:
    reference = _randomize(_build("blip2_qformer"))
    lavis = to_lavis(reference, "blip2_qformer")
    head = {
        "Qformer.cls.predictions.bias": torch.randn(64),
        "Qformer.cls.predictions.transform.dense.weight": torch.randn(32, 32),
        "Qformer.cls.predictions.transform.dense.bias": torch.randn(32),
        "Qformer.cls.predictions.transform.LayerNorm.weight": torch.randn(32),
        "Qformer.cls.predictions.transform.LayerNorm.bias": torch.randn(32),
        "Qformer.cls.predictions.decoder.weight": lavis["Qformer.bert.embeddings.word_embeddings.weight"],
        "Qformer.cls.predictions.decoder.bias": torch.randn(64),
    }
    lavis |= head | {"temp": torch.tensor(0.07)}
    path = tmp_path / "blip2_pretrained.pth"
    torch.save({"state_dict": lavis}, path)

    got_kind, converted = convert_lavis_state_dict(read_lavis_checkpoint(path))
    assert got_kind == "blip2_qformer"
    model_part, extras = split_lavis_extras(converted)
    _assert_same(model_part, reference)
    _assert_same(extras, head | {"temp": torch.tensor(0.07)})
    assert all(k.startswith("lavis_extra.") for k in set(converted) - set(model_part))
    _build("blip2_qformer").load_state_dict(model_part, strict=True)


def test_text_side_of_blip2_generation_checkpoint_goes_to_extras() -> None:
    reference = _randomize(_build("blip2_opt"))
    lavis = to_lavis(reference, "blip2_opt")
    text_side = {
        "Qformer.bert.embeddings.word_embeddings.weight": torch.randn(64, 32),
        "Qformer.bert.embeddings.position_embeddings.weight": torch.randn(QF_POSITIONS, 32),
        "Qformer.bert.encoder.layer.0.intermediate.dense.weight": torch.randn(64, 32),
        "Qformer.bert.encoder.layer.0.output.LayerNorm.bias": torch.randn(32),
    }
    kind, converted = convert_lavis_state_dict(lavis | text_side)
    assert kind == "blip2_opt"
    model_part, extras = split_lavis_extras(converted)
    _assert_same(model_part, reference)
    _assert_same(extras, text_side)


# ---------------------------------------------------------------------------------------------------------------------
# ViT attention bias
# ---------------------------------------------------------------------------------------------------------------------


def test_qkv_bias_is_fused_as_q_zeros_v() -> None:
    lavis = to_lavis(_randomize(_build("blip2_opt")), "blip2_opt")
    _, converted = convert_lavis_state_dict(lavis)
    fused = converted["vision_model.encoder.layers.1.self_attn.qkv.bias"]
    q, v = lavis["visual_encoder.blocks.1.attn.q_bias"], lavis["visual_encoder.blocks.1.attn.v_bias"]
    assert torch.equal(fused, torch.cat([q, torch.zeros(32), v]))


def test_fused_qkv_bias_with_nonzero_key_third_passes_through_and_is_harmless() -> None:
    model = _build("blip2_opt")
    reference = _randomize(model, seed=3)
    lavis = to_lavis(reference, "blip2_opt")
    q = lavis.pop("visual_encoder.blocks.0.attn.q_bias")
    v = lavis.pop("visual_encoder.blocks.0.attn.v_bias")
    key_bias = torch.randn(32, generator=torch.Generator().manual_seed(4))
    lavis["visual_encoder.blocks.0.attn.qkv.bias"] = torch.cat([q, key_bias, v])
    _, converted = convert_lavis_state_dict(lavis)
    assert torch.equal(converted["vision_model.encoder.layers.0.self_attn.qkv.bias"], torch.cat([q, key_bias, v]))

    # Documented behaviour: the key bias cancels in the softmax, so the vision features do not change.
    model.load_state_dict(converted, strict=True)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        with_key_bias = model.vision_model(pixel_values=pixels).last_hidden_state
        model.load_state_dict(reference, strict=True)
        without = model.vision_model(pixel_values=pixels).last_hidden_state
    assert not torch.equal(reference["vision_model.encoder.layers.0.self_attn.qkv.bias"], torch.cat([q, key_bias, v]))
    torch.testing.assert_close(with_key_bias, without, rtol=1e-4, atol=1e-4)


def test_inverse_table_refuses_nonzero_key_bias() -> None:
    reference = _randomize(_build("blip2_opt"))
    reference["vision_model.encoder.layers.0.self_attn.qkv.bias"][40] = 1.0
    with pytest.raises(ValueError, match="key bias"):
        to_lavis(reference, "blip2_opt")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("visual_encoder.blocks.0.attn.v_bias"), "v_bias is missing"),
        (lambda sd: sd.__setitem__("visual_encoder.blocks.0.attn.v_bias", torch.zeros(8)), "equal size"),
        (lambda sd: sd.__setitem__("visual_encoder.blocks.0.attn.qkv.bias", torch.zeros(96)), "both a fused"),
        (
            lambda sd: [sd.__setitem__(f"visual_encoder.blocks.0.attn.{n}_bias", torch.zeros(16)) for n in "qv"],
            "output rows",
        ),
    ],
)
def test_inconsistent_vit_biases_are_refused(edit, message: str) -> None:
    lavis = to_lavis(_randomize(_build("blip2_opt")), "blip2_opt")
    edit(lavis)
    with pytest.raises(CheckpointError, match=message):
        convert_lavis_state_dict(lavis)


# ---------------------------------------------------------------------------------------------------------------------
# Unknown keys, kinds
# ---------------------------------------------------------------------------------------------------------------------


def test_unknown_keys_are_listed_never_dropped() -> None:
    lavis = to_lavis(_randomize(_build("blip2_t5")), "blip2_t5")
    lavis["visual_encoder.norm.weight"] = torch.ones(32)
    lavis["Qformer.bert.encoder.layer.0.attention.self.distance_embedding.weight"] = torch.ones(3, 8)
    lavis["my_adapter.weight"] = torch.ones(2)
    with pytest.raises(CheckpointError) as info:
        convert_lavis_state_dict(lavis)
    message = str(info.value)
    assert "3 LAVIS key(s)" in message
    for key in ("visual_encoder.norm.weight", "distance_embedding.weight", "my_adapter.weight"):
        assert key in message
    assert "final norm" in message and "ln_vision" in message


def test_explicit_kind_that_does_not_fit_is_refused() -> None:
    lavis = to_lavis(_randomize(_build("blip2_opt")), "blip2_opt")
    with pytest.raises(CheckpointError, match=r"opt_model x21, opt_proj x2"):
        convert_lavis_state_dict(lavis, kind="blip2_t5")
    with pytest.raises(CheckpointError, match="supported kinds"):
        convert_lavis_state_dict(lavis, kind="blip3")


def test_detect_lists_kinds_and_prefixes_when_nothing_matches() -> None:
    with pytest.raises(CheckpointError) as info:
        detect_lavis_kind({"encoder.layer.0.weight": torch.ones(1), "pooler.dense.bias": torch.ones(1)})
    message = str(info.value)
    assert all(kind in message for kind in LAVIS_KINDS)
    assert "'encoder'" in message and "'pooler'" in message
    with pytest.raises(CheckpointError, match="mixes LLM families"):
        detect_lavis_kind({"opt_proj.weight": torch.ones(1), "t5_proj.weight": torch.ones(1)})


def test_detect_uses_qformer_text_input_and_llm_weights() -> None:
    word = {"Qformer.bert.embeddings.word_embeddings.weight": torch.ones(1)}
    assert detect_lavis_kind({"t5_proj.bias": torch.ones(1)}) == "blip2_t5"
    assert detect_lavis_kind({"t5_proj.bias": torch.ones(1)} | word) == "instructblip_t5"
    assert detect_lavis_kind({"llm_model.lm_head.weight": torch.ones(1)}) == "blip2_llm"
    assert detect_lavis_kind({"llm_proj.weight": torch.ones(1)} | word) == "instructblip_llm"
    assert detect_lavis_kind({"itm_head.weight": torch.ones(1)} | word) == "blip2_qformer"


# ---------------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_lavis_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="not a file"):
        read_lavis_checkpoint(tmp_path)


@pytest.mark.parametrize("content", [b"model weights, honest\n", b"", b"PK\x03\x04garbage"])
def test_non_torch_files_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a torch checkpoint") as info:
        read_lavis_checkpoint(path)
    assert str(path) in str(info.value)


class _Payload:
    """Unpickling this would create a marker file: the reader must refuse it before that happens."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_objects_are_refused_without_being_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"query_tokens": torch.zeros(1)}, "hook": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="weights_only") as info:
        read_lavis_checkpoint(path)
    assert "it pickles" in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()
    # The payload is live: a plain unpickle (never done by the reader) runs it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_files_without_tensors_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "config": {"lr": 1e-4}}, path)
    with pytest.raises(CheckpointError, match="no tensors") as info:
        read_lavis_checkpoint(path)
    assert "epoch" in str(info.value)
    torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointError, match="found list"):
        read_lavis_checkpoint(path)


def test_plain_state_dict_ddp_prefix_and_safetensors(tmp_path: Path) -> None:
    state = {"query_tokens": torch.randn(1, 4, 32), "itm_head.weight": torch.randn(2, 32)}
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")
    _assert_same(read_lavis_checkpoint(tmp_path / "ddp.pth"), state)
    save_file(state, str(tmp_path / "plain.safetensors"))
    _assert_same(read_lavis_checkpoint(str(tmp_path / "plain.safetensors")), state)
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_lavis_checkpoint(tmp_path / "bad.safetensors")
