"""The model side of the service: batched functions over a loaded model (and index), run by the batcher's thread.

Each function takes the payloads of one gathered batch and returns one result per payload. They receive images
already decoded and preprocessed into ``pixel_values`` (done in the request threads), so the worker only runs the
model: one ``generate_text`` call for a batch of chat turns and captions, one ``itm`` call, one embedding call.

Shapes: B batch, Q queries, E ITC embedding width.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vlbridge.errors import InputError
from vlbridge.inference import tasks
from vlbridge.inference.generation import GenerationSettings
from vlbridge.inference.prefix import expanded_length
from vlbridge.serving.batching import DynamicBatcher
from vlbridge.serving.settings import ServeSettings

if TYPE_CHECKING:
    from vlbridge.index import ImageIndex, SearchHit
    from vlbridge.models.vlm import VisionLanguageModel


@dataclass(frozen=True)
class DecodeKey:
    """Generation settings; only requests with equal settings are batched together."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0

    def settings(self) -> GenerationSettings:
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, temperature=self.temperature, top_p=self.top_p
        )


@dataclass
class TurnJob:
    """One text to generate about one image: a caption (``message`` None, or ``prompt``) or a chat turn.

    Attributes:
        pixels: ``[1, 3, H, W]`` preprocessed image.
        message: The user's latest message; None: caption the image.
        history: Earlier ``(user, assistant)`` turns, replayed with the model's chat convention.
        prompt: A caption prompt (None: the checkpoint's default).
    """

    pixels: Tensor
    message: str | None = None
    history: list[tuple[str, str]] = field(default_factory=list)
    prompt: str | None = None


@dataclass
class Generated:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"


@dataclass
class SearchJob:
    text: str | None
    pixels: Tensor | None  # [3, H, W]
    k: int
    rerank: bool
    shortlist: int


class ModelWorker:
    """Owns the model (and the index) and the batcher whose single thread is the only one to use them.

    Args:
        model: A loaded model (``vlbridge.load``).
        index: An opened :class:`vlbridge.index.ImageIndex`, or None.
        settings: Batch size and wait of the batcher.
    """

    def __init__(self, model: VisionLanguageModel, index: ImageIndex | None, settings: ServeSettings) -> None:
        self.model = model
        self.index = index
        self.settings = settings
        self._unique = itertools.count()
        self.batcher = DynamicBatcher(
            {
                "generate": self.generate,
                "itm": self.itm,
                "embed_images": self.embed_images,
                "embed_texts": self.embed_texts,
                "search": self.search,
            },
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
        )

    # ------------------------------------------------------------------------------------------------ model facts
    @property
    def can_generate(self) -> bool:
        return self.model.language_model is not None

    @property
    def has_itc(self) -> bool:
        return self.model.retrieval is not None and self.model.bridge_tokenizer is not None

    def unique_key(self) -> Hashable:
        """A key no other job has: such jobs are never batched (searches)."""
        return ("unique", next(self._unique))

    def preprocess(self, image: Any) -> Tensor:
        """A decoded image -> ``pixel_values`` [1, 3, H, W] (request threads; no model weights involved)."""
        return tasks.pixel_values(self.model, [image])

    def close(self) -> None:
        self.batcher.close()

    # ------------------------------------------------------------------------------------------------ batched calls
    @torch.inference_mode()
    def generate(self, key: DecodeKey, jobs: Sequence[TurnJob]) -> list[Generated]:
        """One ``generate_text`` call for captions and chat turns of equal settings."""
        model = self.model
        settings = key.settings()
        prompts = [self._prompt(job, settings.max_new_tokens) for job in jobs]
        pixels = torch.cat([job.pixels for job in jobs])  # [B, 3, H, W]
        texts = tasks.generate_text(model, pixels, prompts, settings, batch_size=len(jobs))
        visual = model.num_visual_tokens
        out = []
        for prompt, text in zip(prompts, texts):
            completion = len(model.tokenizer(text, add_special_tokens=False).input_ids) if text else 0
            prompt_tokens = expanded_length(tasks._prompt_tokens(model, prompt), visual)
            finish = "length" if completion >= settings.max_new_tokens else "stop"
            out.append(Generated(text, prompt_tokens, completion, finish))
        return out

    def _prompt(self, job: TurnJob, max_new_tokens: int) -> str:
        if job.message is None:
            return job.prompt if job.prompt is not None else self.model.config.prompts.caption_prompt
        chat = tasks.Chat(self.model, job.pixels, max_new_tokens=max_new_tokens)
        chat.history = list(job.history)
        return chat.prompt(job.message)  # the model's chat convention, oldest turns dropped to fit

    @torch.inference_mode()
    def itm(self, key: Hashable, payloads: Sequence[tuple[Tensor, list[str]]]) -> list[list[float]]:
        """Match probabilities: each payload is one image [1, 3, H, W] and the texts to match it with."""
        pixels = torch.cat([p.expand(len(texts), -1, -1, -1) for p, texts in payloads])  # [sum texts, 3, H, W]
        texts = [t for _, ts in payloads for t in ts]
        probs = tasks.itm(self.model, pixels, texts, batch_size=max(len(texts), 1))
        return _split(probs, [len(ts) for _, ts in payloads])

    @torch.inference_mode()
    def embed_images(self, key: Hashable, payloads: Sequence[Tensor]) -> list[Tensor]:
        """Multi-vector ITC embeddings: each payload [n, 3, H, W] -> [n, Q, E]."""
        feats = tasks.embed_images(self.model, torch.cat(list(payloads)), batch_size=sum(len(p) for p in payloads))
        return list(torch.split(feats, [len(p) for p in payloads]))

    @torch.inference_mode()
    def embed_texts(self, key: Hashable, payloads: Sequence[list[str]]) -> list[Tensor]:
        """ITC text embeddings: each payload (a list of texts) -> [n, E]."""
        texts = [t for p in payloads for t in p]
        feats = tasks.embed_texts(self.model, texts, batch_size=len(texts))
        return list(torch.split(feats, [len(p) for p in payloads]))

    def search(self, key: Hashable, payloads: Sequence[SearchJob]) -> list[list[SearchHit]]:
        if self.index is None:
            raise InputError("this server has no image index (start it with --index DIR)")
        out = []
        for job in payloads:  # unique keys: one at a time
            if job.text is not None:
                out.append(self.index.search(job.text, k=job.k, rerank=job.rerank, shortlist=job.shortlist))
            else:
                out.append(self.index.search(image=job.pixels, k=job.k))
        return out


def _split(values: list, sizes: list[int]) -> list[list]:
    out, start = [], 0
    for n in sizes:
        out.append(values[start : start + n])
        start += n
    return out
