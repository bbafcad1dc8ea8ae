"""vlbridge: BLIP-2 — a trainable Q-Former between a frozen vision encoder and a frozen LLM.

`import vlbridge` stays light: torch and transformers are imported on first use of `load` / `Blip2`.
"""

from vlbridge.errors import CheckpointError, ConfigError, ImageError, InputError, VlbridgeError

__version__ = "0.1.0"
__all__ = [
    "Blip2",
    "Blip2Config",
    "CheckpointError",
    "ConfigError",
    "ImageError",
    "InputError",
    "VlbridgeError",
    "load",
]


def __getattr__(name: str):
    if name == "load":
        from vlbridge.api import load

        return load
    if name in ("Blip2", "Blip2Config"):
        from vlbridge.models import blip2

        return getattr(blip2, name)
    raise AttributeError(f"module 'vlbridge' has no attribute {name!r}")
