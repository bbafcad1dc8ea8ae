"""vlbridge: BLIP-2 — a trainable Q-Former between a frozen vision encoder and a frozen LLM."""

from vlbridge.api import load
from vlbridge.errors import CheckpointError, ImageError, InputError, VlbridgeError
from vlbridge.models.blip2 import Blip2, Blip2Config

__version__ = "0.1.0"
__all__ = ["Blip2", "Blip2Config", "CheckpointError", "ImageError", "InputError", "VlbridgeError", "load"]
