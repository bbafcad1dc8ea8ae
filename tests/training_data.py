"""A small synthetic image-text set for training tests: a coloured square on a coloured background."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import transformers
from PIL import Image

from factory import minilm_path

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 60, 230),
    "yellow": (240, 230, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (140, 40, 190),
    "orange": (250, 140, 20),
}


def write_vqa(root: Path, name: str) -> Path:
    """VQA records for the images of `name`.jsonl: the colour of the square and of the background."""
    out = []
    for line in (root / f"{name}.jsonl").read_text().splitlines():
        rec = json.loads(line)
        words = rec["caption"].split()
        for part, answer in (("square", words[1]), ("background", words[-1])):
            out.append(
                {
                    "image": rec["image"],
                    "question": f"what colour is the {part}",
                    "answers": [answer] * 10,
                    "question_type": part,
                    "image_id": rec["image_id"],
                }
            )
    path = root / f"vqa_{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


def write_images(root: Path, n: int, *, seed: int, name: str = "train", corrupt: int = 0) -> Path:
    """`n` images (16x16) + a JSONL manifest; `corrupt` extra records point at broken files."""
    rng = random.Random(seed)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    lines = []
    for i in range(n):
        fg, bg = rng.sample(names, 2)
        img = Image.new("RGB", (16, 16), tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[bg]))
        x, y = rng.randint(0, 8), rng.randint(0, 8)
        img.paste(COLOURS[fg], (x, y, x + 8, y + 8))
        img.save(folder / f"{i:04d}.png")
        lines.append({"image": f"{name}/{i:04d}.png", "caption": f"a {fg} square on {bg}", "image_id": f"{name}-{i}"})
    for j in range(corrupt):
        (folder / f"bad{j}.png").write_bytes(b"\x89PNG not really")
        lines.append({"image": f"{name}/bad{j}.png", "caption": "broken", "image_id": f"bad-{j}"})
    manifest = root / f"{name}.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def write_vision_model(root: Path, *, width: int = 32, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
    )
    model = transformers.CLIPVisionModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(root / "vision")
    return root / "vision"


def stage1_config(root: Path, **overrides):
    from vlbridge.config import from_dict
    from vlbridge.training.recipe import TrainConfig

    raw = {
        "model": {
            "vision": str(root / "vision"),
            "vision_layer": -1,
            "tokenizer": str(minilm_path()),
            "qformer": {
                "hidden_size": 32,
                "num_layers": 2,
                "num_heads": 4,
                "intermediate_size": 64,
                "dropout": 0.0,
                "attention_dropout": 0.0,
            },
            "num_query_tokens": 4,
            "cross_attention_frequency": 1,
            "embed_dim": 16,
        },
        "data": {
            "train": [str(root / "train.jsonl")],
            "batch_size": 8,
            "num_workers": 0,
            "augment": False,
            "max_text_length": 12,
        },
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10},
        "run": {"output_dir": str(root / "run"), "max_steps": 20, "save_every": 10, "log_every": 1, "progress": False},
    }
    for key, value in overrides.items():
        section, name = key.split(".")
        raw[section][name] = value
    return from_dict(TrainConfig, raw)


def write_blip2_vision_model(root: Path, *, width: int = 32, seed: int = 0) -> Path:
    """BLIP-2's own (EVA-style) vision model, so a trained model can be exported to transformers."""
    torch.manual_seed(seed)
    cfg = transformers.Blip2VisionConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
    )
    model = transformers.Blip2VisionModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(root / "vision_blip2")
    return root / "vision_blip2"


def write_caption_lm(root: Path, *, steps: int = 600, seed: int = 0) -> Path:
    """A tiny OPT that never sees an image: the frozen LLM of stage 2.

    It learns "fg bg </s> a fg square on bg </s>": two context words before the start token that the caption
    copies. A stage-2 bridge with two queries must learn to play those two words from the image — the
    copy-from-context ability a real LLM brings from pretraining, in miniature.
    """
    from factory import llm_tokenizer

    torch.manual_seed(seed)
    tok = llm_tokenizer(kind="opt")
    tok.add_tokens(["<image>"], special_tokens=True)
    cfg = transformers.OPTConfig(
        vocab_size=len(tok) + 3,
        hidden_size=48,
        ffn_dim=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=48,
        max_position_embeddings=64,
        bos_token_id=2,
        pad_token_id=1,
        eos_token_id=2,
        dropout=0.0,
    )
    lm = transformers.OPTForCausalLM(cfg)
    pairs = [(fg, bg) for fg in COLOURS for bg in COLOURS if fg != bg]
    rng = random.Random(seed)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    for _ in range(steps):
        enc_texts = [f"{fg} {bg} </s> a {fg} square on {bg} </s>" for fg, bg in rng.sample(pairs, 32)]
        enc = tok(enc_texts, add_special_tokens=False, padding=True, return_tensors="pt")
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        embeds = lm.get_input_embeddings()(enc.input_ids)
        # noisy context words: the copy must work from approximate embeddings, as a soft prompt gives them
        noise = torch.zeros_like(embeds)
        noise[:, :2] = torch.randn_like(embeds[:, :2]) * embeds[:, :2].detach().std()
        loss = lm(inputs_embeds=embeds + noise, attention_mask=enc.attention_mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    lm.generation_config.eos_token_id = 2
    lm.generation_config.pad_token_id = 1
    lm.generation_config.bos_token_id = 2
    lm.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    return root / "lm"


def stage2_config(root: Path, **overrides):
    from vlbridge.config import from_dict
    from vlbridge.training.recipe import TrainConfig

    raw = {
        "stage": "stage2",
        "model": {
            "vision": str(root / "vision_blip2"),
            "vision_layer": -1,
            "tokenizer": str(minilm_path()),
            "qformer": {
                "hidden_size": 32,
                "num_layers": 2,
                "num_heads": 4,
                "intermediate_size": 64,
                "dropout": 0.0,
                "attention_dropout": 0.0,
            },
            "num_query_tokens": 2,
            "cross_attention_frequency": 1,
            "embed_dim": None,
            "language_model": str(root / "lm"),
        },
        "data": {
            "train": [str(root / "train.jsonl")],
            "batch_size": 8,
            "num_workers": 0,
            "augment": False,
            "max_text_length": 12,
        },
        "optim": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 10},
        "run": {
            "output_dir": str(root / "run2"),
            "max_steps": 20,
            "save_every": 1000,
            "log_every": 10,
            "progress": False,
        },
    }
    for key, value in overrides.items():
        section, name = key.split(".")
        raw[section][name] = value
    return from_dict(TrainConfig, raw)
