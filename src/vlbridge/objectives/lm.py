"""Stage 2 (and instruction tuning): language modelling through the projected query outputs.

Decoder-only LLMs see `[prompt tokens with the image's prefix in its slot, target tokens + EOS, pad...]` and are
scored on the target tokens only (-100 on the image, the prompt and the padding). Encoder-decoder LLMs (T5) get the
queries and the prompt (for captions: a random prefix of the caption, the paper's prefix-LM) in the encoder
and the rest of the text as the decoder target. Logits are computed only where a target token is predicted.

Shapes: B batch, Q queries, D LLM width, P sequence length, V vocabulary.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlbridge.inference.prefix import IMAGE
from vlbridge.inference.tasks import assemble_prefix


def split_prefix(caption: str, rng: random.Random) -> tuple[str, str]:
    """Prefix-LM split of a caption at a random word: (encoder prefix, decoder target), target never empty."""
    words = caption.split()
    if len(words) <= 1:
        return "", caption.strip()
    k = rng.randrange(0, len(words))  # 0 .. n-1 words go to the encoder
    return " ".join(words[:k]), " ".join(words[k:])


def decoder_lm_loss(
    model: nn.Module,
    soft: Tensor,
    prompts: list[list[int]],
    targets: list[list[int]],
    *,
    num_tokens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Summed target-token cross-entropy / `num_tokens` (default: this batch's); returns (loss, token count)."""
    rows = [p + t for p, t in zip(prompts, targets)]
    labels = [[-100] * len(p) + t for p, t in zip(prompts, targets)]  # the prompt (and its image slot) not scored
    return labelled_lm_loss(model, soft, rows, labels, num_tokens=num_tokens)


def labelled_lm_loss(
    model: nn.Module,
    soft: Tensor,
    token_lists: list[list[int]],
    label_lists: list[list[int]],
    *,
    num_tokens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The LM loss of rows tokenised with their labels (conversations: -100 but on the assistant's turns); each
    IMAGE slot holds one image's prefix (its labels -100). Returns (loss, token count) as `decoder_lm_loss`."""
    lm = model.language_model
    embeds, mask, _, ids = assemble_prefix(model, soft, token_lists, left=False)
    Q = soft.shape[1]
    labels = torch.full_like(ids, -100)
    for i, (toks, labs) in enumerate(zip(token_lists, label_lists)):
        if len(toks) != len(labs):
            raise ValueError(f"row {i}: {len(toks)} tokens but {len(labs)} labels")
        pos = 0
        for t, label in zip(toks, labs):
            if t == IMAGE:
                pos += Q
                continue
            labels[i, pos] = label
            pos += 1
    return _shifted_loss(lm, embeds, mask, labels, num_tokens)


def _shifted_loss(
    lm: nn.Module, embeds: Tensor, mask: Tensor, labels: Tensor, num_tokens: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy on the labelled positions (logits only there) / `num_tokens`."""
    hidden = lm.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # [B, P, D]
    predicts = labels[:, 1:] != -100  # position j predicts token j + 1
    logits = lm.get_output_embeddings()(hidden[:, :-1][predicts]).float()  # [n_targets, V]
    total = F.cross_entropy(logits, labels[:, 1:][predicts], reduction="sum")
    count = predicts.sum()
    return total / (count if num_tokens is None else num_tokens), count


def encoder_decoder_lm_loss(
    model: nn.Module,
    soft: Tensor,
    prompts: list[list[int]],
    targets: list[list[int]],
    *,
    num_tokens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """T5: queries + prompt in the encoder, targets (teacher-forced) in the decoder."""
    lm = model.language_model
    embeds, mask, _, _ = assemble_prefix(model, soft, prompts, left=False)
    width = max(len(t) for t in targets)
    labels = torch.full((len(targets), width), -100, dtype=torch.long, device=soft.device)
    for i, t in enumerate(targets):
        labels[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    logits = lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).logits.float()  # [B, T, V]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    count = (labels != -100).sum()
    return total / (count if num_tokens is None else num_tokens), count
