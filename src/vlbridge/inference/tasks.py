"""What users do with a model: caption, answer, chat, score, match (ITM), compare (ITC) and embed.

Each function batches internally, takes images as paths / PIL images / pixel tensors, and checks its
arguments before any model work. The LLM sees a left-padded row of prompt tokens with the image's prefix in its
slot (`inference.prefix`: where the prompt's `<image>` is, or by the checkpoint's convention); an
instruction-aware bridge (InstructBLIP) also reads the prompt. ITM/ITC need a bridge with matching heads.

Shapes: B batch, Q prefix tokens per image, D LLM width, P prefix length, T text length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlbridge.errors import InputError
from vlbridge.inference import prefix
from vlbridge.inference.generation import GenerationSettings, generate

Model = nn.Module  # a `vlbridge.models.vlm.VisionLanguageModel`; never imported here (it imports this module)

DEFAULT_BATCH_SIZE = 8


# --------------------------------------------------------------------------------------------- inputs
def _as_list(items, name: str) -> list:
    if isinstance(items, Tensor):
        if items.dim() == 3:
            return [items]
        return list(items)
    if isinstance(items, str | bytes) or not isinstance(items, Sequence):
        return [items]
    items = list(items)
    if not items:
        raise InputError(f"no {name} given")
    return items


def _texts(texts, name: str, n: int | None = None) -> list[str]:
    texts = [texts] * (n or 1) if isinstance(texts, str) else list(texts)
    if not texts:
        raise InputError(f"no {name} given")
    for t in texts:
        if not isinstance(t, str):
            raise InputError(
                f"each {name[:-1] if name.endswith('s') else name} must be a string, got {type(t).__name__}"
            )
        if not t.strip():
            raise InputError(f"empty {name[:-1] if name.endswith('s') else name}")
    if n is not None and len(texts) != n:
        raise InputError(f"{n} images but {len(texts)} {name}: give one per image (or a single one for all)")
    return texts


def pixel_values(model: Model, images) -> Tensor:
    """Preprocess images with the checkpoint's processor settings -> [B, 3, H, W]."""
    if isinstance(images, Tensor) and images.dim() == 4:
        from vlbridge.data.images import check_finite

        return check_finite(images)
    if model.image_processor is None:
        raise InputError("this model has no image processor settings: pass preprocessed pixel_values tensors")
    return model.image_processor(images)


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


# --------------------------------------------------------------------------------------------- prefix
def _qformer_tokens(model: Model, texts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
    """Texts in the bridge's own vocabulary (a Q-Former's BERT tokens)."""
    return model.bridge_text(texts, max_length)


def _soft_prompts(model: Model, pixels: Tensor, prompts: list[str] | None) -> Tensor:
    """Images (+ instructions, for an instruction-aware bridge) -> visual prefixes [B, Q, D]."""
    return model.visual_prefix(pixels, prompts)


def assemble_prefix(model: Model, soft: Tensor, token_lists: list[list[int]], *, left: bool = True):
    """The LM's input for token rows with IMAGE slots (see `vlbridge.inference.prefix.assemble_prefix`)."""
    return prefix.assemble_prefix(model.language_model, soft, token_lists, pad_id=_pad_id(model), left=left)


def _pad_id(model: Model) -> int:
    tok, cfg = model.tokenizer, model.language_model.generation_config
    for candidate in (tok.pad_token_id if tok is not None else None, cfg.pad_token_id, _eos_ids(model)[0]):
        if candidate is not None:
            return int(candidate)
    return 0


def _eos_ids(model: Model) -> list[int]:
    eos = model.language_model.generation_config.eos_token_id
    if eos is None and model.tokenizer is not None:
        eos = model.tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]


def _prompt_tokens(model: Model, prompt: str) -> list[int]:
    """The prompt's tokens with the image's slot (`prefix.IMAGE`) where the model's convention puts it."""
    return prefix.prompt_tokens(model.tokenizer, model.config.prompts, prompt)


