"""Settings of the HTTP service: limits, batching, image fetching, authentication."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # a few data-URI photos; a 64 MiB body is refused (413)


@dataclass
class ServeSettings:
    """How the service behaves. Every limit answers with a JSON error and the server keeps serving.

    Attributes:
        api_key: Bearer key every ``/v1`` request must carry (``Authorization: Bearer KEY``); None: no key. Required
            when the service listens beyond loopback (:func:`check_exposure`).
        max_body_bytes: Request bodies above this are refused with 413 before they are parsed.
        max_pixels: Decoded image size limit (width x height), checked on the header before decoding (400).
        max_images: Images per request.
        max_tokens: Upper bound of a request's ``max_tokens`` (larger ones are refused, 400).
        default_max_tokens: ``max_tokens`` when a request gives none.
        max_n: Upper bound of ``n`` (choices per chat request).
        request_timeout: Seconds a request may wait for and run its model work before a 504.
        max_batch_size: Requests gathered into one model call; 1 turns dynamic batching off.
        max_wait_ms: How long the batcher waits for more requests after the first arrives.
        allow_remote_images: Fetch ``http(s)://`` image URLs (never ``file://`` or other schemes).
        fetch_timeout: Seconds for fetching one remote image.
        max_fetch_bytes: Size limit of one fetched image.
        allow_private_hosts: Let remote URLs reach private, loopback and link-local addresses (tests only).
        thumbnail_size: Longest side of the thumbnails the page shows for search results.
        model_name: The model id reported by ``/v1/models`` and in responses.
    """

    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_pixels: int = 40_000_000
    max_images: int = 16
    max_tokens: int = 256
    default_max_tokens: int = 30
    max_n: int = 8
    request_timeout: float = 60.0
    max_batch_size: int = 16
    max_wait_ms: float = 10.0
    allow_remote_images: bool = False
    fetch_timeout: float = 10.0
    max_fetch_bytes: int = 16 * 1024 * 1024
    allow_private_hosts: bool = False
    thumbnail_size: int = 256
    model_name: str = "vlbridge"

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_pixels", "max_images", "max_tokens", "max_n", "max_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_wait_ms < 0 or self.request_timeout <= 0 or self.fetch_timeout <= 0:
            raise ValueError("max_wait_ms must be >= 0, request_timeout and fetch_timeout > 0")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty (use None for no key)")


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (what the server binds to) is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost: assume it is reachable from elsewhere


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond loopback without an API key.

    Raises:
        InputError: ``host`` is not a loopback address and no key is set.
    """
    from vlbridge.errors import InputError

    if not is_loopback_host(host) and not api_key:
        raise InputError(
            f"refusing to listen on {host} without an API key: anyone who can reach it could use the model; "
            "pass --api-key KEY (or set VLBRIDGE_API_KEY), or keep the default --host 127.0.0.1 behind a proxy"
        )
