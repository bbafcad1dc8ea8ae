"""Request bodies of the service (pydantic): OpenAI's chat completion schema and vlbridge's own endpoints.

Unknown fields are ignored, as OpenAI clients send many (``user``, ``seed``, ``presence_penalty`` ...); a field of
the wrong type or out of range is a 422 naming it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageUrl(_Body):
    url: str
    detail: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageUrl | str  # some clients send the URL string directly


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_Body):
    """``POST /v1/chat/completions``. Decoding is greedy unless ``temperature`` > 0 or ``top_p`` < 1 is given."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stream: bool = False


class CaptionRequest(_Body):
    """``POST /v1/captions``: ``image`` or ``images`` (data URIs, or http(s) URLs where allowed)."""

    image: str | None = None
    images: list[str] | None = None
    prompt: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)


class EmbeddingRequest(_Body):
    """``POST /v1/embeddings``: texts in ``input`` (OpenAI's field) or images in ``images``; not both."""

    model: str | None = None
    input: str | list[str] | None = None
    images: list[str] | None = None


class ItmRequest(_Body):
    """``POST /v1/itm``: how well each text matches the image."""

    image: str
    texts: list[str] = Field(min_length=1)


class SearchRequest(_Body):
    """``POST /v1/search``: a ``text`` or an ``image`` query against the server's index."""

    text: str | None = None
    image: str | None = None
    k: int = Field(default=10, ge=1, le=1000)
    rerank: bool = False
    shortlist: int | None = Field(default=None, ge=1, le=1000)
