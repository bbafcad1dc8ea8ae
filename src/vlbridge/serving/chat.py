"""OpenAI chat completions over BLIP-2's chat convention: messages in, one image and a turn history out.

BLIP-2 talks about one image. The conversation's image is the last ``image_url`` part in the messages; text parts of
consecutive user messages are joined; each user message followed by an assistant message is a finished turn,
replayed with the checkpoint's ``chat_turn`` template (``Question: {} Answer: {}``), and the last user message is
asked with its ``vqa_template`` (oldest turns dropped first when the prompt would not fit, as ``Blip2.chat``). A
last user message with an image and no text asks for a caption. System messages have no place in BLIP-2's prompt
and are ignored.

Streaming sends the generated text as server-sent events in OpenAI's chunk format (a role chunk, content chunks,
a chunk with ``finish_reason``, then ``data: [DONE]``). The text is generated first, then streamed: errors are
still answered with a status code, and streamed requests batch with the others.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vlbridge.serving.errors import ApiError
from vlbridge.serving.schemas import ChatCompletionRequest, ChatMessage, ImagePart, TextPart
from vlbridge.serving.worker import Generated


@dataclass
class Conversation:
    """What the model needs from a list of messages."""

    image_url: str
    history: list[tuple[str, str]]
    message: str | None  # None: caption the image
    n_images: int


def _parts(message: ChatMessage) -> tuple[list[str], list[str]]:
    """(texts, image URLs) of one message."""
    if message.content is None:
        return [], []
    if isinstance(message.content, str):
        return [message.content], []
    texts, urls = [], []
    for part in message.content:
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, ImagePart):
            urls.append(part.image_url if isinstance(part.image_url, str) else part.image_url.url)
    return texts, urls


def parse_conversation(request: ChatCompletionRequest, *, max_images: int) -> Conversation:
    """Messages -> the conversation's image, finished turns and latest message.

    Raises:
        ApiError: 400 without an image, with too many, or when the last message is not the user's.
    """
    turns: list[list[str]] = []  # [user text, assistant text] pairs being built
    urls: list[str] = []
    last_role = None
    for message in request.messages:
        texts, images = _parts(message)
        urls.extend(images)
        text = " ".join(t.strip() for t in texts if t.strip())
        if message.role == "user":
            if last_role == "user":
                turns[-1][0] = " ".join(x for x in (turns[-1][0], text) if x)
            else:
                turns.append([text, ""])
            last_role = "user"
        elif message.role == "assistant":
            if last_role != "user":
                raise ApiError(400, "an assistant message must follow a user message", code="invalid_messages")
            turns[-1][1] = text
            last_role = "assistant"
    if last_role != "user":
        raise ApiError(400, "the last message must be the user's", code="invalid_messages")
    if not urls:
        raise ApiError(400, "a chat completion needs an image: add an image_url content part", code="missing_image")
    if len(urls) > max_images:
        raise ApiError(400, f"{len(urls)} images in one request; at most {max_images}", code="too_many_images")
    *done, (question, _) = turns
    history = [(q, a) for q, a in done if q]
    return Conversation(image_url=urls[-1], history=history, message=question or None, n_images=len(urls))


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion_response(results: list[Generated], *, model: str, request_id: str) -> dict[str, Any]:
    """The non-streamed OpenAI response."""
    prompt_tokens = results[0].prompt_tokens if results else 0
    completion_tokens = sum(r.completion_tokens for r in results)
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": None,
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(results)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def stream_events(results: list[Generated], *, model: str, request_id: str) -> Iterator[str]:
    """Server-sent events in OpenAI's ``chat.completion.chunk`` format, ending with ``data: [DONE]``."""
    created = int(time.time())

    def chunk(index: int, delta: dict[str, Any], finish: str | None) -> str:
        body = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        return f"data: {json.dumps(body)}\n\n"

    for i, result in enumerate(results):
        yield chunk(i, {"role": "assistant", "content": ""}, None)
        for piece in re.findall(r"\S+\s*|\s+", result.text):  # word by word, spaces kept
            yield chunk(i, {"content": piece}, None)
        yield chunk(i, {}, result.finish_reason)
    yield "data: [DONE]\n\n"
