"""The service's error responses: OpenAI's shape, ``{"error": {"message", "type", "code"}}``."""

from __future__ import annotations

import json
from typing import Any


class ApiError(Exception):
    """An error a request caused, answered with ``status`` and a JSON body; the server keeps serving.

    Attributes:
        status: HTTP status code.
        message: What went wrong, in words that name the bad input.
        type: OpenAI's error type (``invalid_request_error``, ``authentication_error``, ...).
        code: A short machine-readable code (``image_too_large``, ``body_too_large``, ...).
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code


def error_body(message: str, *, type: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "code": code}}


def error_bytes(message: str, *, type: str = "invalid_request_error", code: str | None = None) -> bytes:
    return json.dumps(error_body(message, type=type, code=code)).encode()
