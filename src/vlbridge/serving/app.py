"""The HTTP service: ``create_app(model, index, settings)`` builds a FastAPI app over a loaded model.

Routes (each answers errors as ``{"error": {"message", "type", "code"}}``):

- ``POST /v1/chat/completions``  OpenAI's schema, image parts as data URIs (http(s) behind a flag), SSE streaming
- ``GET  /v1/models``            the served model and what it can do
- ``POST /v1/captions``          one or many images -> captions
- ``POST /v1/embeddings``        texts or images -> ITC embeddings (models with ITC heads)
- ``POST /v1/itm``               an image and texts -> match probabilities and ITC similarities
- ``POST /v1/search``            a text or image query -> ranked images of the index, optionally ITM re-ranked
- ``GET  /v1/images/{id}/thumbnail``  a search result's thumbnail, by index id
- ``GET  /healthz``, ``GET /`` (the web page) and ``/static/{name}`` (its files)

Requests pass an API-key check and a body-size cap (both pure ASGI, before any parsing), are decoded and
preprocessed in request threads, and go to the model through the dynamic batcher's single worker thread
(:mod:`vlbridge.serving.batching`), so the event loop never runs the model.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from importlib import resources
from typing import TYPE_CHECKING, Any

from vlbridge.errors import VlbridgeError
from vlbridge.serving.auth import ApiKeyMiddleware
from vlbridge.serving.chat import completion_id, completion_response, parse_conversation, stream_events
from vlbridge.serving.errors import ApiError, error_body
from vlbridge.serving.images import decode_image, image_bytes
from vlbridge.serving.limits import BodyLimitMiddleware
from vlbridge.serving.schemas import (
    CaptionRequest,
    ChatCompletionRequest,
    EmbeddingRequest,
    ItmRequest,
    SearchRequest,
)
from vlbridge.serving.settings import ServeSettings
from vlbridge.serving.worker import DecodeKey, ModelWorker, SearchJob, TurnJob

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the HTTP service needs fastapi and uvicorn: pip install 'vlbridge[serve]'") from exc

if TYPE_CHECKING:
    from torch import Tensor

    from vlbridge.index import ImageIndex
    from vlbridge.models.vlm import VisionLanguageModel

STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
THUMBNAIL_CACHE = 512


def _static_files() -> dict[str, bytes]:
    """The page's files, read once from the package (requests never name a file)."""
    folder = resources.files("vlbridge.serving") / "static"
    return {name: (folder / name).read_bytes() for name in STATIC_FILES}


