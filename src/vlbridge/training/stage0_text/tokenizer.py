"""The world tokenizer, and the ids of ``</s> text </s>`` (after a scene record) it gives the language model.

The tokenizer (``tokenizers`` BPE, lowercasing, whitespace pre-tokenizer, ``</w>`` end-of-word suffix) is
trained until every word of the world is a single token, so a world sentence costs one token per word, while
its alphabet (ASCII letters, digits, punctuation, each also as a whole word) keeps any lowercase ASCII text,
such as the paper's "a photo of" prompt, free of ``<unk>``. Special tokens have fixed ids: ``<pad>`` 0,
``</s>`` 1 (BOS and EOS, prepended by the post-processor as OPT's tokenizer does), ``<unk>`` 2, ``<image>`` 3
(the placeholder transformers' BLIP-2 scatters the query outputs into; it is deliberately *not* exposed as a
``tokenizer.image_token`` attribute, because ``Blip2Processor`` then expects an ``AddedToken`` and a reloaded
tokenizer holds a ``str``; without it the processor finds ``<image>`` in the vocabulary and reuses id 3).
The remaining ids are numbered deterministically (characters sorted, then merges in training order), so the
same world and config always give the same tokenizer.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from typing import Any

from vlbridge.errors import InputError
from vlbridge.training.stage0_text.corpus import SCENE_LENGTH

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN = "<pad>", "</s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN)  # ids 0, 1, 2, 3
_WORD_SUFFIX = "</w>"
ALPHABET = string.ascii_lowercase + string.digits + string.punctuation  # each also a whole word of the vocabulary


def build_tokenizer(texts: Sequence[str], *, max_vocab_size: int = 2000, model_max_length: int = 128) -> Any:
    """Train the world tokenizer and wrap it for transformers.

    Args:
        texts: Training text (the tokenizer lowercases it).
        max_vocab_size: Upper bound on the vocabulary, special tokens included.
        model_max_length: Recorded as the tokenizer's ``model_max_length``.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with ``<pad>`` 0, ``</s>`` 1 (BOS = EOS), ``<unk>`` 2,
        ``<image>`` 3, prepending ``</s>`` when ``add_special_tokens`` is true.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from vlbridge.data.world import world_vocabulary

    def skeleton(model) -> Tokenizer:
        tok = Tokenizer(model)
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.BPEDecoder(suffix=_WORD_SUFFIX)
        return tok

    # Every alphabet character also as a whole word, so that "x</w>" exists for each: any ASCII word then
    # tokenizes without <unk>, whatever its last character. Every world word too, so that each is one token even
    # when this world's text does not use it (number words above max_objects, say).
    coverage = " ".join([*ALPHABET, *world_vocabulary()])
    trainer = trainers.BpeTrainer(
        vocab_size=max_vocab_size,
        min_frequency=0,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(ALPHABET),
        end_of_word_suffix=_WORD_SUFFIX,
        show_progress=False,
    )
    trained = skeleton(models.BPE(unk_token=UNK_TOKEN, end_of_word_suffix=_WORD_SUFFIX))
    trained.train_from_iterator([*texts, coverage], trainer)

    # Renumber deterministically: the trainer numbers the alphabet in hash order, which changes between runs.
    state = json.loads(trained.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    merged = [a + b for a, b in merges]
    merged_set = set(merged)
    singles = sorted(t for t in state["vocab"] if t not in merged_set and t not in SPECIAL_TOKENS)
    ordered = [*SPECIAL_TOKENS, *singles, *dict.fromkeys(merged)]
    vocab = {token: index for index, token in enumerate(ordered)}
    tok = skeleton(models.BPE(vocab=vocab, merges=merges, unk_token=UNK_TOKEN, end_of_word_suffix=_WORD_SUFFIX))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    bos = vocab[BOS_TOKEN]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=[IMAGE_TOKEN],
        model_max_length=model_max_length,
    )


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """``</s> text </s>`` ids, cut to ``max_length`` (keeping the final EOS)."""
    eos = tokenizer.eos_token_id
    encodings = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=True)  # Rust, no wrapper
    return [encoding.ids[: max_length - 1] + [eos] for encoding in encodings]


def encode_with_scene(tokenizer: Any, pairs: Sequence[tuple[str, str]], max_length: int) -> list[list[int]]:
    """``scene record + </s> text </s>`` ids; the record is exactly ``SCENE_LENGTH`` tokens."""
    scenes = tokenizer.backend_tokenizer.encode_batch([scene for scene, _ in pairs], add_special_tokens=False)
    texts = encode_texts(tokenizer, [text for _, text in pairs], max_length - SCENE_LENGTH)
    rows = []
    for scene, text in zip(scenes, texts):
        if len(scene.ids) != SCENE_LENGTH:
            raise InputError(f"a scene record must be {SCENE_LENGTH} tokens, got {len(scene.ids)}")
        rows.append(scene.ids + text)
    return rows
