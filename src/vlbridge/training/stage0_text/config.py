"""The settings of stage 0's language model, its tokenizer and its training (:class:`Stage0TextConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vlbridge.errors import ConfigError
from vlbridge.training.stage0_text.tokenizer import ALPHABET, SPECIAL_TOKENS


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
        if self.max_vocab_size < len(SPECIAL_TOKENS) + 2 * len(ALPHABET):
            raise ConfigError(f"stage0_text.max_vocab_size is too small to hold the alphabet: {self.max_vocab_size}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"stage0_text.num_threads must be >= 1 or None, got {self.num_threads}")
        if self.val_max_sequences is not None and self.val_max_sequences < 1:
            raise ConfigError(f"stage0_text.val_max_sequences must be >= 1 or None, got {self.val_max_sequences}")
