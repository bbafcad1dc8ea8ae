"""Tokenizers built offline from a closed vocabulary (the synthetic world's)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def build_bert_tokenizer(words: Iterable[str], out_dir: str | Path) -> Path:
    """A BERT-style (uncased, [CLS] ... [SEP]) tokenizer whose vocabulary is `words`, saved as a transformers
    folder; the Q-Former's tokenizer when no BERT checkpoint can be downloaded. `[DEC]` is added on load."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = specials + sorted({w.lower() for w in words} - set(specials))
    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(models.WordPiece(vocab=ids, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )
    wrapped.save_pretrained(out)
    return out
