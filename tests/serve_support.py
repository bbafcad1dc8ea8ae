"""Helpers for the HTTP service tests and the load benchmark: a tiny model that both generates and has ITC/ITM
heads, a uvicorn server on a free loopback port in a thread, and images as data URIs."""

from __future__ import annotations

import base64
import copy
import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

import vlbridge
from vlbridge.models.blip2 import Blip2

from factory import Sizes, bert_tokenizer, build_checkpoint


def combined_checkpoint(directory: Path, *, seed: int = 1, sizes: Sizes | None = None) -> Path:
    """A native checkpoint with a random OPT LLM *and* random stage-1 heads (a served model usually has one or the
    other; the page needs both: captions and search), built from a random transformers BLIP-2 checkpoint."""
    hf_dir = build_checkpoint(directory / "hf", family="opt", seed=seed, sizes=sizes)
    generation = vlbridge.load(hf_dir)
    config = copy.deepcopy(generation.config)
    config.bridge["embed_dim"] = 24
    config.bridge["qformer"]["text_input"] = True
    model = Blip2(config=config, vision=generation.vision, language_model=generation.language_model)
    model.load_state_dict(generation.state_dict(), strict=False)  # the heads and text side stay random
    model.tokenizer, model.image_processor = generation.tokenizer, generation.image_processor
    model.qformer_tokenizer = bert_tokenizer()
    model.eval().save(directory / "model", format="native")
    return directory / "model"


def noise_image(seed: int, size: int = 24) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def data_uri(image: Image.Image | bytes, mime: str = "image/png") -> str:
    data = image if isinstance(image, bytes) else png_bytes(image)
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1 at a free port, in a daemon thread; ``url`` is its base address."""

    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()
