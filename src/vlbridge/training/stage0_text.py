"""Stage 0, text side: the small *blind* causal language model that BLIP-2 keeps frozen in the embedded world.

BLIP-2 bridges a frozen vision encoder to a frozen LLM. The embedded synthetic world has no pretrained LLM that
speaks its language, so stage 0 trains one from scratch on the world's text alone — captions and
``"Question: {q} Answer: {a}"`` strings from the train manifests — and then it is frozen like OPT in the paper.
The LM never sees an image; `stage0_baselines.blind_baseline` measures what it can do without one (answering from
the question's wording alone, the same caption for every image), the floor that stages 1 and 2 must beat.

A soft prompt can only steer an LM that has learnt to use what comes before its text. A web-scale LLM has read
countless documents in which a passage (a table, a record, a description) informs the prose after it; a 0.5M-
parameter LM trained on captions alone has not, and in our tests no bridge could make such an LM describe an
image. So part of the world text is such documents: a *scene record* — a
fixed-length, 27-word table, ``size colour shape`` for each of the nine grid cells in reading order, ``empty empty
empty`` where there is nothing (:func:`scene_text`) — followed by ``</s>`` and a caption of that scene, or a
question and its answer. A caption follows the record of the whole scene; a question follows the record of just
the objects its answer depends on (the manifest's ``focus``), as a reading-comprehension text gives the passage
that answers it. (Finding the object in a whole-scene record — "what size is the star" — is what a 2-layer LM did
not learn in the steps the demo can afford: 1500 steps gave 0.58-0.61 VQA accuracy reading the true whole record, at
chance on size and yes/no questions. That look-up is the instruction-aware Q-Former's job: it sees the question
and the image.) The record's word embeddings are perturbed with Gaussian noise while training (``scene_noise``),
so the LM reads approximate embeddings, as a soft prompt gives them; the loss covers only the text after the
record. Other sequences have no record, so the LM also speaks without one (the blind baseline).
`stage0_baselines.scene_oracle` measures what the LM does with the *true* record: the ceiling for a perfect bridge.

What is written (``out_dir``)::

    lm/                  an OPTForCausalLM + its tokenizer in transformers format
                         (AutoModelForCausalLM / AutoTokenizer.from_pretrained(out_dir / "lm"))
    stage0_text.json     config, world fingerprint, val loss / perplexity, timings and the loss curve;
                         written last, so its presence means the run is complete

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

import hashlib
import json
import math
import os
import string
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from vlbridge.errors import ConfigError, InputError
from vlbridge.utils.io import atomic_dir, read_jsonl, write_text
from vlbridge.utils.threads import torch_threads

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "IMAGE_TOKEN",
    "PAD_TOKEN",
    "UNK_TOKEN",
    "VQA_PROMPT",
    "SCENE_LENGTH",
    "Stage0TextConfig",
    "build_tokenizer",
    "load_world_texts",
    "scene_text",
    "train_language_model",
]

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN = "<pad>", "</s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN)  # ids 0, 1, 2, 3
VQA_PROMPT = "Question: {} Answer:"  # the decoder-LLM VQA template of BLIP-2; stage 2 uses the same
_WORD_SUFFIX = "</w>"
_ALPHABET = string.ascii_lowercase + string.digits + string.punctuation
_RESULT_NAME = "stage0_text.json"
_LM_NAME = "lm"
_FORMAT_VERSION = 2
EMPTY_CELL = "empty"  # the scene record's word for a grid cell with no object
SCENE_LENGTH = 27  # 9 grid cells x (size, colour, shape): the soft prompt of the world recipe has as many queries


# ----------------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class Stage0TextConfig:
    """The language model, its tokenizer and how it is trained.

    Attributes:
        seed: Seed for initialisation and data order.
        hidden_size: Width of the OPT decoder (also its embedding size).
        num_layers: Decoder layers.
        num_heads: Attention heads.
        ffn_dim: Width of each feed-forward block.
        tie_word_embeddings: Share the input embeddings with the output layer. Off by default: tied, the output
            loss pulls words that the blind text never tells apart (small / medium / large) onto one embedding
            (cosine 0.98 after 1000 steps), and then no record or soft prompt can say which size it is.
        max_positions: ``max_position_embeddings``; longer sequences are cut (world text is at most ~40 tokens).
        dropout: Dropout on residuals and attention probabilities during training.
        steps: Optimiser steps.
        batch_size: Sequences per step.
        caption_fraction: Share of each batch drawn from captions, the rest from VQA strings. Above ~0.6 the
            most likely continuation of a bare ``</s>`` is a caption rather than ``"question"``, so the LM
            describes when nothing asks it a question (the world has ~1.3 questions per caption).
        lr: Peak learning rate (after linear warmup).
        min_lr: Learning rate at the end of the cosine.
        warmup_steps: Linear warmup steps.
        weight_decay: AdamW weight decay on matrices (not on norms, biases).
        betas: AdamW betas.
        grad_clip: Clip the gradient norm to this; None disables.
        position_shift_fraction: Share of training sequences that start at a random position rather than 0, so
            that every position embedding is trained: after BLIP-2's soft prompt the text starts at position 32.
        scene_fraction: Share of each batch that starts with the scene record of the text's image (see the module
            docstring); the rest is plain text. 0 trains a purely blind LM.
        scene_caption_fraction: Share of the scene rows that are captions, the rest questions. High enough that after
            a whole-scene record and ``</s>`` the LM's first word starts a caption, not ``"question"``.
        scene_noise: Standard deviation of the Gaussian noise added to the scene record's embeddings, as a
            fraction of their standard deviation.
        precision: ``"bf16"`` runs forward and backward under CPU/GPU bf16 autocast (weights and optimiser stay
            fp32); ``"fp32"`` does not.
        max_vocab_size: Upper bound on the BPE vocabulary (training stops earlier once every word is one token).
        val_max_sequences: Cap on validation sequences (the first of each kind, captions and questions in
            proportion); None uses all.
        eval_batch_size: Batch size for validation.
        val_shift: ``val_perplexity_shifted`` scores the val text starting at this position (where it starts after
            a soft prompt of that many query tokens).
        log_every: Steps between loss-curve points.
        device: Torch device to train on.
        num_threads: Torch CPU threads while training (restored afterwards); None leaves the setting alone. One is
            the default because the model is tiny: a second thread buys little, and on a machine shared with other
            work OpenMP's busy-waiting made 2 threads cost ~10x the CPU time of one. Not part of the cache key.
    """

    seed: int = 0
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    ffn_dim: int = 512
    tie_word_embeddings: bool = False
    max_positions: int = 128
    dropout: float = 0.0
    steps: int = 600
    batch_size: int = 64
    caption_fraction: float = 0.65
    lr: float = 3e-3
    min_lr: float = 1e-4
    warmup_steps: int = 30
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float | None = 1.0
    position_shift_fraction: float = 0.5
    scene_fraction: float = 0.75
    scene_caption_fraction: float = 0.75
    scene_noise: float = 0.5
    precision: Literal["fp32", "bf16"] = "bf16"
    max_vocab_size: int = 2000
    val_max_sequences: int | None = 2000
    eval_batch_size: int = 256
    val_shift: int = 32
    log_every: int = 20
    device: str = "cpu"
    num_threads: int | None = 1

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # JSON / YAML give lists
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError if a field is out of range."""
        positive = ("hidden_size", "num_layers", "num_heads", "ffn_dim", "steps", "batch_size", "eval_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"stage0_text.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"stage0_text.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.max_positions < 8:
            raise ConfigError(f"stage0_text.max_positions must be >= 8, got {self.max_positions}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"stage0_text.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.min_lr <= self.lr:
            raise ConfigError(f"stage0_text needs 0 < min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.warmup_steps < 0 or self.log_every < 1:
            raise ConfigError("stage0_text.warmup_steps must be >= 0 and log_every >= 1")
        if not 0.0 <= self.position_shift_fraction <= 1.0:
            raise ConfigError(
                f"stage0_text.position_shift_fraction must be in [0, 1], got {self.position_shift_fraction}"
            )
        if not 0 <= self.val_shift < self.max_positions:
            raise ConfigError(f"stage0_text.val_shift must be in [0, max_positions), got {self.val_shift}")
        if not (0.0 <= self.scene_fraction <= 1.0 and 0.0 <= self.scene_caption_fraction <= 1.0):
            raise ConfigError("stage0_text.scene_fraction and scene_caption_fraction must be in [0, 1]")
        if self.scene_noise < 0:
            raise ConfigError(f"stage0_text.scene_noise must be >= 0, got {self.scene_noise}")
        if not 0.0 <= self.caption_fraction <= 1.0:
            raise ConfigError(f"stage0_text.caption_fraction must be in [0, 1], got {self.caption_fraction}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"stage0_text.precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.max_vocab_size < len(SPECIAL_TOKENS) + 2 * len(_ALPHABET):
            raise ConfigError(f"stage0_text.max_vocab_size is too small to hold the alphabet: {self.max_vocab_size}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"stage0_text.num_threads must be >= 1 or None, got {self.num_threads}")
        if self.val_max_sequences is not None and self.val_max_sequences < 1:
            raise ConfigError(f"stage0_text.val_max_sequences must be >= 1 or None, got {self.val_max_sequences}")


# ----------------------------------------------------------------------------------------------------------------------
# World text


def _caption_texts(records: Sequence[dict[str, Any]]) -> list[str]:
    """Every caption of a manifest: the ``captions`` list where present (eval splits), else ``caption``."""
    texts: list[str] = []
    for record in records:
        texts += record.get("captions") or [record["caption"]]
    return texts


def _vqa_texts(records: Sequence[dict[str, Any]]) -> list[str]:
    """``"Question: {q} Answer: {a}"`` with the most common reference answer."""
    texts = []
    for record in records:
        answers = record["answers"]
        answer = max(dict.fromkeys(answers), key=answers.count)  # the majority answer, first on ties
        texts.append(f"{VQA_PROMPT.format(record['question'])} {answer}")
    return texts


def load_world_texts(world_dir: str | os.PathLike, split: str = "train") -> dict[str, list[str]]:
    """The text an LM learns from one split of a world, without any image.

    Args:
        world_dir: A folder written by :func:`vlbridge.data.world.generate_world`.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"compositional"``.

    Returns:
        ``{"captions": [...], "vqa": ["Question: ... Answer: ...", ...]}``.
    """
    world_dir = Path(world_dir)
    return {
        "captions": _caption_texts(read_jsonl(world_dir / f"captions_{split}.jsonl")),
        "vqa": _vqa_texts(read_jsonl(world_dir / f"vqa_{split}.jsonl")),
    }


def scene_text(objects: Sequence[Mapping[str, str]]) -> str:
    """The scene record of a list of object facts: ``size colour shape`` per grid cell in reading order.

    >>> scene_text([{"shape": "star", "colour": "red", "size": "large", "x": "centre", "y": "middle"}]).split()[12:15]
    ['large', 'red', 'star']
    """
    from vlbridge.data.world import COLUMNS, ROWS

    cells = [[EMPTY_CELL] * 3 for _ in range(len(ROWS) * len(COLUMNS))]
    for obj in objects:
        cell = ROWS.index(obj["y"]) * len(COLUMNS) + COLUMNS.index(obj["x"])
        cells[cell] = [obj["size"], obj["colour"], obj["shape"]]
    return " ".join(word for cell in cells for word in cell)


def load_scene_texts(world_dir: str | os.PathLike, split: str = "train") -> dict[str, list[tuple[str, str]]]:
    """``(scene record, text)`` pairs of one split: every caption with its image's record, every question with the
    record of the objects its answer depends on (its ``focus``, where the manifest has one; else the whole scene).

    Returns:
        ``{"captions": [(scene, caption), ...], "vqa": [(scene, "Question: ... Answer: ..."), ...]}``.
    """
    world_dir = Path(world_dir)
    captions = read_jsonl(world_dir / f"captions_{split}.jsonl")
    scenes = {r["image_id"]: scene_text(r["objects"]) for r in captions}
    questions = [r for r in read_jsonl(world_dir / f"vqa_{split}.jsonl") if r.get("image_id") in scenes]
    return {
        "captions": [(scenes[r["image_id"]], text) for r in captions for text in _caption_texts([r])],
        "vqa": [(_question_scene(r, scenes), text) for r, text in zip(questions, _vqa_texts(questions))],
    }


def _question_scene(record: Mapping[str, Any], scenes: Mapping[str, str]) -> str:
    """The record a question is read with: its ``focus`` objects when given, else its image's whole scene."""
    return scene_text(record["focus"]) if "focus" in record else scenes[record["image_id"]]


def _world_fingerprint(world_dir: Path) -> str:
    """SHA-256 over the manifests stage 0 reads, so a changed world retrains the LM."""
    digest = hashlib.sha256()
    for name in ("captions_train.jsonl", "vqa_train.jsonl", "captions_val.jsonl", "vqa_val.jsonl"):
        path = world_dir / name
        digest.update(name.encode())
        digest.update(path.read_bytes() if path.is_file() else b"<missing>")
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer(texts: Sequence[str], *, max_vocab_size: int = 2000, model_max_length: int = 128):
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
    coverage = " ".join([*_ALPHABET, *world_vocabulary()])
    trainer = trainers.BpeTrainer(
        vocab_size=max_vocab_size,
        min_frequency=0,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(_ALPHABET),
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


def _encode(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """``</s> text </s>`` ids, cut to ``max_length`` (keeping the final EOS)."""
    eos = tokenizer.eos_token_id
    encodings = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=True)  # Rust, no wrapper
    return [encoding.ids[: max_length - 1] + [eos] for encoding in encodings]


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and the attention mask."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def _encode_with_scene(tokenizer, pairs: Sequence[tuple[str, str]], max_length: int) -> list[list[int]]:
    """``scene record + </s> text </s>`` ids; the record is exactly ``SCENE_LENGTH`` tokens."""
    scenes = tokenizer.backend_tokenizer.encode_batch([scene for scene, _ in pairs], add_special_tokens=False)
    texts = _encode(tokenizer, [text for _, text in pairs], max_length - SCENE_LENGTH)
    rows = []
    for scene, text in zip(scenes, texts):
        if len(scene.ids) != SCENE_LENGTH:
            raise InputError(f"a scene record must be {SCENE_LENGTH} tokens, got {len(scene.ids)}")
        rows.append(scene.ids + text)
    return rows


def _take_mixed(streams: dict[str, _Stream], prefix: str, n: int, caption_fraction: float) -> list[list[int]]:
    """``n`` rows from the ``{prefix}captions`` and ``{prefix}vqa`` streams, captions in ``caption_fraction``."""
    captions, vqa = streams.get(f"{prefix}captions"), streams.get(f"{prefix}vqa")
    if n == 0 or (captions is None and vqa is None):
        return []
    if captions is None or vqa is None:
        return (captions or vqa).take(n)
    n_captions = round(n * caption_fraction)
    return captions.take(n_captions) + vqa.take(n - n_captions)


# ----------------------------------------------------------------------------------------------------------------------
# Model


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _build_model(config: Stage0TextConfig, tokenizer):
    from transformers import GenerationConfig, OPTConfig, OPTForCausalLM

    model_config = OPTConfig(
        vocab_size=_round_up(len(tokenizer), 8),
        hidden_size=config.hidden_size,
        word_embed_proj_dim=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        ffn_dim=config.ffn_dim,
        max_position_embeddings=config.max_positions,
        dropout=config.dropout,
        attention_dropout=config.dropout,
        layerdrop=0.0,
        do_layer_norm_before=True,
        activation_function="relu",
        init_std=0.02,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    model = OPTForCausalLM(model_config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        num_beams=1,
        max_new_tokens=20,
    )
    return model


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _position_ids(mask: torch.Tensor, offsets: torch.Tensor, max_positions: int) -> torch.Tensor:
    """Positions ``offset, offset + 1, ...`` per row (padding clamped into range; it is masked anyway)."""
    positions = torch.arange(mask.shape[1], device=mask.device)[None, :] + offsets[:, None].to(mask.device)
    return positions.clamp(max=max_positions - 1)


def _token_nll(
    model,
    ids: torch.Tensor,
    mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    context: torch.Tensor | None = None,
    noise: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over the real tokens after the first, and their count.

    ``context`` (B,) gives each row's scene-record length: those leading tokens are read, never predicted, and get
    Gaussian noise of ``noise`` times their embeddings' standard deviation.
    """
    embeds = model.get_input_embeddings()(ids)  # (B, T, D)
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    if context is not None:
        in_context = torch.arange(ids.shape[1], device=ids.device)[None, :] < context[:, None].to(ids.device)  # (B, T)
        targets = targets.masked_fill(in_context[:, 1:], -100)
        if noise > 0 and bool(in_context.any()):
            scale = noise * embeds[in_context].detach().float().std()
            embeds = embeds + torch.randn_like(embeds) * scale * in_context[..., None]
    logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).logits[:, :-1].float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return loss, (targets != -100).sum()


@torch.no_grad()
def _evaluate(
    model,
    rows: list[list[int]],
    pad_id: int,
    config: Stage0TextConfig,
    device: torch.device,
    shift: int = 0,
    context: int = 0,
) -> tuple[float, int]:
    """Summed next-token NLL (nats) over ``rows`` and the number of tokens scored.

    ``shift`` starts every row at that position (or as late as fits) instead of 0, as text after a soft prompt is.
    ``context``: every row starts with a scene record of that many tokens, read but not scored (no noise).
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths together: little padding
    for start in range(0, len(order), config.eval_batch_size):
        batch = [rows[i] for i in order[start : start + config.eval_batch_size]]
        ids, mask = _pad(batch, pad_id)
        positions = None
        if shift:
            offsets = torch.tensor([min(shift, config.max_positions - len(row)) for row in batch])
            positions = _position_ids(mask, offsets, config.max_positions).to(device)
        contexts = torch.full((len(batch),), context) if context else None
        with _autocast(device, config.precision):
            loss, n = _token_nll(model, ids.to(device), mask.to(device), positions, contexts)
        total, count = total + float(loss), count + int(n)
    model.train(was_training)
    return total, count


def _lr_at(step: int, config: Stage0TextConfig) -> float:
    """Linear warmup to ``lr``, then cosine to ``min_lr`` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(model, config: Stage0TextConfig) -> torch.optim.AdamW:
    decay, plain = [], []
    for _, param in model.named_parameters():  # tied embeddings appear once
        (decay if param.ndim >= 2 else plain).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


# ----------------------------------------------------------------------------------------------------------------------
# Training


_NOT_CACHE_KEYS = ("num_threads",)  # fields that do not change what is trained


def _config_dict(config: Stage0TextConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(config)))


def _cache_key(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key not in _NOT_CACHE_KEYS}


def _cached(out_dir: Path, config: Stage0TextConfig, fingerprint: str) -> dict[str, Any] | None:
    try:
        result = json.loads((out_dir / _RESULT_NAME).read_text())
    except (OSError, ValueError):
        return None
    same = (
        result.get("format_version") == _FORMAT_VERSION
        and _cache_key(result.get("config", {})) == _cache_key(_config_dict(config))
        and result.get("world_sha256") == fingerprint
        and (out_dir / _LM_NAME / "config.json").is_file()
    )
    return result if same else None


class _Stream:
    """Endless shuffled passes over one kind of training sequence."""

    def __init__(self, rows: list[list[int]], generator: torch.Generator) -> None:
        self.rows, self.generator = rows, generator
        self.order: list[int] = []
        self.cursor = 0

    def take(self, n: int) -> list[list[int]]:
        out: list[list[int]] = []
        while len(out) < n:
            if self.cursor == len(self.order):  # a new pass: reshuffle
                self.order, self.cursor = torch.randperm(len(self.rows), generator=self.generator).tolist(), 0
            chunk = self.order[self.cursor : self.cursor + n - len(out)]
            out += [self.rows[i] for i in chunk]
            self.cursor += len(chunk)
        return out


@dataclass
class _Progress:
    enabled: bool
    total: int
    bar: Any = field(default=None)

    def __post_init__(self) -> None:
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc="stage 0: language model", unit="step", dynamic_ncols=True)

    def update(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_language_model(
    world_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    config: Stage0TextConfig | None = None,
    progress: bool = True,
    fresh: bool = False,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train the world's tokenizer and blind causal LM, and save both in transformers format.

    Training text: every train caption and every train question as ``"Question: {q} Answer: {a}"``, each as
    ``</s> text </s>``, a ``scene_fraction`` of them preceded by a scene record (see the module docstring);
    validation text: the same from the val split. The LM never sees an image.

    Cached: when ``out_dir/stage0_text.json`` exists for the same config and the same world manifests (and the
    model folder is there), it is returned without training, unless ``fresh``.

    Args:
        world_dir: A folder written by :func:`vlbridge.data.world.generate_world`.
        out_dir: Where ``lm/`` and ``stage0_text.json`` go (created if missing).
        config: Model and training settings; defaults to ``Stage0TextConfig()``.
        progress: Show a progress bar.
        fresh: Retrain even if a matching result exists.
        on_log: Called with ``{"step", "loss", "lr"}`` every ``config.log_every`` steps.

    Returns:
        The contents of ``stage0_text.json``: ``config``, ``world_sha256``, ``lm_dir`` (absolute path),
        ``vocab_size``, ``tokenizer_size``, ``image_token_id``, ``parameters``, ``train_sequences``,
        ``final_train_loss``, ``val_loss`` / ``val_perplexity`` (all val text, per token after the BOS, EOS
        included), ``val_caption_perplexity`` / ``val_vqa_perplexity``, ``val_perplexity_shifted`` (the text
        starting at position ``val_shift``), ``loss_curve`` (list of ``{"step", "loss", "lr"}``), ``time_s`` (wall
        seconds per phase and in total, plus the training's process CPU seconds) and ``cached`` (True when nothing
        was trained).

    Raises:
        InputError: If the world folder lacks the train manifests or holds no text.
    """
    config = config or Stage0TextConfig()
    config.validate()
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    for name in ("captions_train.jsonl", "vqa_train.jsonl"):
        if not (world_dir / name).is_file():
            raise InputError(f"{world_dir} is not a world folder: {name} is missing (see vlbridge.data.world)")
    fingerprint = _world_fingerprint(world_dir)
    if not fresh and (result := _cached(out_dir, config, fingerprint)) is not None:
        return {**result, "lm_dir": str((out_dir / _LM_NAME).resolve()), "cached": True}

    start = time.perf_counter()
    train_text = load_world_texts(world_dir, "train")
    train_texts = train_text["captions"] + train_text["vqa"]
    if not train_texts:
        raise InputError(f"{world_dir} holds no training text")
    has_val = (world_dir / "captions_val.jsonl").is_file() and (world_dir / "vqa_val.jsonl").is_file()
    val_text = load_world_texts(world_dir, "val") if has_val else {"captions": [], "vqa": []}

    scene_text_pairs = load_scene_texts(world_dir, "train") if config.scene_fraction > 0 else {}
    scenes = sorted({scene for pairs in scene_text_pairs.values() for scene, _ in pairs})
    tokenizer = build_tokenizer(
        [*train_texts, *scenes], max_vocab_size=config.max_vocab_size, model_max_length=config.max_positions
    )
    train_rows = {key: _encode(tokenizer, texts, config.max_positions) for key, texts in train_text.items()}
    for key, pairs in scene_text_pairs.items():  # scene record (27 ids, no special tokens) + </s> text </s>
        train_rows[f"scene_{key}"] = _encode_with_scene(tokenizer, pairs, config.max_positions)
    val_rows = {
        key: _encode(tokenizer, texts, config.max_positions) if texts else [] for key, texts in val_text.items()
    }
    if config.val_max_sequences is not None:  # keep both kinds in proportion
        total_val = sum(len(rows) for rows in val_rows.values())
        if total_val > config.val_max_sequences:
            val_rows = {
                key: rows[: max(1, round(config.val_max_sequences * len(rows) / total_val))]
                for key, rows in val_rows.items()
            }
    tokenizer_time = time.perf_counter() - start

    device = torch.device(config.device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch_threads(config.num_threads):
        torch.manual_seed(config.seed)
        model = _build_model(config, tokenizer).to(device)
        model.train()
        optimizer = _optimizer(model, config)
        generator = torch.Generator().manual_seed(config.seed)
        streams = {key: _Stream(rows, generator) for key, rows in train_rows.items() if rows}
        n_scene = round(config.batch_size * config.scene_fraction) if "scene_captions" in streams else 0
        pad_id = tokenizer.pad_token_id

        curve: list[dict[str, float]] = []
        bar = _Progress(progress, config.steps)
        window, last_loss = [], float("nan")
        train_start, train_cpu_start = time.perf_counter(), time.process_time()
        for step in range(config.steps):
            plain = _take_mixed(streams, "", config.batch_size - n_scene, config.caption_fraction)
            with_scene = _take_mixed(streams, "scene_", n_scene, config.scene_caption_fraction)
            batch = plain + with_scene
            ids, mask = _pad(batch, pad_id)
            context = torch.tensor([0] * len(plain) + [SCENE_LENGTH] * len(with_scene))
            # Some plain rows start at a random position instead of 0, so that every position embedding is trained:
            # in BLIP-2 the text follows the soft prompt (32 query tokens in the paper) and starts that much later.
            room = torch.tensor([config.max_positions - len(row) for row in batch])
            offsets = (torch.rand(len(batch), generator=generator) * (room + 1)).long()
            offsets *= (torch.rand(len(batch), generator=generator) < config.position_shift_fraction) & (context == 0)
            positions = _position_ids(mask, offsets, config.max_positions)
            ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
            lr = _lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with _autocast(device, config.precision):
                loss_sum, count = _token_nll(model, ids, mask, positions, context, config.scene_noise)
            loss = loss_sum / count
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()

            last_loss = loss.item()
            window.append(last_loss)
            bar.update(last_loss)
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                point = {"step": step + 1, "loss": sum(window) / len(window), "lr": lr}
                curve.append(point)
                window = []
                if on_log is not None:
                    on_log(point)
        bar.close()
        train_time, train_cpu = time.perf_counter() - train_start, time.process_time() - train_cpu_start

        eval_start = time.perf_counter()
        val = {key: _evaluate(model, rows, pad_id, config, device) for key, rows in val_rows.items()}
        val_shifted = _evaluate(model, val_rows["captions"] + val_rows["vqa"], pad_id, config, device, config.val_shift)
        val_scene = None
        if scene_text_pairs and has_val:
            pairs = load_scene_texts(world_dir, "val")
            pairs = {key: value[: config.val_max_sequences] for key, value in pairs.items()}
            rows = [r for value in pairs.values() for r in _encode_with_scene(tokenizer, value, config.max_positions)]
            val_scene = _evaluate(model, rows, pad_id, config, device, context=SCENE_LENGTH)
        eval_time = time.perf_counter() - eval_start

    model.eval()
    lm_dir = out_dir / _LM_NAME

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    atomic_dir(lm_dir, save)  # a crash never leaves half a model
    result = {
        "format_version": _FORMAT_VERSION,
        "config": _config_dict(config),
        "world_sha256": fingerprint,
        "lm_dir": str(lm_dir.resolve()),
        "model_type": model.config.model_type,
        "vocab_size": model.config.vocab_size,
        "tokenizer_size": len(tokenizer),
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_sequences": {key: len(rows) for key, rows in train_rows.items()},
        "sequences_seen": config.steps * config.batch_size,
        "final_train_loss": curve[-1]["loss"] if curve else last_loss,
        "val_sequences": sum(len(rows) for rows in val_rows.values()),
        "val_loss": _mean_nll(*val.values()),
        "val_perplexity": _perplexity(*val.values()),
        "val_caption_perplexity": _perplexity(val["captions"]),
        "val_vqa_perplexity": _perplexity(val["vqa"]),
        "val_perplexity_shifted": _perplexity(val_shifted),
        "val_scene_perplexity": _perplexity(val_scene) if val_scene else None,
        "loss_curve": curve,
        "time_s": {
            "tokenizer": tokenizer_time,
            "train": train_time,
            "train_cpu": train_cpu,
            "eval": eval_time,
            "total": time.perf_counter() - start,
        },
    }
    write_text(out_dir / _RESULT_NAME, json.dumps(result, indent=2) + "\n")
    return {**result, "cached": False}


def _mean_nll(*parts: tuple[float, int]) -> float | None:
    total, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return total / count if count else None


def _perplexity(*parts: tuple[float, int]) -> float | None:
    nll = _mean_nll(*parts)
    return math.exp(nll) if nll is not None else None
