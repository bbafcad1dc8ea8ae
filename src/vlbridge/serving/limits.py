"""A cap on request bodies, enforced before anything parses them (FastAPI and uvicorn have none).

A pure ASGI middleware: a declared ``Content-Length`` over the cap is answered with 413 at once, without reading
the body; otherwise the body is read here as it streams in (chunked bodies too), counted chunk by chunk and cut
off with 413 as soon as it passes the cap, so no more than the cap is ever held. The app then receives the body
in one piece.
"""

from __future__ import annotations

from typing import Any

from vlbridge.serving.errors import error_bytes

Scope = dict[str, Any]
Message = dict[str, Any]


class BodyLimitMiddleware:
    """Refuse HTTP request bodies larger than ``max_bytes`` with 413 and a JSON error."""

    def __init__(self, app: Any, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as a streaming response expects

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any) -> None:
        body = error_bytes(f"request body larger than the limit of {self.max_bytes:,} bytes", code="body_too_large")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),  # the rest of the body is never read: the connection cannot be reused
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
