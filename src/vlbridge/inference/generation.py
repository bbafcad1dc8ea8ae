"""Text generation from a soft prompt: greedy, beam search and nucleus sampling with a KV cache.

The prompt prefix (projected queries + prompt tokens, left-padded) arrives as embeddings. It is encoded
once per image — for beam search the prefix's cache is then repeated across beams instead of running the
prefill num_beams times. Beam search follows transformers' vectorised algorithm step for step (top 2K
candidates, length-normalised finished hypotheses, the same early-stopping heuristic) so both pick the
same tokens.

Shapes: B batch, K beams, P prefix length, D LLM width, V vocabulary, L generated length.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel

from vlbridge.errors import InputError

NEG_INF = -1.0e9  # transformers' "impossible" score; kept identical so ties break the same way


@dataclass
class GenerationSettings:
    """How to decode. `num_beams > 1` selects beam search; `do_sample` nucleus/top-k sampling."""

    max_new_tokens: int = 30
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    length_penalty: float = 1.0
    min_new_tokens: int = 0
    early_stopping: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError("max_new_tokens must be >= 1")
        if self.num_beams < 1:
            raise InputError("num_beams must be >= 1")
        if self.do_sample and self.num_beams > 1:
            raise InputError("sampling with beams is not supported; use num_beams=1 with do_sample")
        if self.temperature <= 0:
            raise InputError("temperature must be > 0")


class _Stepper:
    """Runs the language model one token at a time over a growing KV cache."""

    def __init__(self, lm: PreTrainedModel, prefix_embeds: Tensor, prefix_mask: Tensor) -> None:
        self.lm = lm
        self.encoder_decoder = bool(lm.config.is_encoder_decoder)
        self.mask = prefix_mask.long()  # [B, P] (decoder-only: grows with each token)
        if self.encoder_decoder:
            self.encoder_out = lm.get_encoder()(inputs_embeds=prefix_embeds, attention_mask=self.mask)
            self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        else:
            self.cache = DynamicCache()
            self.takes_positions = "position_ids" in inspect.signature(lm.forward).parameters
            self.prefix_embeds = prefix_embeds
            # As transformers' generate does: without padding the LLM gets no mask at all, so it builds none and
            # attention takes its unmasked (causal) path. The mask is still kept: it gives the positions.
            self.padded = not bool(self.mask.all())

    def prefill(self, first_tokens: Tensor | None) -> Tensor:
        """Encode the prefix (decoder-only) or the decoder start token (encoder-decoder); logits [B, V]."""
        if self.encoder_decoder:
            return self.step(first_tokens)
        P = self.mask.shape[1]
        # The last position as an index tensor, not `logits_to_keep=1`: the slice `[:, -1:]` is not contiguous,
        # and with frozen (no-grad) weights torch then runs the LM head as a batched matmul over B copies of
        # the [V, D] weight (seconds per call in bf16 on CPU). Indexing gives a contiguous [B, 1, D]: one matmul.
        last = torch.tensor([P - 1], device=self.mask.device)
        out = self.lm(
            inputs_embeds=self.prefix_embeds,
            attention_mask=self._mask(),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=last,
            **self._positions(P),
        )
        del self.prefix_embeds
        return out.logits[:, -1].float()

    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per row [B*]; logits of the next token [B*, V]."""
        if self.encoder_decoder:
            out = self.lm(
                encoder_outputs=self.encoder_out,
                attention_mask=self.mask,
                decoder_input_ids=tokens[:, None],
                past_key_values=self.cache,
                use_cache=True,
            )
        else:
            self.mask = F.pad(self.mask, (0, 1), value=1)
            out = self.lm(
                input_ids=tokens[:, None],
                attention_mask=self._mask(),
                past_key_values=self.cache,
                use_cache=True,
                **self._positions(1),
            )
        return out.logits[:, -1].float()

    def _mask(self) -> Tensor | None:
        return self.mask if self.padded else None

    def _positions(self, n: int) -> dict:
        if not self.takes_positions:
            return {}
        pos = self.mask.cumsum(-1) - 1
        pos = pos.masked_fill(self.mask == 0, 1)  # padded slots: any valid index, they are masked out
        return {"position_ids": pos[:, -n:]}

    def expand(self, k: int) -> None:
        """Repeat every row k times (beam search after a once-per-image prefill)."""
        self.mask = self.mask.repeat_interleave(k, dim=0)
        self.cache.batch_repeat_interleave(k)
        if self.encoder_decoder:
            self.encoder_out.last_hidden_state = self.encoder_out.last_hidden_state.repeat_interleave(k, dim=0)

    def select(self, rows: Tensor) -> None:
        """Keep (and reorder) rows of the running state: beam reordering."""
        self.mask = self.mask[rows]
        self.cache.reorder_cache(rows)


