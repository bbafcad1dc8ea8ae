"""Where the image goes in the LM's input: prompt tokens with image slots, and the spliced input embeddings.

A prompt's token list carries `IMAGE` (LLaVA's -200) wherever an image goes: where the prompt has the
`<image>` placeholder, or, without one, by the checkpoint's convention (`PromptStyle.image_first`: LLaVA puts
`"<image>\\n"` before the prompt; None: the visual prefix before everything, BOS included, as BLIP-2). Each
`IMAGE` expands to the bridge's Q prefix tokens when the embeddings are assembled. Generation, scoring, the LM
loss and the training collates all build their inputs here, so they agree on every position.

Shapes: M images, Q prefix tokens per image, D LM width, B rows, P assembled length.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vlbridge.errors import InputError

IMAGE = -200  # an image slot in a token list (never a real token id)


def image_token_id(tokenizer: Any, marker: str) -> int:
    """The id `tokenizer` gives the placeholder; added as a special token if it has none (the id never reaches
    the LM's embeddings: image slots are filled with the bridge's prefix)."""
    if marker not in tokenizer.get_vocab():
        tokenizer.add_tokens([marker], special_tokens=True)
    return int(tokenizer.convert_tokens_to_ids(marker))


def prompt_tokens(tokenizer: Any, style: Any, prompt: str, *, images: int = 1) -> list[int]:
    """Token ids of `prompt` (with the tokenizer's special tokens) and `images` IMAGE slots in it.

    Raises:
        InputError: The prompt has placeholders, but not one per image.
    """
    if tokenizer is None:
        raise InputError("this model has no LLM tokenizer")
    marker = style.image_token
    found = prompt.count(marker) if marker else 0
    if found == 0:
        if style.image_first is None:
            return [IMAGE] * images + tokenizer(prompt).input_ids
        prompt = style.image_first * images + prompt
    elif found != images:
        raise InputError(
            f"the prompt has {found} {marker} placeholder{'s' if found != 1 else ''} but {images} "
            f"image{'s are' if images != 1 else ' is'} given for it: {prompt!r}"
        )
    marker_id = image_token_id(tokenizer, marker)
    return [IMAGE if t == marker_id else t for t in tokenizer(prompt).input_ids]


def expanded_length(tokens: list[int], num_visual: int) -> int:
    """Positions `tokens` take once each IMAGE slot holds `num_visual` prefix tokens."""
    return len(tokens) + tokens.count(IMAGE) * (num_visual - 1)


def keep_end(tokens: list[int], n: int) -> list[int]:
    """The last `n` tokens' worth of `tokens`, keeping every IMAGE slot (the oldest text goes first)."""
    excess = len(tokens) - n
    if excess <= 0:
        return tokens
    out = []
    for t in tokens:
        if excess > 0 and t != IMAGE:
            excess -= 1
            continue
        out.append(t)
    return out


def assemble_prefix(
    language_model: nn.Module, prefix: Tensor, token_lists: list[list[int]], *, pad_id: int, left: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The LM's input embeddings for rows of tokens with IMAGE slots, each slot filled by one image's prefix.

    `prefix` [M, Q, D] holds the images in row-major slot order. Rows are padded on the left (generation) or on
    the right (scoring, training). Returns (embeds [B, P, D], mask [B, P], slots [B, P] bool: the image positions,
    ids [B, P]: the tokens, pad in the slots).

    Raises:
        InputError: The rows have more or fewer slots than images given.
    """
    M, Q, _ = prefix.shape
    slots_per_row = [t.count(IMAGE) for t in token_lists]
    if sum(slots_per_row) != M:
        raise InputError(f"{sum(slots_per_row)} image places in the text but {M} images: give one per place")
    lengths = [expanded_length(t, Q) for t in token_lists]
    B, P = len(token_lists), max(lengths)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    slots = torch.zeros(B, P, dtype=torch.bool)
    mask = torch.zeros(B, P, dtype=torch.long)
    for i, toks in enumerate(token_lists):
        start = P - lengths[i] if left else 0
        mask[i, start : start + lengths[i]] = 1
        pos = start
        for t in toks:
            if t == IMAGE:
                slots[i, pos : pos + Q] = True
                pos += Q
            else:
                ids[i, pos] = t
                pos += 1
    device = prefix.device
    ids, slots, mask = ids.to(device), slots.to(device), mask.to(device)
    embeds = language_model.get_input_embeddings()(ids)  # [B, P, D]
    embeds = embeds.masked_scatter(slots[..., None], prefix.to(embeds.dtype))  # row-major: images in slot order
    return embeds, mask, slots, ids