def create_app(
    model: VisionLanguageModel, index: ImageIndex | None = None, settings: ServeSettings | None = None
) -> FastAPI:
    """Build the service for a loaded model.

    Args:
        model: A model from :func:`vlbridge.load`.
        index: An :class:`vlbridge.index.ImageIndex` opened with this model, for ``/v1/search``; None: no search.
        settings: Limits, batching and authentication (:class:`ServeSettings`).

    Returns:
        A FastAPI app; run it with uvicorn (``vlbridge serve`` does). ``app.state.worker.batcher.stats`` counts
        the batched model calls.
    """
    settings = settings or ServeSettings()
    worker = ModelWorker(model, index, settings)
    static = _static_files()
    thumbnails: OrderedDict[int, bytes] = OrderedDict()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.close()

    app = FastAPI(title="vlbridge", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = worker
    app.state.settings = settings
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)  # added last: outermost, checked first

    # ------------------------------------------------------------------------------------------------ errors
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, type=exc.type, code=exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        message = "malformed request: " + "; ".join(problems)
        return JSONResponse(error_body(message, code="invalid_body"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), code=code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            error_body(f"internal error: {type(exc).__name__}", type="server_error", code="internal_error"),
            status_code=500,
        )

    # ------------------------------------------------------------------------------------------------ helpers
    async def run(kind: str, key: Any, payload: Any) -> Any:
        try:
            return await worker.batcher.run(kind, key, payload, timeout=settings.request_timeout)
        except TimeoutError:
            raise ApiError(
                504, f"the request took longer than {settings.request_timeout:g} s", type="timeout", code="timeout"
            ) from None
        except VlbridgeError as exc:
            raise ApiError(400, str(exc), code="invalid_input") from None

    async def pixels_of(url: str) -> Tensor:
        data, what = await image_bytes(url, settings)
        image = await run_in_threadpool(decode_image, data, max_pixels=settings.max_pixels, what=what)
        try:
            return await run_in_threadpool(worker.preprocess, image)
        except VlbridgeError as exc:
            raise ApiError(400, str(exc), code="invalid_image") from None

    async def pixels_of_all(urls: list[str]) -> list[Tensor]:
        if len(urls) > settings.max_images:
            raise ApiError(
                400, f"{len(urls)} images in one request; at most {settings.max_images}", code="too_many_images"
            )
        return list(await asyncio.gather(*(pixels_of(u) for u in urls)))

    def max_tokens_of(value: int | None) -> int:
        if value is None:
            return settings.default_max_tokens
        if value > settings.max_tokens:
            raise ApiError(
                400, f"max_tokens={value} is above this server's limit of {settings.max_tokens}", code="max_tokens"
            )
        return value

    def need_generation() -> None:
        if not worker.can_generate:
            raise ApiError(
                400, "this model has no language model: it embeds and matches but cannot generate", code="unsupported"
            )

    def need_itc() -> None:
        if not worker.has_itc:
            raise ApiError(400, "this model has no ITC/ITM heads (a generation-only checkpoint)", code="unsupported")

    def need_index() -> ImageIndex:
        if index is None:
            raise ApiError(404, "this server has no image index: start it with --index DIR", code="no_index")
        return index

    # ------------------------------------------------------------------------------------------------ routes
    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": settings.model_name,
            "index": index is not None,
            "batching": worker.batcher.stats.to_dict(),
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": settings.model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vlbridge",
            "capabilities": {
                "chat": worker.can_generate,
                "captions": worker.can_generate,
                "embeddings": worker.has_itc,
                "itm": worker.has_itc,
                "search": index is not None,
            },
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest) -> dict[str, Any] | StreamingResponse:
        need_generation()
        if body.n > settings.max_n:
            raise ApiError(400, f"n={body.n} is above this server's limit of {settings.max_n}", code="max_n")
        limit = max_tokens_of(body.max_tokens if body.max_tokens is not None else body.max_completion_tokens)
        conversation = parse_conversation(body, max_images=settings.max_images)
        pixels = await pixels_of(conversation.image_url)
        sample = bool(body.temperature) or (body.top_p is not None and body.top_p < 1)
        key = DecodeKey(
            max_new_tokens=limit,
            do_sample=sample,
            temperature=body.temperature if body.temperature else 1.0,
            top_p=body.top_p if sample and body.top_p is not None else 1.0,
        )
        job = TurnJob(pixels=pixels, message=conversation.message, history=conversation.history)
        results = list(await asyncio.gather(*(run("generate", key, job) for _ in range(body.n))))
        request_id = completion_id()
        name = body.model or settings.model_name
        if body.stream:
            events = stream_events(results, model=name, request_id=request_id)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return completion_response(results, model=name, request_id=request_id)

    @app.post("/v1/captions")
    async def captions(body: CaptionRequest) -> dict[str, Any]:
        need_generation()
        urls = ([body.image] if body.image else []) + list(body.images or [])
        if not urls:
            raise ApiError(
                400, "give an image (or images): data URIs, or http(s) URLs where allowed", code="missing_image"
            )
        if body.prompt is not None and not body.prompt.strip():
            raise ApiError(400, "empty prompt: leave it out for the model's default", code="invalid_input")
        key = DecodeKey(max_new_tokens=max_tokens_of(body.max_tokens))
        pixels = await pixels_of_all(urls)
        results = await asyncio.gather(*(run("generate", key, TurnJob(pixels=p, prompt=body.prompt)) for p in pixels))
        data = [{"index": i, "caption": r.text, "finish_reason": r.finish_reason} for i, r in enumerate(results)]
        return {"object": "list", "model": settings.model_name, "data": data}

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        need_itc()
        if (body.input is None) == (body.images is None):
            raise ApiError(400, "give texts in 'input' or images in 'images' (one of the two)", code="invalid_input")
        if body.images is not None:
            if not body.images:
                raise ApiError(400, "'images' is empty", code="invalid_input")
            pixels = await pixels_of_all(body.images)
            feats = await asyncio.gather(*(run("embed_images", "images", p) for p in pixels))
            data = [
                {"object": "embedding", "index": i, "kind": "image", "embedding": f[0].tolist()}  # [Q, E]
                for i, f in enumerate(feats)
            ]
        else:
            texts = [body.input] if isinstance(body.input, str) else list(body.input)
            if not texts or any(not t.strip() for t in texts):
                raise ApiError(400, "every input text must be non-empty", code="invalid_input")
            if len(texts) > 256:
                raise ApiError(400, f"{len(texts)} texts in one request; at most 256", code="too_many_inputs")
            feats = await run("embed_texts", "texts", texts)
            data = [
                {"object": "embedding", "index": i, "kind": "text", "embedding": f.tolist()}
                for i, f in enumerate(feats)
            ]
        return {"object": "list", "model": settings.model_name, "data": data}

    @app.post("/v1/itm")
    async def itm(body: ItmRequest) -> dict[str, Any]:
        need_itc()
        if any(not t.strip() for t in body.texts) or len(body.texts) > 256:
            raise ApiError(400, "give 1 to 256 non-empty texts", code="invalid_input")
        pixels = await pixels_of(body.image)
        probs, image_feats, text_feats = await asyncio.gather(
            run("itm", "itm", (pixels, body.texts)),
            run("embed_images", "images", pixels),
            run("embed_texts", "texts", body.texts),
        )
        itc = (image_feats[0] @ text_feats.T).amax(dim=0).tolist()  # [Q, E] x [E, T] -> best query per text
        data = [{"index": i, "text": t, "itm": p, "itc": c} for i, (t, p, c) in enumerate(zip(body.texts, probs, itc))]
        return {"object": "list", "model": settings.model_name, "data": data}

    @app.post("/v1/search")
    async def search(body: SearchRequest) -> dict[str, Any]:
        found = need_index()
        if (body.text is None) == (body.image is None):
            raise ApiError(400, "search needs either 'text' or 'image' (not both)", code="invalid_input")
        pixels = (await pixels_of(body.image))[0] if body.image is not None else None
        job = SearchJob(body.text, pixels, body.k, body.rerank, body.shortlist or max(body.k, 32))
        hits = await run("search", worker.unique_key(), job)
        data = [{**h.to_dict(), "thumbnail": f"/v1/images/{h.id}/thumbnail"} for h in hits]
        return {"object": "list", "model": settings.model_name, "index_size": len(found), "data": data}

    @app.get("/v1/images/{image_id}/thumbnail")
    async def thumbnail(image_id: int) -> Response:
        found = need_index()
        if image_id not in thumbnails:
            data = await run_in_threadpool(_thumbnail, found, image_id, settings)
            thumbnails[image_id] = data
            if len(thumbnails) > THUMBNAIL_CACHE:
                thumbnails.popitem(last=False)
        thumbnails.move_to_end(image_id)
        return Response(thumbnails[image_id], media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/")
    async def page() -> Response:
        return Response(static["index.html"], media_type="text/html")

    @app.get("/static/{name}")
    async def static_file(name: str) -> Response:
        if name not in static:
            raise ApiError(404, f"no static file {name!r}", code="not_found")
        return Response(static[name], media_type=STATIC_FILES[name])

    return app


def _thumbnail(index: ImageIndex, image_id: int, settings: ServeSettings) -> bytes:
    """A JPEG thumbnail of an indexed image; the path comes from the index's own store, never from the request."""
    from vlbridge.data.images import load_image

    path = index.path(image_id)
    if path is None:
        raise ApiError(404, f"no indexed image with id {image_id}", code="not_found")
    try:
        image = load_image(path, max_pixels=settings.max_pixels)
    except VlbridgeError as exc:
        raise ApiError(404, f"indexed image {image_id} cannot be read: {exc}", code="not_found") from None
    image.thumbnail((settings.thumbnail_size, settings.thumbnail_size))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()
