"""``vlbridge serve``: load the model (and index), check the exposure, run uvicorn."""

from __future__ import annotations

import argparse
import os
import sys

from vlbridge.errors import InputError
from vlbridge.serving.settings import ServeSettings, check_exposure

API_KEY_ENV = "VLBRIDGE_API_KEY"


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """The :class:`ServeSettings` of the command-line options."""
    api_key = getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV) or None
    try:
        return ServeSettings(
            api_key=api_key,
            max_batch_size=1 if getattr(args, "no_batching", False) else args.max_batch_size,
            max_wait_ms=args.max_wait_ms,
            allow_remote_images=args.allow_remote_images,
            max_body_bytes=args.max_body_mb * 1024 * 1024,
            max_tokens=args.max_tokens,
            request_timeout=args.request_timeout,
            model_name=args.model_name or os.path.basename(os.path.normpath(args.model)) or "vlbridge",
        )
    except ValueError as exc:
        raise InputError(str(exc)) from None


def serve_main(args: argparse.Namespace) -> int:
    """Run the service until interrupted.

    Raises:
        InputError: A non-loopback host without an API key, or an index that does not fit the model.
    """
    settings = settings_from_args(args)
    check_exposure(args.host, settings.api_key)  # before loading anything: refuse fast
    try:
        import uvicorn
    except ImportError:
        raise InputError("vlbridge serve needs fastapi and uvicorn: pip install 'vlbridge[serve]'") from None
    from vlbridge.cli import load_model
    from vlbridge.serving.app import create_app

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    index = None
    if args.index:
        from vlbridge.index import ImageIndex

        index = ImageIndex(args.index, model)
    app = create_app(model, index, settings)
    where = f"http://{args.host}:{args.port}"
    print(f"vlbridge serve: {settings.model_name} on {where} (page at {where}/)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
