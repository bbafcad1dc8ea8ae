"""vlbridge: the ways to bridge a frozen vision encoder and a frozen LLM — BLIP-2's Q-Former at the centre,
InstructBLIP, MiniGPT-4 and LLaVA's projector beside it — in one composition (`VisionLanguageModel`).

`import vlbridge` stays light: torch and transformers are imported on first use of `load` / the model classes.
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
    "VisionLanguageModel",
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
    if name == "VisionLanguageModel":
        from vlbridge.models.vlm import VisionLanguageModel

        return VisionLanguageModel
    raise AttributeError(f"module 'vlbridge' has no attribute {name!r}")