def _block(logits: Tensor, step: int, settings: GenerationSettings, eos: Tensor) -> Tensor:
    if step < settings.min_new_tokens and eos.numel():
        logits[:, eos] = -float("inf")
    return logits


@torch.inference_mode()
def generate(
    lm: PreTrainedModel,
    prefix_embeds: Tensor,
    prefix_mask: Tensor,
    settings: GenerationSettings,
    *,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    decoder_start_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Generate continuations of a left-padded prefix.

    Args:
        lm: a transformers causal LM or encoder-decoder (T5) with a language-modelling head.
        prefix_embeds: [B, P, D] input embeddings (soft prompt and prompt tokens), left-padded.
        prefix_mask: [B, P] 1 for real positions.
        settings: decoding settings.
        eos_token_ids: tokens that end a sequence.
        pad_token_id: fills finished sequences.
        decoder_start_token_id: first decoder token of an encoder-decoder model.
        generator: random generator for sampling.

    Returns:
        Generated token ids [B, L] (prompt excluded), padded with `pad_token_id` after the end.
    """
    with warnings.catch_warnings():
        # transformers warns on every call that `past_key_values` will be renamed; we pass a Cache object, which
        # every version takes, so the warning tells the user nothing.
        warnings.filterwarnings("ignore", message=r".*past_key_values.*deprecated", category=FutureWarning)
        return _generate(lm, prefix_embeds, prefix_mask, settings, eos_token_ids, pad_token_id,
                         decoder_start_token_id, generator)  # fmt: skip


def _generate(
    lm: PreTrainedModel,
    prefix_embeds: Tensor,
    prefix_mask: Tensor,
    settings: GenerationSettings,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    decoder_start_token_id: int | None,
    generator: torch.Generator | None,
) -> Tensor:
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=prefix_embeds.device)
    stepper = _Stepper(lm, prefix_embeds, prefix_mask)
    B = prefix_embeds.shape[0]
    start = None
    if stepper.encoder_decoder:
        if decoder_start_token_id is None:
            raise ValueError("an encoder-decoder model needs decoder_start_token_id")
        start = torch.full((B,), decoder_start_token_id, dtype=torch.long, device=prefix_embeds.device)
    expanded = False
    if stepper.encoder_decoder and settings.num_beams > 1:
        # The encoder already ran once per image; the decoder's first step is one token, so run it on every beam
        # as transformers does (identical numerics, negligible cost).
        stepper.expand(settings.num_beams)
        start = start.repeat_interleave(settings.num_beams)
        expanded = True
    logits = stepper.prefill(start)
    if settings.num_beams == 1:
        return _greedy_or_sample(stepper, logits, settings, eos, pad_token_id, generator)
    return _beam_search(stepper, logits, settings, eos, pad_token_id, expanded=expanded)


def _greedy_or_sample(
    stepper: _Stepper, logits: Tensor, s: GenerationSettings, eos: Tensor, pad: int, generator: torch.Generator | None
) -> Tensor:
    B = logits.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    out: list[Tensor] = []
    for step in range(s.max_new_tokens):
        logits = _block(logits, step, s, eos)
        if s.do_sample:
            token = _sample(logits, s, generator)
        else:
            token = logits.argmax(-1)  # [B]
        token = torch.where(done, torch.full_like(token, pad), token)
        out.append(token)
        done |= torch.isin(token, eos)
        if bool(done.all()) or step == s.max_new_tokens - 1:
            break
        logits = stepper.step(token)
    return torch.stack(out, dim=1)  # [B, L]


def _sample(logits: Tensor, s: GenerationSettings, generator: torch.Generator | None) -> Tensor:
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > s.top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, -float("inf"))
        logits = torch.full_like(logits, -float("inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)  # [B]


def _beam_search(
    stepper: _Stepper, logits: Tensor, s: GenerationSettings, eos: Tensor, pad: int, *, expanded: bool = False
) -> Tensor:
    """Vectorised beam search (transformers' algorithm); hypotheses are scored by sum log p / length^penalty.

    `logits` [B, V] of a once-per-image prefill (or [B*K, V] when the state is already `expanded` to beams).
    """
    if expanded:
        logits = logits[:: s.num_beams]
    B, V = logits.shape
    K = s.num_beams
    device = logits.device
    keep = max(2, 1 + eos.numel()) * K  # candidates per step, so K survivors remain even if K just ended
    L = s.max_new_tokens
    running = torch.full((B, K, L), pad, dtype=torch.long, device=device)  # running hypotheses' tokens
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = NEG_INF  # all beams start identical: only the first may expand at step 0
    finished = torch.full((B, K, L), pad, dtype=torch.long, device=device)
    finished_scores = torch.full((B, K), NEG_INF, device=device)
    finished_len = torch.zeros(B, K, dtype=torch.long, device=device)
    is_finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=device)
    top_k_mask = torch.arange(keep, device=device) < K  # only the best K candidates may become final
    if not expanded:
        stepper.expand(K)
    logits = logits.repeat_interleave(K, dim=0)  # [B*K, V]

    for step in range(L):
        # as transformers does: processors (min length) act on the log-probabilities, after the softmax
        log_probs = _block(F.log_softmax(logits, dim=-1), step, s, eos).view(B, K, V) + running_scores[:, :, None]
        cand_scores, cand_idx = torch.topk(log_probs.view(B, K * V), k=keep)  # [B, 2K]
        cand_beam, cand_token = cand_idx // V, cand_idx % V
        cand_seqs = torch.take_along_dim(running, cand_beam[:, :, None], dim=1).clone()  # [B, 2K, L]
        cand_seqs[:, :, step] = cand_token
        ends = torch.isin(cand_token, eos) | (step + 1 >= L)  # [B, 2K]

        # Survivors: the best K candidates that did not just end.
        alive_scores = cand_scores + ends.float() * NEG_INF
        survivors = torch.topk(alive_scores, k=K).indices  # [B, K]
        running = torch.take_along_dim(cand_seqs, survivors[:, :, None], dim=1)
        running_scores = torch.take_along_dim(alive_scores, survivors, dim=1)
        source_beam = torch.take_along_dim(cand_beam, survivors, dim=1)  # [B, K]

        # Finished: merge newly ended top-K candidates (length-normalised) into the finished set.
        just_ended = ends & top_k_mask[None, :]
        normed = cand_scores / ((step + 1) ** s.length_penalty)
        full = is_finished.all(dim=-1, keepdim=True) & s.early_stopping
        normed = normed + full.float() * NEG_INF + (~can_improve).float() * NEG_INF + (~just_ended).float() * NEG_INF
        merged_scores = torch.cat([finished_scores, normed], dim=1)
        best = torch.topk(merged_scores, k=K).indices
        finished = torch.take_along_dim(torch.cat([finished, cand_seqs], dim=1), best[:, :, None], dim=1)
        finished_scores = torch.take_along_dim(merged_scores, best, dim=1)
        cand_len = torch.full_like(cand_token, step + 1)
        finished_len = torch.take_along_dim(torch.cat([finished_len, cand_len], dim=1), best, dim=1)
        is_finished = torch.take_along_dim(torch.cat([is_finished, just_ended], dim=1), best, dim=1)

        # Early-stopping heuristic: can the best running beam still beat the worst finished one?
        best_running = running_scores[:, :1] / ((step + 1) ** s.length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, NEG_INF)
        can_improve = can_improve & (best_running > worst_finished).any(dim=-1, keepdim=True)
        stop = (~can_improve.any()) | (is_finished.all() & s.early_stopping) | ends.all()
        if bool(stop) or step == L - 1:
            break
        rows = (source_beam + torch.arange(B, device=device)[:, None] * K).view(-1)  # [B*K]
        stepper.select(rows)
        logits = stepper.step(running[:, :, step].reshape(-1))

    best = finished[:, 0]  # [B, L]
    length = int(finished_len[:, 0].max())
    return best[:, : max(length, 1)]
