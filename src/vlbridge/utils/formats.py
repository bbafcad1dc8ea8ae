"""Checkpoint formats a model can be saved in: each interop module registers its writer here.

A writer is registered for a format name and, where the format depends on the bridge (a transformers
checkpoint is a `Blip2ForConditionalGeneration` for a Q-Former and a `LlavaForConditionalGeneration` for a
projector), for one bridge kind. `model.save(dir, format=...)` looks the writer up, so the model never imports
the interop code that imports the model. The built-in writers register on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

Saver = Callable[..., Path]
SAVERS: dict[tuple[str, str | None], Saver] = {}
_BUILTIN = {
    "native": ("vlbridge.interop.native",),
    "hf": ("vlbridge.interop.hf", "vlbridge.interop.llava"),
    "adapter": ("vlbridge.models.language_training",),
}


def register_saver(name: str, *, kind: str | None = None) -> Callable[[Saver], Saver]:
    """Decorator: `fn(model, directory, **options) -> Path` writes format `name` (for bridges of `kind` only)."""

    def add(fn: Saver) -> Saver:
        SAVERS[(name, kind)] = fn
        return fn

    return add


def save(model: Any, directory, format: str = "native", **options) -> Path:
    """Write `model` to `directory` in `format`; a clear error for a format or bridge that has no writer."""
    for module in _BUILTIN.get(format, ()):
        importlib.import_module(module)
    kind = model.bridge.kind
    if format not in ("native", "adapter") and model.config.language_training == "lora":
        raise ValueError(
            f"format {format!r} holds no LoRA adapters: call model.merge_lora() first, "
            "or save with format='native' or 'adapter'"
        )
    writer = SAVERS.get((format, kind)) or SAVERS.get((format, None))
    if writer is None:
        known = sorted({name for name, _ in SAVERS} | set(_BUILTIN))
        if format in known:
            raise ValueError(f"format {format!r} cannot hold a {kind!r} bridge: save it with format='native'")
        raise ValueError(f"unknown format {format!r}: use one of {', '.join(known)}")
    return writer(model, directory, **options)
