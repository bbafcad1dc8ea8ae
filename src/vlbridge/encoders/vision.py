"""A frozen image encoder over any transformers vision model, returning patch tokens [B, N, Dv].

BLIP-2 reads the image features of the *penultimate* layer of EVA/CLIP encoders (the last layer is
specialised to the contrastive objective) without the final LayerNorm; its own trainable LayerNorm
(`ln_vision`) follows. transformers' `Blip2VisionModel` checkpoints store that trainable LayerNorm as the
vision model's `post_layernorm` and read the *last* layer: both are expressible with `layer`.

Layers after the chosen one are never run: they are dropped from the wrapped model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from torch import Tensor, nn
from transformers import PreTrainedModel


@dataclass(frozen=True)
class VisionFamily:
    """Where a transformers vision family keeps its parts (the only place family differences live)."""

    layers: str  # dotted path of the ModuleList of transformer blocks
    config_class: str  # transformers class names, to rebuild the model from its config dict
    model_class: str
    # A final norm that BLIP-2 replaces by its own trainable `ln_vision` (never part of hidden_states anyway).
    replaced_norm: str | None = None
    cls_token: bool = True  # a [CLS] token before the patch tokens (SigLIP has none)


VISION_FAMILIES: dict[str, VisionFamily] = {
    "blip_2_vision_model": VisionFamily("encoder.layers", "Blip2VisionConfig", "Blip2VisionModel", "post_layernorm"),
    "instructblip_vision_model": VisionFamily(
        "encoder.layers", "InstructBlipVisionConfig", "InstructBlipVisionModel", "post_layernorm"
    ),
    "clip_vision_model": VisionFamily("encoder.layers", "CLIPVisionConfig", "CLIPVisionModel"),
    "siglip_vision_model": VisionFamily("encoder.layers", "SiglipVisionConfig", "SiglipVisionModel", cls_token=False),
    "vit": VisionFamily("layers", "ViTConfig", "ViTModel"),
}


def build_vision_model(config: dict) -> PreTrainedModel:
    """A randomly initialised transformers vision model from its config dict (weights are loaded after)."""
    model_type = config.get("model_type")
    if model_type not in VISION_FAMILIES:
        raise ValueError(f"unsupported vision model type {model_type!r}; supported: {', '.join(VISION_FAMILIES)}")
    family = VISION_FAMILIES[model_type]
    config_class = getattr(transformers, family.config_class)
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    return getattr(transformers, family.model_class)(config_class(**kwargs))


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for name in dotted.split("."):
        module = getattr(module, name)
    return module


class FrozenVisionEncoder(nn.Module):
    """Wraps a transformers vision model; `forward(pixel_values)` gives the hidden states of one layer.

    Args:
        model: a transformers vision model (`Blip2VisionModel`, `CLIPVisionModel`, `SiglipVisionModel`, `ViTModel`).
        layer: which hidden state to return, in transformers' `hidden_states` numbering (0 = embeddings,
            i = after block i; negative counts from the end: -1 = last block, -2 = penultimate).
        freeze: turn off gradients and keep the model in eval mode.
    """

    def __init__(self, model: PreTrainedModel, *, layer: int = -1, freeze: bool = True) -> None:
        super().__init__()
        model_type = model.config.model_type
        if model_type not in VISION_FAMILIES:
            raise ValueError(
                f"unsupported vision model type {model_type!r}; supported: {', '.join(sorted(VISION_FAMILIES))}"
            )
        self.family = VISION_FAMILIES[model_type]
        blocks = _get(model, self.family.layers)
        n = len(blocks)
        index = layer if layer >= 0 else n + 1 + layer
        if not 0 <= index <= n:
            raise ValueError(f"layer {layer} is out of range for a {n}-layer vision model")
        # Drop the blocks after the one we read: they would be computed and thrown away.
        del blocks[index:]
        if self.family.replaced_norm:
            setattr(model, self.family.replaced_norm, nn.Identity())
        self.layer = layer
        self.index = index
        self.model = model
        self.frozen = freeze
        if freeze:
            model.requires_grad_(False)
            model.eval()

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    @property
    def image_size(self) -> int:
        size = self.model.config.image_size
        return size if isinstance(size, int) else size[0]

    @property
    def num_tokens(self) -> int:
        """N, the tokens per image: one per patch, plus [CLS] where the family has one."""
        patch = self.model.config.patch_size
        patch = patch if isinstance(patch, int) else patch[0]
        return (self.image_size // patch) ** 2 + int(self.family.cls_token)

    def train(self, mode: bool = True) -> FrozenVisionEncoder:
        super().train(mode)
        if self.frozen:
            self.model.eval()  # a frozen encoder never switches to training behaviour (dropout)
        return self

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [B, 3, H, W] -> hidden states [B, N, Dv] of the chosen layer."""
        dtype = next(self.model.parameters()).dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=True)
        return out.hidden_states[self.index]


# Checkpoints that hold a vision tower next to other parts: which class reads the vision part.
_TOWER_CLASSES = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}


def load_vision_model(source, *, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The vision model of a local folder or hub id: a standalone vision model (`CLIPVisionModel`, `ViTModel`,
    ...), the vision tower of a CLIP/SigLIP dual encoder, or the EVA ViT of a transformers BLIP-2 checkpoint."""
    import json

    from safetensors.torch import load_file

    from vlbridge.utils.hub import resolve

    path = resolve(source)
    config = json.loads((path / "config.json").read_text())
    model_type = config.get("model_type")
    dtype = dtype or torch.float32
    if model_type in VISION_FAMILIES:
        return getattr(transformers, VISION_FAMILIES[model_type].model_class).from_pretrained(path, dtype=dtype)
    if model_type in _TOWER_CLASSES:
        return getattr(transformers, _TOWER_CLASSES[model_type]).from_pretrained(path, dtype=dtype)
    if model_type in ("blip-2", "instructblip"):
        family = VISION_FAMILIES["blip_2_vision_model" if model_type == "blip-2" else "instructblip_vision_model"]
        model = build_vision_model({**config["vision_config"], "model_type": _type_of(family)})
        state = {}
        for shard in sorted(path.glob("*.safetensors")):
            for key, value in load_file(str(shard)).items():
                if key.startswith("vision_model."):
                    state[key[len("vision_model.") :]] = value
        model.load_state_dict(state)
        return model.to(dtype)
    raise ValueError(
        f"{source}: no vision model found (model_type {model_type!r}); supported: "
        f"{', '.join([*VISION_FAMILIES, *_TOWER_CLASSES, 'blip-2', 'instructblip'])}"
    )


def _type_of(family: VisionFamily) -> str:
    return next(k for k, v in VISION_FAMILIES.items() if v is family)
