"""Images from requests: ``data:`` URIs always, ``http(s)://`` URLs behind a flag, nothing else.

No path from a request ever reaches the file system: ``file://`` and every other scheme are refused, and a bare
string that is not a URL is refused too (the library would read it as a path).

Remote fetching guards against requests aimed at the server's own network (SSRF): the host is resolved once, every
address it resolves to must be public (not private, loopback, link-local, reserved, multicast), the connection goes
to that checked address (so a second DNS answer cannot swap it), redirects are not followed, and the download has
a timeout and a size cap. Decoded size is checked on the image header before any pixel is decoded.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
import urllib.parse

from PIL import Image, UnidentifiedImageError

from vlbridge.data.images import load_image
from vlbridge.errors import ImageError
from vlbridge.serving.errors import ApiError
from vlbridge.serving.settings import ServeSettings


def decode_image(data: bytes, *, max_pixels: int, what: str = "the image") -> Image.Image:
    """Bytes of an image file -> an upright RGB PIL image, its size checked before decoding.

    Raises:
        ApiError: 400 when the bytes are not an image, are corrupt, or the image has more than ``max_pixels``.
    """
    if not data:
        raise ApiError(400, f"{what} is empty", code="invalid_image")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise ApiError(
            400, f"{what} is not an image in a format the server can read ({exc})", code="invalid_image"
        ) from None
    width, height = image.size
    if width * height > max_pixels:
        raise ApiError(
            400,
            f"{what} is {width}x{height} = {width * height:,} pixels, more than the limit of {max_pixels:,}",
            code="image_too_large",
        )
    try:
        return load_image(image, max_pixels=max_pixels)  # full decode, EXIF orientation, RGB
    except (ImageError, Image.DecompressionBombError) as exc:
        raise ApiError(400, f"{what}: {exc}", code="invalid_image") from None


def decode_data_uri(url: str) -> bytes:
    """``data:[<type>][;base64],<payload>`` -> the payload's bytes (base64 or percent-encoded)."""
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise ApiError(400, "malformed data URI: no ',' before the payload", code="invalid_image_url")
    if header.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(
                400, "malformed data URI: the payload is not valid base64", code="invalid_image_url"
            ) from None
    return urllib.parse.unquote_to_bytes(payload)


async def image_bytes(url: str, settings: ServeSettings) -> tuple[bytes, str]:
    """The bytes behind an ``image_url`` of a request, and how to name it in errors.

    Raises:
        ApiError: 400 for a refused scheme or host or a failed fetch; 504 when the fetch times out.
    """
    if not isinstance(url, str) or not url:
        raise ApiError(400, "image_url.url must be a non-empty string", code="invalid_image_url")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_uri(url), "the image"
    if scheme in ("http", "https"):
        if not settings.allow_remote_images:
            raise ApiError(
                400,
                "http(s) image URLs are disabled on this server (start it with --allow-remote-images); "
                "send the image as a data: URI",
                code="remote_images_disabled",
            )
        return await fetch_remote(url, settings), f"the image at {url}"
    shown = scheme or "(none)"
    raise ApiError(
        400,
        f"unsupported image URL scheme {shown!r}: send a data: URI (or http(s) where the server allows it); "
        "file paths and file:// URLs are never read",
        code="unsupported_image_url",
    )


def check_public_address(address: str) -> None:
    """Refuse addresses inside private, loopback, link-local and other non-public ranges."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not ip.is_global or ip.is_multicast:
        raise ApiError(
            400,
            f"refusing to fetch from {address}: a private, loopback, link-local or reserved address",
            code="forbidden_image_host",
        )


async def resolve(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ApiError(400, f"cannot resolve image host {host!r}: {exc}", code="image_fetch_failed") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


async def fetch_remote(url: str, settings: ServeSettings) -> bytes:
    """Download an image over http(s) with the guards in the module docstring."""
    try:
        import httpx
    except ImportError:
        raise ApiError(
            500, "fetching image URLs needs httpx: pip install 'vlbridge[serve]'", code="missing_dependency"
        ) from None
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname
    if not host:
        raise ApiError(400, f"image URL {url!r} has no host", code="invalid_image_url")
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise ApiError(400, f"image URL {url!r} has an invalid port", code="invalid_image_url") from None
    addresses = await resolve(host, port)
    if not settings.allow_private_hosts:
        for address in addresses:
            check_public_address(address)
    address = addresses[0]
    pinned_host = f"[{address}]" if ":" in address else address
    pinned = urllib.parse.urlunsplit(parts._replace(netloc=f"{pinned_host}:{port}"))
    host_header = parts.netloc.rsplit("@", 1)[-1]  # never forward credentials in the URL
    extensions = {"sni_hostname": host} if parts.scheme.lower() == "https" else {}

    async def download() -> bytes:
        async with (
            httpx.AsyncClient(follow_redirects=False, timeout=settings.fetch_timeout, trust_env=False) as client,
            client.stream("GET", pinned, headers={"Host": host_header}, extensions=extensions) as response,
        ):
            if response.is_redirect:
                raise ApiError(
                    400, f"the image URL {url} redirects; redirects are not followed", code="image_fetch_failed"
                )
            if response.status_code != 200:
                raise ApiError(400, f"fetching {url} answered HTTP {response.status_code}", code="image_fetch_failed")
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > settings.max_fetch_bytes:
                raise ApiError(
                    400, f"the image at {url} is larger than {settings.max_fetch_bytes:,} bytes", code="image_too_large"
                )
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > settings.max_fetch_bytes:
                    raise ApiError(
                        400,
                        f"the image at {url} is larger than {settings.max_fetch_bytes:,} bytes",
                        code="image_too_large",
                    )
                chunks.append(chunk)
            return b"".join(chunks)

    try:
        return await asyncio.wait_for(download(), timeout=settings.fetch_timeout)
    except TimeoutError:
        raise ApiError(
            504, f"fetching {url} took longer than {settings.fetch_timeout:g} s", code="image_fetch_timeout"
        ) from None
    except httpx.HTTPError as exc:
        raise ApiError(400, f"fetching {url} failed: {type(exc).__name__}: {exc}", code="image_fetch_failed") from None
