"""A LAVIS .pth checkpoint (written from a transformers model in LAVIS naming) loads and computes the same."""

from __future__ import annotations

import re

import pytest
import torch

import vlbridge
from vlbridge.errors import CheckpointError

from factory import Sizes, build_checkpoint, hf_model

# transformers -> LAVIS, the other direction of the converter, written independently as regex rewrites.
TO_LAVIS = [
    (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
    (r"^vision_model\.post_layernorm\.", "ln_vision."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"visual_encoder.blocks.\1.norm\2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.weight", r"visual_encoder.blocks.\1.attn.qkv.weight"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
    (r"^qformer\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
    (
        r"^qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.",
        r"Qformer.bert.encoder.layer.\1.\2.self.",
    ),
    (r"^qformer\.encoder\.", "Qformer.bert.encoder."),
    (r"^language_projection\.", "opt_proj."),
]


def to_lavis(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith("language_model."):
            continue  # LAVIS releases do not carry the frozen LLM
        m = re.match(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$", key)
        if m:
            third = value.numel() // 3
            out[f"visual_encoder.blocks.{m.group(1)}.attn.q_bias"] = value[:third]
            out[f"visual_encoder.blocks.{m.group(1)}.attn.v_bias"] = value[2 * third :]
            continue
        new = key
        for pattern, repl in TO_LAVIS:
            new, n = re.subn(pattern, repl, new)
            if n:
                break
        out[new] = value
    return out


@pytest.fixture(scope="module")
def lavis_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lavis")
    sizes = Sizes(q_heads=4, q_width=32, vision_width=64, vision_heads=1, queries=6, cross_freq=2, q_layers=4)
    hf_dir = build_checkpoint(root / "hf", family="opt", sizes=sizes, seed=11)
    hf = hf_model(hf_dir)
    torch.save({"model": to_lavis(hf.state_dict()), "epoch": 3}, root / "blip2_opt.pth")
    llm_dir = root / "llm"
    hf.language_model.save_pretrained(llm_dir)
    vlbridge.load(hf_dir).tokenizer.save_pretrained(llm_dir)
    return root, hf_dir, llm_dir


def test_lavis_checkpoint_generates_like_the_transformers_one(lavis_files):
    root, hf_dir, llm_dir = lavis_files
    ours = vlbridge.load(root / "blip2_opt.pth", language_model=llm_dir, qformer_heads=4)
    reference = vlbridge.load(hf_dir)
    reference.ln_vision.eps = ours.ln_vision.eps  # LAVIS's ln_vision is nn.LayerNorm's default eps
    pixels = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    assert ours.bridge.config.qformer.num_layers == 4 and ours.bridge.config.qformer.num_query_tokens == 6
    assert ours.bridge.config.qformer.cross_attention_frequency == 2
    with torch.no_grad():
        torch.testing.assert_close(ours.image_embeds(pixels), reference.image_embeds(pixels))
    assert ours.caption(pixels, num_beams=3, max_new_tokens=6) == reference.caption(
        pixels, num_beams=3, max_new_tokens=6
    )


def test_lavis_generation_checkpoint_needs_its_llm(lavis_files):
    root, _, _ = lavis_files
    with pytest.raises(CheckpointError, match="language_model="):
        vlbridge.load(root / "blip2_opt.pth")


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError):
        vlbridge.load(tmp_path / "evil.pth")
