"""``vlbridge demo --smoke``: a seconds-long smoke run of the public API on an UNTRAINED model.

The real demo is :func:`vlbridge.recipes.world.run_world_recipe` (the whole recipe on the synthetic world). This one
shows in seconds that every step of the API works, not that the model is any good:

1. build a tiny BLIP-2 with random weights (ViT vision encoder, Q-Former, OPT language model with a word-level
   tokenizer over the world's vocabulary) and write it as a transformers checkpoint;
2. draw two pictures of coloured shapes with Pillow;
3. load the checkpoint with :func:`vlbridge.load`, caption the pictures and answer a question about them;
4. save the model in both formats (``native`` and ``hf``), load each again and check that it gives the same text.

The weights are random, so the captions and answers are gibberish made of in-vocabulary words; the summary says so.
Nothing is downloaded; it takes a few seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

DEMO_QUESTION = "what colour is the shape?"
_IMAGE_SIZE = 32
# Any seed works; with this one the two pictures get different gibberish, which makes it visible that the image
# reaches the language model.
DEMO_SEED = 4
_EXTRA_WORDS = ["question", "answer", "short", "caption", ":", "?", ","]


def _tokenizer():
    """A lowercase word-level tokenizer over the world's vocabulary, with OPT's conventions (``</s>`` first)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from vlbridge.data.world import world_vocabulary

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    words = sorted(set(world_vocabulary()) | set(_EXTRA_WORDS))
    vocab = {token: i for i, token in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", vocab["</s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.add_tokens(["<image>"], special_tokens=True)  # where transformers puts the soft prompt
    return fast


def build_random_checkpoint(directory: str | os.PathLike, *, seed: int = DEMO_SEED) -> Path:
    """Write a tiny transformers ``Blip2ForConditionalGeneration`` checkpoint with random weights.

    Args:
        directory: Folder to write (created; existing files are overwritten).
        seed: Seed of the weights.

    Returns:
        The folder, loadable with :func:`vlbridge.load` or transformers.
    """
    import torch
    import transformers

    from vlbridge.data.images import ImageProcessorConfig

    directory = Path(directory)
    tokenizer = _tokenizer()
    width = 32
    config = transformers.Blip2Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=_IMAGE_SIZE,
            patch_size=8,
        ),
        qformer_config=dict(
            hidden_size=width,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            cross_attention_frequency=1,
            vocab_size=128,
        ),
        text_config=dict(
            model_type="opt",
            vocab_size=len(tokenizer),
            hidden_size=width,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            word_embed_proj_dim=width,
            max_position_embeddings=64,
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = transformers.Blip2ForConditionalGeneration(config).eval()
    # transformers' initialisers (std 0.02) make every logit nearly equal; a wider spread gives varied gibberish.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    processor = ImageProcessorConfig(image_size=(_IMAGE_SIZE, _IMAGE_SIZE)).to_hf_dict()  # BLIP-2's mean/std
    (directory / "preprocessor_config.json").write_text(json.dumps(processor, indent=2), encoding="utf-8")
    return directory


def draw_pictures(directory: str | os.PathLike) -> list[Path]:
    """Draw two 96x96 pictures (a red circle; a blue square beside a yellow triangle) as PNG files.

    Args:
        directory: Folder to write into (created).

    Returns:
        The image paths.
    """
    from PIL import Image, ImageDraw

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    scenes = {
        "red_circle.png": [("ellipse", (24, 24, 72, 72), (220, 40, 40))],
        "blue_square_yellow_triangle.png": [
            ("rectangle", (8, 30, 44, 66), (40, 80, 220)),
            ("polygon", [(70, 28), (90, 66), (50, 66)], (235, 210, 40)),
        ],
    }
    paths = []
    for name, shapes in scenes.items():
        image = Image.new("RGB", (96, 96), (20, 20, 28))
        draw = ImageDraw.Draw(image)
        for kind, xy, fill in shapes:
            getattr(draw, kind)(xy, fill=fill)
        image.save(directory / name)
        paths.append(directory / name)
    return paths


def run_demo(out_dir: str | os.PathLike = "runs/demo", *, verbose: bool = True) -> dict[str, Any]:
    """Run the smoke demo (see the module docstring) and print a summary.

    Args:
        out_dir: Where the pictures, checkpoints and ``summary.json`` go.
        verbose: Print the summary to stdout.

    Returns:
        ``{"untrained": True, "out_dir", "images", "captions", "question", "answers", "checkpoints": {"random_init",
        "native", "hf"}, "reloaded_outputs_match": {"native", "hf"}, "seconds", "summary"}``; paths as strings.

    Raises:
        RuntimeError: A reloaded checkpoint gives different text from the model it was saved from (a bug).
    """
    import transformers

    import vlbridge

    start = time.perf_counter()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = out / "checkpoints"

    init = build_random_checkpoint(checkpoints / "random-init")
    images = draw_pictures(out / "images")

    model = vlbridge.load(init)
    captions = model.caption(images, max_new_tokens=12)
    answers = model.answer(images, DEMO_QUESTION, max_new_tokens=6)

    saved = {"native": model.save(checkpoints / "native", format="native")}
    saved["hf"] = model.save(checkpoints / "hf", format="hf")
    matches = {}
    for fmt, path in saved.items():
        reloaded = vlbridge.load(path)
        same = reloaded.caption(images, max_new_tokens=12) == captions
        same = same and reloaded.answer(images, DEMO_QUESTION, max_new_tokens=6) == answers
        if not same:
            raise RuntimeError(f"the {fmt} checkpoint at {path} gives different text after reloading")
        matches[fmt] = same

    result: dict[str, Any] = {
        "untrained": True,
        "out_dir": str(out),
        "images": [str(p) for p in images],
        "captions": dict(zip(map(str, images), captions)),
        "question": DEMO_QUESTION,
        "answers": dict(zip(map(str, images), answers)),
        "checkpoints": {"random_init": str(init), **{k: str(v) for k, v in saved.items()}},
        "reloaded_outputs_match": matches,
        "seconds": round(time.perf_counter() - start, 2),
        "summary": str(out / "summary.json"),
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if verbose:
        print(_summary(result))
    return result


def _summary(r: dict[str, Any]) -> str:
    lines = [
        "vlbridge demo: smoke run of the public API",
        "",
        "  NOTE: this model is UNTRAINED (random weights), so the text below is gibberish. It shows that loading,",
        "  captioning, question answering, saving and reloading work end to end, not that the model sees anything.",
        "  `vlbridge demo` (without --smoke) trains the whole recipe on the synthetic world.",
        "",
        "  captions:",
        *(f"    {image}: {text}" for image, text in r["captions"].items()),
        f"  answers to {r['question']!r}:",
        *(f"    {image}: {text}" for image, text in r["answers"].items()),
        "  checkpoints (reloaded and checked to give the same text):",
        *(f"    {name}: {path}" for name, path in r["checkpoints"].items()),
        f"  summary: {r['summary']}",
        f"  took {r['seconds']:.1f} s",
    ]
    return "\n".join(lines)
