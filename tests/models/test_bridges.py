"""Every bridge through the one composition: what trains gets a gradient and nothing else does, cached generation
equals a from-scratch greedy decode, the registry refuses bad specs, and a checkpoint written before bridges were
parts still loads."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import vlbridge
from vlbridge.bridges.base import bridge_kinds, build_bridge
from vlbridge.data.images import ImageProcessor, ImageProcessorConfig
from vlbridge.encoders.vision import FrozenVisionEncoder
from vlbridge.errors import ConfigError
from vlbridge.inference.prefix import IMAGE
from vlbridge.inference.tasks import _eos_ids, _prompt_tokens, assemble_prefix
from vlbridge.models.vlm import PromptStyle, VisionLanguageModel, VLMConfig
from vlbridge.objectives.lm import decoder_lm_loss

from factory import bert_tokenizer, llm_tokenizer, randomize

QFORMER = dict(hidden_size=24, num_layers=2, num_heads=3, intermediate_size=40, num_query_tokens=4,
               cross_attention_frequency=1, vocab_size=30524, max_position_embeddings=64, text_input=False)  # fmt: skip
BRIDGES = {
    "qformer": {"kind": "qformer", "qformer": QFORMER, "embed_dim": None},
    "qformer-instruct": {
        "kind": "qformer",
        "qformer": {**QFORMER, "text_input": True},
        "embed_dim": None,
        "instruct": True,
    },  # fmt: skip
    "minigpt4": {"kind": "qformer", "qformer": QFORMER, "embed_dim": None, "freeze_qformer": True},
    "linear": {"kind": "projector", "projector_type": "linear"},
    "mlp3x_gelu": {"kind": "projector", "projector_type": "mlp3x_gelu", "bias": False},
}


def tiny_model(spec: dict, *, select: str = "patch") -> VisionLanguageModel:
    torch.manual_seed(0)
    vcfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, image_size=24, patch_size=8)  # fmt: skip
    vision = FrozenVisionEncoder(transformers.CLIPVisionModel(vcfg), layer=-2)
    tok = llm_tokenizer(kind="opt")
    lcfg = transformers.LlamaConfig(vocab_size=len(tok) + 2, hidden_size=40, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    bos_token_id=1, eos_token_id=2, pad_token_id=1)  # fmt: skip
    lm = transformers.LlamaForCausalLM(lcfg)
    d = vcfg.to_dict()
    d["model_type"] = "clip_vision_model"
    config = VLMConfig(bridge=spec, vision=d, vision_layer=-2, vision_select=select, language=lcfg.to_dict(),
                       prompts=PromptStyle(vqa_template="question: {} answer:"))  # fmt: skip
    model = VisionLanguageModel(config=config, vision=vision, language_model=lm)
    randomize(model, seed=1, std=0.2)
    model.tokenizer = tok
    model.image_processor = ImageProcessor(ImageProcessorConfig(image_size=(24, 24)))
    if spec["kind"] == "qformer":
        model.bridge_tokenizer = bert_tokenizer()
    return model


@pytest.mark.parametrize("name", list(BRIDGES))
def test_what_trains_gets_a_gradient_and_nothing_else(name):
    model = tiny_model(BRIDGES[name]).train()
    pixels = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    prompts = ["what colour is the circle ?", "describe this"]
    soft = model.visual_prefix(pixels, prompts)
    tok = model.tokenizer
    prompt_ids = [_prompt_tokens(model, p) for p in prompts]
    targets = [tok(" a red circle", add_special_tokens=False).input_ids + [2]] * 2
    loss, count = decoder_lm_loss(model, soft, prompt_ids, targets)
    assert torch.isfinite(loss) and int(count) == 2 * len(targets[0])
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("bridge.") for n in trainable)
    if name == "minigpt4":  # the frozen Q-Former: only the linear layer into the LLM learns
        assert trainable == {"bridge.language_projection.weight", "bridge.language_projection.bias"}
    # The Q-Former's word/position embeddings are read only by text passes (instructions, ITC/ITM).
    # With an instruction, the text's outputs of the last layer are not read: that layer's text FFN learns nothing.
    unused = ("bridge.qformer.embeddings.word_", "bridge.qformer.embeddings.pos")
    if name == "qformer-instruct":
        unused = (f"bridge.qformer.layers.{QFORMER['num_layers'] - 1}.text_ffn.",)
    for n, p in model.named_parameters():
        if n in trainable and not n.startswith(unused):
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} got no gradient"
        if n not in trainable:
            assert p.grad is None, f"frozen {n} got a gradient"


@pytest.mark.parametrize("name", list(BRIDGES))
def test_cached_generation_equals_a_greedy_decode_without_cache(name):
    model = tiny_model(BRIDGES[name]).eval()
    pixels = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    prompt = "<image> describe this"
    got = model.caption(pixels, prompt, max_new_tokens=6)
    lm, tok = model.language_model, model.tokenizer
    with torch.no_grad():
        soft = model.visual_prefix(pixels, [prompt] * 2)
        embeds, mask, _, _ = assemble_prefix(model, soft, [_prompt_tokens(model, prompt)] * 2)
        new = []
        for _ in range(6):  # the whole sequence again at every step
            logits = lm(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).logits
            nxt = logits[:, -1].argmax(-1)  # [B]
            new.append(nxt)
            embeds = torch.cat([embeds, lm.get_input_embeddings()(nxt)[:, None]], dim=1)
    rows = torch.stack(new, dim=1).tolist()
    eos = set(_eos_ids(model))
    ref = []
    for r in rows:
        cut = next((i for i, t in enumerate(r) if t in eos), len(r))
        ref.append(tok.decode(r[:cut], skip_special_tokens=True).strip())
    assert got == ref
    assert any(ref), ref  # random weights still produce words: all-empty output would be vacuous


def test_the_prefix_goes_where_the_placeholder_is():
    model = tiny_model(BRIDGES["linear"])
    ids = _prompt_tokens(model, "describe <image> this")
    assert ids.count(IMAGE) == 1 and ids.index(IMAGE) == 2  # after BOS and "describe"
    assert _prompt_tokens(model, "describe this")[0] == IMAGE  # no placeholder, no image_first: before everything
    soft = torch.randn(1, model.num_visual_tokens, 40)
    embeds, mask, slots, _ = assemble_prefix(model, soft, [ids])
    assert slots[0].nonzero().squeeze(-1).tolist() == list(range(2, 2 + model.num_visual_tokens))
    assert torch.equal(embeds[0, 2 : 2 + model.num_visual_tokens], soft[0])


def test_vision_select_and_the_number_of_visual_tokens():
    patch, full = tiny_model(BRIDGES["linear"], select="patch"), tiny_model(BRIDGES["linear"], select="all")
    assert (patch.num_visual_tokens, full.num_visual_tokens) == (9, 10)  # 3x3 patches (+ [CLS])
    pixels = torch.randn(1, 3, 24, 24)
    assert patch.image_tokens(pixels).shape[1] == 9 and full.image_tokens(pixels).shape[1] == 10
    assert tiny_model(BRIDGES["qformer"]).num_visual_tokens == 4  # the queries, whatever the encoder gives


def test_the_registry_refuses_bad_specs():
    assert {"qformer", "projector"} <= set(bridge_kinds())
    with pytest.raises(ConfigError, match="unknown bridge kind 'perceiverx'"):
        build_bridge({"kind": "perceiverx"}, vision_width=8, lm_width=8)
    with pytest.raises(ConfigError, match="unknown field.*depth"):
        build_bridge({"kind": "projector", "depth": 2}, vision_width=8, lm_width=8)
    with pytest.raises(ConfigError, match="unknown projector_type"):
        build_bridge({"kind": "projector", "projector_type": "mlp2x_relu"}, vision_width=8, lm_width=8)
    with pytest.raises(ConfigError, match="needs a language model"):
        build_bridge({"kind": "projector"}, vision_width=8, lm_width=None)


def test_a_checkpoint_from_before_bridges_were_parts_still_loads(tmp_path):
    model = tiny_model(BRIDGES["qformer"]).eval()
    model.save(tmp_path / "new")
    pixels = torch.randn(2, 3, 24, 24)
    want = model.caption(pixels, max_new_tokens=4)
    # Rewrite it the way vlbridge wrote BLIP-2 before: Q-Former fields at the top, weights outside `bridge.`.
    meta = json.loads((tmp_path / "new" / "vlbridge.json").read_text())
    bridge = meta["config"].pop("bridge")
    bridge.pop("kind")
    meta["config"].update(qformer=bridge.pop("qformer"), embed_dim=bridge.pop("embed_dim"),
                          vision_norm_eps=bridge.pop("vision_norm_eps"))  # fmt: skip
    meta["config"].pop("vision_select")
    meta["config"]["prompts"] = {**meta["config"]["prompts"], "instruct": False}
    del meta["config"]["prompts"]["image_token"], meta["config"]["prompts"]["image_first"]
    meta["model"] = "blip2"
    del meta["files"]
    (tmp_path / "new" / "vlbridge.json").write_text(json.dumps(meta))
    weights = tmp_path / "new" / "model.safetensors"
    state = {k.removeprefix("bridge."): v for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights))
    old = vlbridge.load(tmp_path / "new")
    assert old.bridge.kind == "qformer" and old.caption(pixels, max_new_tokens=4) == want
