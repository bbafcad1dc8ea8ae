"""LLaVA and MiniGPT-4 training through the one loop (`stage: conversation`): stage 1 trains the projector only,
stage 2 LoRA changes the adapters only (and merges / exports as PEFT), MiniGPT-4 keeps its Q-Former frozen."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

import vlbridge
from training_data import minilm_path, write_images, write_vision_model
from vlbridge.config import from_dict
from vlbridge.models.builder import ModelConfig, build_model
from vlbridge.training.loop import train
from vlbridge.training.recipe import TrainConfig

from factory import llm_tokenizer, randomize


def write_llama(root):
    torch.manual_seed(0)
    tok = llm_tokenizer(kind="opt")
    tok.add_tokens(["<image>"], special_tokens=True)
    cfg = transformers.LlamaConfig(vocab_size=len(tok) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                                   bos_token_id=2, eos_token_id=2, pad_token_id=1)  # fmt: skip
    lm = transformers.LlamaForCausalLM(cfg)
    randomize(lm, seed=0, std=0.1)  # a random LLM whose outputs depend on its input (what a prefix can steer)
    lm.generation_config.pad_token_id = 1
    lm.save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    return root / "llama"


def write_conversations(root, template: str):
    records = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()]
    out = []
    for i, r in enumerate(records):
        human = "<image>" if template == "plain" else "<image>\nwhat is in the picture ?"
        out.append({"id": str(i), "image": r["image"], "conversations": [
            {"from": "human", "value": human}, {"from": "gpt", "value": r["caption"]}]})  # fmt: skip
    path = root / f"conversations_{template}.json"
    path.write_text(json.dumps(out))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    write_images(root, 64, seed=0)
    write_vision_model(root)
    write_llama(root)
    write_conversations(root, "plain")
    write_conversations(root, "vicuna_v1")
    return root


def config(root, out, *, template: str, model: dict, steps: int = 30, **optim):
    raw = {
        "stage": "conversation",
        "model": {
            "vision": str(root / "vision"),
            "vision_layer": -2,
            "language_model": str(root / "llama"),
            "embed_dim": None,
            **model,
        },  # fmt: skip
        "data": {
            "conversations": [str(root / f"conversations_{template}.json")],
            "template": template,
            "batch_size": 8,
            "num_workers": 0,
            "augment": False,
        },  # fmt: skip
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 3, **optim},
        "run": {"output_dir": str(out), "max_steps": steps, "save_every": 1000, "log_every": 1, "progress": False},
    }
    return from_dict(TrainConfig, raw)


def losses(out) -> list[float]:
    with open(out / "log.csv") as f:
        return [float(r["lm_loss"]) for r in csv.DictReader(f)]


PROJECTOR = {"bridge": {"kind": "projector", "projector_type": "mlp2x_gelu"}, "vision_select": "patch"}


@pytest.fixture(scope="module")
def stage1(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("llava1")
    summary = train(config(data, out, template="plain", model=PROJECTOR, steps=60, lr=1e-2, min_lr=1e-3))
    return vlbridge.load(summary["model"]), out, summary["model"]


def test_llava_stage1_trains_the_projector_only(data, stage1):
    model, out, _ = stage1
    curve = losses(out)
    assert sum(curve[-5:]) / 5 < 0.85 * sum(curve[:5]) / 5, curve
    base = load_file(str(data / "llama" / "model.safetensors"))
    for key, value in model.language_model.state_dict().items():
        assert torch.equal(value, base[key]), key  # the LLM is frozen
    assert model.bridge.kind == "projector" and model.num_visual_tokens == 16  # 4x4 patches, [CLS] dropped
    assert model.config.prompts.image_first == "<image>\n"


def test_llava_stage2_lora_changes_only_the_adapters(data, stage1, tmp_path):
    first, _, saved = stage1
    cfg = config(data, tmp_path / "run", template="vicuna_v1", steps=20, bridge_lr=1e-3,
                 model={**PROJECTOR, "init_from": str(saved), "language_training": "lora",
                        "lora": {"r": 4, "alpha": 8, "dropout": 0.0}})  # fmt: skip
    model = vlbridge.load(train(cfg)["model"])
    lm = model.language_model
    base = load_file(str(data / "llama" / "model.safetensors"))
    adapters = {k: v for k, v in lm.state_dict().items() if "lora_" in k}
    assert adapters and any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)  # B starts at zero
    for key, value in lm.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, base[key.replace(".base_layer", "")]), key
    assert not torch.equal(model.bridge.layers[0].weight, first.bridge.layers[0].weight)
    # Saved as a PEFT adapter, it loads onto the base LLM with peft and gives the same logits.
    import peft

    model.save(tmp_path / "adapter", format="adapter")
    reloaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(data / "llama"),
                                              tmp_path / "adapter").eval()  # fmt: skip
    ids = torch.tensor([[2, 5, 9, 11, 7]])
    with torch.no_grad():
        ours = lm(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, ours, atol=1e-5, rtol=1e-5)
    # Merged, the LLM is plain again: same outputs, no adapters, savable in transformers' format.
    pixels = torch.rand(2, 3, 16, 16)
    before = model.score(pixels, ["a red square on blue", "a green square on red"])
    with pytest.raises(ValueError, match="merge_lora"):
        model.save(tmp_path / "hf", format="hf")
    model.merge_lora()
    assert not any("lora_" in k for k in model.state_dict())
    assert model.score(pixels, ["a red square on blue", "a green square on red"]) == pytest.approx(before, abs=1e-4)
    model.save(tmp_path / "hf", format="hf")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").architectures == ["LlavaForConditionalGeneration"]


def test_minigpt4_keeps_its_qformer_frozen(data, tmp_path):
    blip2 = build_model(ModelConfig(vision=str(data / "vision"), vision_layer=-2, tokenizer=str(minilm_path()),
                                    qformer={"hidden_size": 32, "num_layers": 2, "num_heads": 4,
                                             "intermediate_size": 64}, num_query_tokens=4,
                                    cross_attention_frequency=1, embed_dim=16))  # fmt: skip
    blip2.save(tmp_path / "blip2")  # a stage-1 checkpoint: vision + Q-Former + heads, no LLM
    cfg = config(data, tmp_path / "run", template="plain", steps=50, lr=1e-2, min_lr=1e-3, model={
        "vision": "", "init_from": str(tmp_path / "blip2"), "freeze_qformer": True})  # fmt: skip
    model = vlbridge.load(train(cfg)["model"])
    assert model.bridge.config.freeze_qformer and model.num_visual_tokens == 4
    for key, value in blip2.bridge.qformer.state_dict().items():
        assert torch.equal(model.bridge.qformer.state_dict()[key], value), key
    curve = losses(tmp_path / "run")
    assert sum(curve[-5:]) / 5 < 0.85 * sum(curve[:5]) / 5, curve
