"""The bearer API key: a pure ASGI middleware that checks it before a request body is read or parsed.

Every path under ``/v1/`` needs ``Authorization: Bearer KEY`` when the service has a key; ``/healthz`` and the page
(``/``, ``/static/...``) do not (the page asks for the key and sends it with its own requests).
"""

from __future__ import annotations

import hmac
from typing import Any

from vlbridge.serving.errors import error_bytes

PROTECTED_PREFIX = "/v1/"


class ApiKeyMiddleware:
    """Answer 401 to ``/v1/`` requests without the right bearer key."""

    def __init__(self, app: Any, *, api_key: str | None) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.key is None or scope["type"] != "http" or not scope.get("path", "").startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        if self._authorised(scope):
            await self.app(scope, receive, send)
            return
        body = error_bytes(
            "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
            type="authentication_error",
            code="invalid_api_key",
        )
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _authorised(self, scope: dict[str, Any]) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False
