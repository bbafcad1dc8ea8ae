"""The stage-0 OPT decoder: how it is built, its next-token loss (with a noisy scene record) and validation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from vlbridge.training.stage0_text.config import Stage0TextConfig


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and the attention mask."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def build_model(config: Stage0TextConfig, tokenizer: Any) -> Any:
    """A randomly initialised ``OPTForCausalLM`` of ``config``'s size for ``tokenizer`` (greedy generation)."""
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


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast on ``device`` when ``precision`` is ``"bf16"``, else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def shifted_positions(mask: torch.Tensor, offsets: torch.Tensor, max_positions: int) -> torch.Tensor:
    """Positions ``offset, offset + 1, ...`` per row (padding clamped into range; it is masked anyway)."""
    positions = torch.arange(mask.shape[1], device=mask.device)[None, :] + offsets[:, None].to(mask.device)
    return positions.clamp(max=max_positions - 1)


def token_nll(
    model: Any,
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
def evaluate_nll(
    model: Any,
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
        ids, mask = pad_rows(batch, pad_id)
        positions = None
        if shift:
            offsets = torch.tensor([min(shift, config.max_positions - len(row)) for row in batch])
            positions = shifted_positions(mask, offsets, config.max_positions).to(device)
        contexts = torch.full((len(batch),), context) if context else None
        with autocast(device, config.precision):
            loss, n = token_nll(model, ids.to(device), mask.to(device), positions, contexts)
        total, count = total + float(loss), count + int(n)
    model.train(was_training)
    return total, count


def mean_nll(*parts: tuple[float, int]) -> float | None:
    """The mean NLL per token of ``(summed NLL, tokens)`` parts; None when no token was scored."""
    total, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return total / count if count else None


def perplexity(*parts: tuple[float, int]) -> float | None:
    """``exp`` of :func:`mean_nll`."""
    nll = mean_nll(*parts)
    return math.exp(nll) if nll is not None else None