# --------------------------------------------------------------------------------------------- length limits
def max_positions(model: Model) -> int | None:
    """How many positions the LLM can attend over (visual prefix + text + generated), or None for no fixed limit.

    Decoder-only LLMs with learned or rotary positions have one (`max_position_embeddings`, GPT-2's
    `n_positions`); T5's relative positions have none.
    """
    lm = model.language_model
    if lm is None or lm.config.is_encoder_decoder:
        return None
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(lm.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _num_queries(model: Model) -> int:
    """Prefix positions one image takes in the LM."""
    return model.num_visual_tokens


def check_fits(model: Model, token_lists: list[list[int]], extra: int, what: str) -> None:
    """Refuse inputs that, with their images' prefixes and `extra` more tokens, exceed the LLM's positions.

    Raises:
        InputError: Names the input, its length in tokens and the limit.
    """
    limit = max_positions(model)
    if limit is None:
        return
    Q = _num_queries(model)
    visual = max(t.count(prefix.IMAGE) for t in token_lists) * Q
    longest = max(prefix.expanded_length(t, Q) for t in token_lists) - visual  # text tokens of the longest row
    if visual + longest + extra <= limit:
        return
    room = limit - visual - longest
    if room >= 1 and extra > 1 and what != "text":  # the input fits; only the generation budget does not
        raise InputError(
            f"max_new_tokens={extra} does not fit: the {what} takes {visual} + {longest} of the model's {limit} "
            f"positions, so at most {room} new tokens can be generated"
        )
    raise InputError(
        f"{what} too long: {longest} tokens, but the model has {limit} positions, {visual} of them for the image "
        f"(at most {max(0, limit - visual - extra)} tokens here); shorten it"
    )


# --------------------------------------------------------------------------------------------- generation
@torch.inference_mode()
def generate_text(
    model: Model,
    images,
    prompts: list[str],
    settings: GenerationSettings,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Generate one text per (image, prompt) pair."""
    images = _as_list(images, "images")
    if len(prompts) != len(images):
        raise InputError(f"{len(images)} images but {len(prompts)} prompts")
    lm = model.language_model
    if lm is None:
        raise InputError("this model has no language model: it can match and compare (itm/itc) but not generate")
    out: list[str] = []
    for sl in _chunks(len(images), batch_size):
        batch_prompts = prompts[sl]
        token_lists = [_prompt_tokens(model, p) for p in batch_prompts]
        check_fits(model, token_lists, settings.max_new_tokens, "prompt")
        pixels = pixel_values(model, images[sl])
        soft = _soft_prompts(model, pixels, batch_prompts)
        embeds, mask, _, _ = assemble_prefix(model, soft, token_lists)
        tokens = generate(
            lm,
            embeds,
            mask,
            settings,
            eos_token_ids=_eos_ids(model),
            pad_token_id=_pad_id(model),
            decoder_start_token_id=_decoder_start(lm),
            generator=generator,
        )
        out.extend(t.strip() for t in model.tokenizer.batch_decode(tokens, skip_special_tokens=True))
    return out


def caption(
    model: Model,
    images,
    prompt: str | Sequence[str] | None = None,
    *,
    num_beams: int = 1,
    max_new_tokens: int = 30,
    do_sample: bool = False,
    top_p: float = 1.0,
    temperature: float = 1.0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    **settings,
) -> list[str]:
    """Caption images; `prompt` is one string for all images or one per image (None: the checkpoint's default).

    An empty prompt is an error (say None for the default); in a per-image list, None entries take the default.
    """
    images = _as_list(images, "images")
    default = model.config.prompts.caption_prompt
    if prompt is None:
        prompts = [default] * len(images)
    elif isinstance(prompt, str):
        prompts = _texts(prompt, "prompts", len(images))
    else:
        given = list(prompt)
        filled = _texts([p if p is not None else "x" for p in given], "prompts", len(images))
        prompts = [default if p is None else f for p, f in zip(given, filled)]
    s = GenerationSettings(
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=do_sample,
        top_p=top_p,
        temperature=temperature,
        **settings,
    )
    return generate_text(model, images, prompts, s, batch_size=batch_size)


def answer(
    model: Model,
    images,
    questions: str | Sequence[str],
    *,
    num_beams: int = 1,
    max_new_tokens: int = 10,
    batch_size: int = DEFAULT_BATCH_SIZE,
    **settings,
) -> list[str]:
    """Answer one question per image with the checkpoint's VQA prompt template."""
    images = _as_list(images, "images")
    questions = _texts(questions, "questions", len(images))
    prompts = [model.config.prompts.vqa_template.format(q.strip()) for q in questions]
    s = GenerationSettings(max_new_tokens=max_new_tokens, num_beams=num_beams, **settings)
    return generate_text(model, images, prompts, s, batch_size=batch_size)


class Chat:
    """A multi-turn conversation about one image; the history is kept and replayed in the prompt.

    Example:
        chat = model.chat("photo.jpg")
        chat.ask("what is in the picture?")
        chat.ask("what colour is it?")
    """

    def __init__(self, model: Model, image, *, max_new_tokens: int = 30, num_beams: int = 1) -> None:
        self.model = model
        self.pixels = pixel_values(model, [image] if not isinstance(image, Tensor) or image.dim() == 3 else image)
        if self.pixels.shape[0] != 1:
            raise InputError("a chat is about exactly one image")
        self.history: list[tuple[str, str]] = []
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens, num_beams=num_beams)

    def prompt(self, message: str) -> str:
        """The prompt for `message`: as many of the latest turns as fit the LLM's positions, oldest dropped first."""
        style = self.model.config.prompts
        turns = [style.chat_turn.format(q, a) for q, a in self.history]
        question = style.vqa_template.format(message.strip())
        limit = max_positions(self.model)
        if limit is None or self.model.tokenizer is None:
            return " ".join([*turns, question])
        budget = limit - self.settings.max_new_tokens
        Q = _num_queries(self.model)
        for start in range(len(turns) + 1):  # drop the oldest turn until the rest fits
            text = " ".join([*turns[start:], question])
            if prefix.expanded_length(_prompt_tokens(self.model, text), Q) <= budget:
                return text
        return question  # does not fit even alone: generate_text says so

    def ask(self, message: str) -> str:
        """Answer `message`, with the earlier turns that fit replayed in the prompt."""
        (message,) = _texts(message, "messages", 1)
        reply = generate_text(self.model, self.pixels, [self.prompt(message)], self.settings)[0]
        self.history.append((message.strip(), reply))
        return reply

    def reset(self) -> None:
        self.history.clear()


# --------------------------------------------------------------------------------------------- scoring
@torch.inference_mode()
def score(
    model: Model,
    images,
    texts: str | Sequence[str],
    *,
    prompt: str | Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[float]:
    """Log-likelihood of each text given its image (and prompt): sum of log p over the text's tokens + EOS."""
    images = _as_list(images, "images")
    texts = _texts(texts, "texts", len(images))
    prompts = (
        [model.config.prompts.caption_prompt] * len(images)
        if prompt is None
        else _texts(prompt, "prompts", len(images))
    )
    lm = model.language_model
    if lm is None:
        raise InputError("this model has no language model: score needs one")
    eos = _eos_ids(model)
    out: list[float] = []
    for sl in _chunks(len(images), batch_size):
        pixels = pixel_values(model, images[sl])
        soft = _soft_prompts(model, pixels, prompts[sl])
        prompt_tokens = [_prompt_tokens(model, p) for p in prompts[sl]]
        check_fits(model, prompt_tokens, 1, "prompt")
        if lm.config.is_encoder_decoder:
            targets = [model.tokenizer(t).input_ids for t in texts[sl]]  # T5 appends </s>
            out.extend(_score_encoder_decoder(model, soft, prompt_tokens, targets))
        else:
            targets = [
                model.tokenizer(" " + t.strip(), add_special_tokens=False).input_ids + eos[:1] for t in texts[sl]
            ]
            check_fits(model, [p + t for p, t in zip(prompt_tokens, targets)], 0, "text")
            out.extend(_score_decoder(model, soft, prompt_tokens, targets))
    return out


def _score_decoder(model: Model, soft: Tensor, prompts: list[list[int]], targets: list[list[int]]) -> list[float]:
    joined = [p + t for p, t in zip(prompts, targets)]
    embeds, mask, _, ids = assemble_prefix(model, soft, joined, left=False)  # [prompt with image, target, pad...]
    Q = soft.shape[1]
    logits = model.language_model(inputs_embeds=embeds, attention_mask=mask).logits.float()  # [B, P, V]
    logp = F.log_softmax(logits[:, :-1], dim=-1)  # position j predicts token j + 1
    scores = []
    for i, (p, t) in enumerate(zip(prompts, targets)):
        first = prefix.expanded_length(p, Q)  # index of the first target token
        positions = torch.arange(first - 1, first - 1 + len(t), device=logits.device)
        scores.append(float(logp[i, positions, ids[i, first : first + len(t)]].sum()))
    return scores


def _score_encoder_decoder(
    model: Model, soft: Tensor, prompts: list[list[int]], targets: list[list[int]]
) -> list[float]:
    lm = model.language_model
    embeds, mask, _, _ = assemble_prefix(model, soft, prompts)
    width = max(len(t) for t in targets)
    labels = torch.full((len(targets), width), -100, dtype=torch.long, device=soft.device)
    for i, t in enumerate(targets):
        labels[i, : len(t)] = torch.tensor(t)
    logits = lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).logits.float()  # [B, T, V]
    logp = F.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # [B, T]
    return (picked * (labels != -100)).sum(-1).tolist()


def rank_answers(
    model: Model,
    images,
    questions: str | Sequence[str],
    candidates: Sequence[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[str]:
    """Closed-set VQA: the candidate with the highest log-likelihood for each (image, question)."""
    images = _as_list(images, "images")
    questions = _texts(questions, "questions", len(images))
    candidates = _texts(list(candidates), "candidates")
    best = []
    for image, q in zip(images, questions):
        prompt = model.config.prompts.vqa_template.format(q.strip())
        n = len(candidates)
        s = score(model, [image] * n, candidates, prompt=[prompt] * n, batch_size=batch_size)
        best.append(candidates[max(range(n), key=s.__getitem__)])
    return best


# --------------------------------------------------------------------------------------------- ITM / ITC
def _require_heads(model: Model):
    """The model's image-text matching heads (`RetrievalHeads`), or a clear error."""
    heads = model.retrieval
    if heads is None:
        raise InputError("this model has no ITM/ITC heads (a generation-only checkpoint); use a stage-1 model")
    return heads


@torch.inference_mode()
def itm(model: Model, images, texts: str | Sequence[str], *, batch_size: int = DEFAULT_BATCH_SIZE) -> list[float]:
    """Probability that each (image, text) pair matches, from the ITM head."""
    heads = _require_heads(model)
    images = _as_list(images, "images")
    texts = _texts(texts, "texts", len(images))
    out: list[float] = []
    for sl in _chunks(len(images), batch_size):
        state = heads.image_state(model.image_tokens(pixel_values(model, images[sl])))
        ids, mask = _qformer_tokens(model, texts[sl], heads.text_max_length)
        out.extend(heads.match_logits(state, ids, mask).float().softmax(-1)[:, 1].tolist())
    return out


@torch.inference_mode()
def embed_images(model: Model, images, *, batch_size: int = DEFAULT_BATCH_SIZE) -> Tensor:
    """Multi-vector ITC image embeddings [n_images, Q, E]: one L2-normalised vector per query, float32 on the CPU.

    An image's ITC similarity to a text is the best of its Q vectors against the text's (:func:`itc`).
    """
    heads = _require_heads(model)
    images = _as_list(images, "images")
    feats = [
        heads.image_embeddings(heads.image_state(model.image_tokens(pixel_values(model, images[sl])))).float().cpu()
        for sl in _chunks(len(images), batch_size)
    ]
    return torch.cat(feats)  # [I, Q, E]


@torch.inference_mode()
def embed_texts(model: Model, texts: str | Sequence[str], *, batch_size: int = 64) -> Tensor:
    """ITC text embeddings [n_texts, E] ([CLS] of a text-only Q-Former pass), L2-normalised, float32 on the CPU."""
    heads = _require_heads(model)
    texts = _texts(texts, "texts")
    feats = []
    for sl in _chunks(len(texts), batch_size):
        ids, mask = _qformer_tokens(model, texts[sl], heads.text_max_length)
        feats.append(heads.text_embeddings(ids, mask).float().cpu())
    return torch.cat(feats)  # [T, E]


def itc(model: Model, images, texts: str | Sequence[str], *, batch_size: int = DEFAULT_BATCH_SIZE) -> Tensor:
    """Cosine similarity [n_images, n_texts]: the best-matching query of each image against each text."""
    image_feats = embed_images(model, images, batch_size=batch_size)  # [I, Q, E]
    text_feats = embed_texts(model, texts)  # [T, E]
    return torch.einsum("iqe,te->iqt", image_feats, text_feats).amax(dim=1)  # [I, T]


def _decoder_start(lm) -> int | None:
    start = getattr(lm.generation_config, "decoder_start_token_id", None)
    return start if start is not None else getattr(lm.config, "decoder_start_token_id", None)
