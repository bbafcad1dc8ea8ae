"""The HTTP service (``vlbridge serve``): an OpenAI-style chat API, captions, embeddings, ITM, image search and a
web page, over one loaded model with dynamic batching.

``create_app`` and ``serve_main`` import FastAPI only when called, so ``import vlbridge`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vlbridge.serving.settings import ServeSettings

if TYPE_CHECKING:
    import argparse

__all__ = ["ServeSettings", "create_app", "serve_main"]


def create_app(*args: Any, **kwargs: Any) -> Any:
    """See :func:`vlbridge.serving.app.create_app`."""
    from vlbridge.serving.app import create_app as _create_app

    return _create_app(*args, **kwargs)


def serve_main(args: argparse.Namespace) -> int:
    """See :func:`vlbridge.serving.main.serve_main`."""
    from vlbridge.serving.main import serve_main as _serve_main

    return _serve_main(args)
