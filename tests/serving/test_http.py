"""The HTTP service over real HTTP: uvicorn on a free loopback port, a tiny random checkpoint loaded with
``vlbridge.load``. Every bad request gets a JSON error and the server keeps answering ``/healthz``."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from vlbridge.serving import ServeSettings, create_app
from vlbridge.serving.worker import TurnJob

from serve_support import ServerThread, data_uri, noise_image, png_bytes

IMAGE = data_uri(noise_image(11))


def chat_body(text: str = "what colour is it?", **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": IMAGE}}, {"type": "text", "text": text}]
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 6, **extra}


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def assert_healthy(server) -> None:
    response = httpx.get(f"{server.url}/healthz", timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "ok"


def post(server, path: str, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kwargs)


# ------------------------------------------------------------------------------------------------ chat
def test_chat_completion_with_an_image_part_is_openai_shaped(server):
    response = post(server, "/v1/chat/completions", chat_body())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "tiny" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["prompt_tokens"] > 5


def test_chat_n_choices_and_sampling(server):
    response = post(server, "/v1/chat/completions", chat_body(n=3, temperature=0.9, top_p=0.9))
    assert response.status_code == 200, response.text
    assert [c["index"] for c in response.json()["choices"]] == [0, 1, 2]


def test_streaming_yields_sse_chunks_and_done(server):
    plain = post(server, "/v1/chat/completions", chat_body()).json()["choices"][0]["message"]["content"]
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=chat_body(stream=True), timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain


def test_multi_turn_messages_use_the_chat_convention(server, model):
    messages = [
        {"role": "system", "content": "you are helpful"},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": IMAGE}}, {"type": "text", "text": "what is it?"}],
        },
        {"role": "assistant", "content": "a circle"},
        {"role": "user", "content": "what colour?"},
    ]
    response = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 4})
    assert response.status_code == 200, response.text
    worker = server.app.state.worker
    job = TurnJob(
        pixels=worker.preprocess(noise_image(11)), message="what colour?", history=[("what is it?", "a circle")]
    )
    assert worker._prompt(job, 4) == "Question: what is it? Answer: a circle Question: what colour? Answer:"


def test_image_without_text_is_captioned(server, model):
    body = {
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}}]}],
        "max_tokens": 5,
    }
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == model.caption([noise_image(11)], max_new_tokens=5)[0]


# ------------------------------------------------------------------------------------------------ limits
def test_a_64_mib_body_gets_413(server):
    big = b'{"messages": "' + b"x" * (64 * 1024 * 1024) + b'"}'
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:  # declared length: no body read
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(big)}\r\n\r\n".encode()
        )
        reply = b""
        while chunk := sock.recv(65536):  # until the server closes
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413") and b"body_too_large" in reply
    assert_healthy(server)
    # With the body sent too, the server answers and closes while the client still sends, so the kernel may reset
    # the connection before the client reads the 413 (the raw-socket case above checks the answer itself).
    with contextlib.suppress(httpx.TransportError):
        assert_error(httpx.post(f"{server.url}/v1/captions", content=big, timeout=60), 413, "body_too_large")
    assert_healthy(server)

    def chunks():  # no Content-Length: counted while it streams in
        for i in range(0, len(big), 1 << 20):
            yield big[i : i + (1 << 20)]

    try:
        response = httpx.post(f"{server.url}/v1/chat/completions", content=chunks(), timeout=60)
        assert_error(response, 413, "body_too_large")
    except httpx.TransportError:  # the server may close before the client has finished sending
        pass
    assert_healthy(server)


def test_non_image_is_400(server):
    body = chat_body()
    body["messages"][0]["content"][0]["image_url"]["url"] = (
        "data:image/png;base64," + base64.b64encode(b"hello").decode()
    )
    assert_error(post(server, "/v1/chat/completions", body), 400, "invalid_image")
    assert_healthy(server)
    body["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64,@@not base64@@"
    assert_error(post(server, "/v1/chat/completions", body), 400, "invalid_image_url")
    assert_healthy(server)


def test_too_many_pixels_is_400_before_decoding(server):
    big = data_uri(noise_image(1, size=600))  # 360,000 pixels; this server allows 250,000
    error = assert_error(post(server, "/v1/captions", {"image": big}), 400, "image_too_large")
    assert "600x600" in error["message"]
    assert_healthy(server)


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b'{"messages": [}',
        b'{"messages": "hi"}',
        b'{"messages": []}',
        b"[1, 2]",
        b'{"messages": [{"role": "robot", "content": "x"}]}',
        b'{"messages": [{"role": "user", "content": [{"type": "video"}]}]}',
    ],
)
def test_malformed_body_is_422(server, raw):
    response = httpx.post(
        f"{server.url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=30
    )
    assert_error(response, 422, "invalid_body")
    assert_healthy(server)


@pytest.mark.parametrize(
    "url, code",
    [
        ("file:///etc/passwd", "unsupported_image_url"),
        ("/etc/passwd", "unsupported_image_url"),
        ("ftp://example.com/a.png", "unsupported_image_url"),
        ("http://example.com/a.png", "remote_images_disabled"),
        ("https://example.com/a.png", "remote_images_disabled"),
    ],
)
def test_file_urls_and_remote_urls_without_the_flag_are_refused(server, url, code):
    body = chat_body()
    body["messages"][0]["content"][0]["image_url"]["url"] = url
    assert_error(post(server, "/v1/chat/completions", body), 400, code)
    assert_error(post(server, "/v1/captions", {"image": url}), 400, code)
    assert_healthy(server)


def test_limits_on_images_tokens_and_choices(server):
    settings = server.app.state.settings
    assert_error(post(server, "/v1/captions", {"images": [IMAGE] * (settings.max_images + 1)}), 400, "too_many_images")
    assert_error(post(server, "/v1/chat/completions", chat_body(max_tokens=settings.max_tokens + 1)), 400, "max_tokens")
    assert_error(post(server, "/v1/chat/completions", chat_body(n=settings.max_n + 1)), 400, "max_n")
    assert_error(
        post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "no image"}]}),
        400,
        "missing_image",
    )
    assert_error(httpx.get(f"{server.url}/v1/nothing", timeout=10), 404)
    assert_healthy(server)


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/img.png")
            self.end_headers()
            return
        data = png_bytes(noise_image(5))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_private_address_refused_with_the_flag(model, image_host):
    with ServerThread(create_app(model, None, ServeSettings(allow_remote_images=True))) as s:
        for url in (
            f"{image_host}/img.png",
            "http://localhost:9/x.png",
            "http://[::1]:9/x.png",
            "http://169.254.169.254/latest",
        ):
            assert_error(post(s, "/v1/captions", {"image": url}), 400, "forbidden_image_host")
            assert_healthy(s)


def test_remote_fetch_works_without_redirects(model, image_host):
    settings = ServeSettings(allow_remote_images=True, allow_private_hosts=True)  # the test's host is loopback
    with ServerThread(create_app(model, None, settings)) as s:
        response = post(s, "/v1/captions", {"image": f"{image_host}/img.png", "max_tokens": 3})
        assert response.status_code == 200, response.text
        assert response.json()["data"][0]["caption"] == model.caption([noise_image(5)], max_new_tokens=3)[0]
        assert_error(post(s, "/v1/captions", {"image": f"{image_host}/redirect"}), 400, "image_fetch_failed")
        assert_healthy(s)


# ------------------------------------------------------------------------------------------------ batching
def test_concurrent_clients_all_succeed_and_are_batched(model):
    settings = ServeSettings(max_batch_size=16, max_wait_ms=30)
    with ServerThread(create_app(model, None, settings)) as s:
        stats = s.app.state.worker.batcher.stats
        before = stats.calls

        def one(i: int) -> int:
            body = chat_body(text=f"question {i % 4}?", max_tokens=5)
            body["messages"][0]["content"][0]["image_url"]["url"] = data_uri(noise_image(i))
            return post(s, "/v1/chat/completions", body).status_code

        with ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(one, range(32)))
        assert codes == [200] * 32
        calls = stats.calls - before
        assert calls < 32, f"{calls} model calls for 32 requests: nothing was batched"
        assert stats.largest > 1
        assert s.app.state.worker.batcher.stats.items - 0 >= 32
        assert_healthy(s)


def test_batching_off_is_one_call_per_request(model):
    with ServerThread(create_app(model, None, ServeSettings(max_batch_size=1))) as s:
        with ThreadPoolExecutor(4) as pool:
            codes = list(
                pool.map(lambda i: post(s, "/v1/captions", {"image": IMAGE, "max_tokens": 3}).status_code, range(8))
            )
        assert codes == [200] * 8
        assert s.app.state.worker.batcher.stats.calls == 8 and s.app.state.worker.batcher.stats.largest == 1


def test_batched_and_single_captions_agree(server, model):
    images = [noise_image(i) for i in range(3)]
    response = post(server, "/v1/captions", {"images": [data_uri(im) for im in images], "max_tokens": 4})
    assert response.status_code == 200
    assert [d["caption"] for d in response.json()["data"]] == model.caption(images, max_new_tokens=4)


def test_request_timeout_is_504(model):
    with ServerThread(create_app(model, None, ServeSettings(request_timeout=0.001))) as s:
        assert_error(post(s, "/v1/captions", {"image": IMAGE, "max_tokens": 30}), 504, "timeout")
        assert_healthy(s)


# ------------------------------------------------------------------------------------------------ auth
def test_api_key_is_enforced(model):
    with ServerThread(create_app(model, None, ServeSettings(api_key="s3cret"))) as s:
        assert_error(httpx.get(f"{s.url}/v1/models", timeout=10), 401, "invalid_api_key")
        assert_error(httpx.get(f"{s.url}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=10), 401)
        assert_error(post(s, "/v1/chat/completions", chat_body(), headers={"Authorization": "Basic s3cret"}), 401)
        good = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{s.url}/v1/models", headers=good, timeout=10).status_code == 200
        assert post(s, "/v1/chat/completions", chat_body(), headers=good).status_code == 200
        assert httpx.get(f"{s.url}/", timeout=10).status_code == 200  # the page asks for the key itself
        assert_healthy(s)


def test_serve_refuses_a_public_host_without_a_key(model_dir, capsys):
    from vlbridge import cli

    code = cli.main(["serve", "--model", str(model_dir), "--host", "0.0.0.0"])
    assert code == 1
    assert "without an API key" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ other endpoints
def test_models_and_healthz(server):
    body = httpx.get(f"{server.url}/v1/models", timeout=10).json()
    assert body["object"] == "list" and body["data"][0]["object"] == "model"
    assert body["data"][0]["capabilities"] == {
        "chat": True,
        "captions": True,
        "embeddings": True,
        "itm": True,
        "search": True,
    }
    assert httpx.get(f"{server.url}/healthz", timeout=10).json()["index"] is True


def test_embeddings_of_texts_and_images(server, model):
    texts = post(server, "/v1/embeddings", {"input": ["a red circle", "a blue square"]}).json()["data"]
    assert [d["kind"] for d in texts] == ["text", "text"]
    expected = model.embed_texts(["a red circle", "a blue square"])
    assert texts[0]["embedding"] == pytest.approx(expected[0].tolist(), abs=1e-5)
    images = post(server, "/v1/embeddings", {"images": [IMAGE]}).json()["data"]
    got = np.asarray(images[0]["embedding"])  # [Q, E]: one vector per query
    np.testing.assert_allclose(got, model.embed_images([noise_image(11)])[0].numpy(), atol=1e-5)
    assert_error(post(server, "/v1/embeddings", {}), 400, "invalid_input")


def test_embeddings_need_itc_heads(model_dir):
    import vlbridge

    generation_only = vlbridge.load(model_dir.parent / "hf")
    with ServerThread(create_app(generation_only)) as s:
        assert_error(post(s, "/v1/embeddings", {"input": "a photo"}), 400, "unsupported")
        assert_error(post(s, "/v1/search", {"text": "a photo"}), 404, "no_index")
        assert_healthy(s)


def test_itm(server, model):
    texts = ["a red circle", "two green objects"]
    data = post(server, "/v1/itm", {"image": IMAGE, "texts": texts}).json()["data"]
    assert [d["itm"] for d in data] == pytest.approx(model.itm([noise_image(11)] * 2, texts), abs=1e-5)
    assert [d["itc"] for d in data] == pytest.approx(model.itc([noise_image(11)], texts)[0].tolist(), abs=1e-5)


def test_search_over_a_tiny_index(server, index, photos):
    response = post(server, "/v1/search", {"text": "a red circle", "k": 4})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["index_size"] == 6
    hits = body["data"]
    expected = index.search("a red circle", k=4)
    assert [h["path"] for h in hits] == [h.path for h in expected]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert all((photos / h["path"]).is_file() for h in hits)
    thumb = httpx.get(server.url + hits[0]["thumbnail"], timeout=10)
    assert (
        thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg" and thumb.content[:2] == b"\xff\xd8"
    )
    assert_error(httpx.get(f"{server.url}/v1/images/999/thumbnail", timeout=10), 404)
    for bad in ("..%2f..%2fetc%2fpasswd", "img0.png", "-1"):  # ids only, never a path
        assert httpx.get(f"{server.url}/v1/images/{bad}/thumbnail", timeout=10).status_code in (404, 422)

    reranked = post(server, "/v1/search", {"text": "a red circle", "k": 3, "rerank": True}).json()["data"]
    assert all(0 <= h["itm"] <= 1 for h in reranked) and len(reranked) == 3

    by_image = post(server, "/v1/search", {"image": data_uri((photos / "img0.png").read_bytes()), "k": 2}).json()[
        "data"
    ]
    assert by_image[0]["path"] == "img0.png"
    assert_error(post(server, "/v1/search", {"text": "x", "image": IMAGE}), 400, "invalid_input")
    assert_healthy(server)


def test_page_and_static_files(server):
    page = httpx.get(f"{server.url}/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/static/app.js" in page.text
    for name in ("app.js", "style.css"):
        assert httpx.get(f"{server.url}/static/{name}", timeout=10).status_code == 200
    assert_error(httpx.get(f"{server.url}/static/..%2Fapp.py", timeout=10), 404)


def test_vlbridge_serve_command(model_dir, index, tmp_path):
    """``vlbridge serve`` in a subprocess: --index, --api-key, then a search over real HTTP."""
    import os
    import subprocess
    import sys
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vlbridge", "serve", "--model", str(model_dir), "--index", str(index.directory)]
    cmd += ["--port", str(port), "--api-key", "k3y", "--log-level", "warning", "--model-name", "cli-model"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        assert httpx.post(f"{url}/v1/search", json={"text": "a photo"}, timeout=30).status_code == 401
        hits = httpx.post(
            f"{url}/v1/search", json={"text": "a photo", "k": 2}, headers={"Authorization": "Bearer k3y"}, timeout=30
        )
        assert hits.status_code == 200 and len(hits.json()["data"]) == 2 and hits.json()["model"] == "cli-model"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "cli-model on http://127.0.0.1" in err
