"""The one composition: frozen vision encoder -> bridge -> frozen (or partly trainable) language model.

BLIP-2, InstructBLIP, MiniGPT-4 and LLaVA are this module with different bridges (`vlbridge.bridges`): the
encoder's tokens `[B, N, Dv]` go through the bridge, which hands the LM a soft prefix `[B, Q, D]` (spliced
into its input embeddings where the prompt's `<image>` placeholder is, or first) or media for cross-attention
layers. The constructor decides once what trains: the encoder never, the LM not (unless a recipe unfreezes
it), the bridge as its config says. Tokenizers and image preprocessing travel with the model (`processors`).

The user verbs (`caption`, `answer`, `score`, `itm`, `itc`, ...) come from `vlbridge.inference.verbs`, and
`save` from the checkpoint formats registered in `vlbridge.models.formats`; neither knows the bridge.

Shapes: B batch, N image tokens, Dv image width, Q prefix tokens, D LM width.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from vlbridge.bridges.base import Bridge, bridge_spec, build_bridge
from vlbridge.encoders.vision import FrozenVisionEncoder
from vlbridge.errors import ConfigError, InputError
from vlbridge.inference.verbs import UserVerbs
from vlbridge.models.language_training import MODES, LoraSettings, merge_lora, set_language_training

VISION_SELECT = ("all", "patch")


@dataclass
class PromptStyle:
    """Prompt conventions of a checkpoint (the paper's defaults; T5 checkpoints say "Short answer").

    A prompt may hold `image_token` where the image goes. A prompt without one gets `image_first` before it
    (LLaVA: `"<image>\\n"`, the image first), or, when `image_first` is None, the visual prefix before
    everything, BOS included (BLIP-2's soft prompt).
    """

    caption_prompt: str = ""  # prompt for captioning when the caller gives none
    vqa_template: str = "Question: {} Answer:"
    chat_turn: str = "Question: {} Answer: {}"  # one finished turn of a multi-turn chat
    image_token: str = "<image>"
    image_first: str | None = None


# PromptStyle fields of older checkpoints that now belong to the Q-Former bridge's config.
_LEGACY_PROMPT_FIELDS = {"instruct": "instruct", "qformer_max_length": "instruction_max_length",
                         "text_max_length": "text_max_length"}  # fmt: skip


@dataclass
class VLMConfig:
    """Everything besides weights that a model needs to be rebuilt (saved as JSON)."""

    bridge: dict[str, Any] = field(default_factory=lambda: {"kind": "qformer"})  # `{"kind": ..., **fields}`
    vision: dict[str, Any] = field(default_factory=dict)  # transformers config dict of the vision model
    vision_layer: int = -1
    vision_select: str = "all"  # "all" tokens, or "patch": drop the first ([CLS]) token (LLaVA's "default")
    language: dict[str, Any] | None = None  # transformers config dict of the LLM (None: no LLM)
    prompts: PromptStyle = field(default_factory=PromptStyle)
    language_training: str = "frozen"  # "frozen" | "full" | "lora" (`models.language_training`)
    lora: dict[str, Any] = field(default_factory=dict)  # LoraSettings fields, for "lora"

    def __post_init__(self) -> None:
        if self.vision_select not in VISION_SELECT:
            raise ConfigError(f"vision_select must be one of {VISION_SELECT}, got {self.vision_select!r}")
        if self.language_training not in MODES:
            raise ConfigError(f"language_training must be one of {MODES}, got {self.language_training!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VLMConfig:
        """Read a saved config; the single-model layout of older checkpoints (Q-Former fields at the top) too."""
        d = copy.deepcopy(dict(d))
        prompts = dict(d.get("prompts", {}))
        if "bridge" not in d:  # a BLIP-2 config from before bridges were parts
            bridge: dict[str, Any] = {"kind": "qformer"}
            for key in ("qformer", "vision_norm_eps", "embed_dim"):
                if key in d:
                    bridge[key] = d.pop(key)
            for old, new in _LEGACY_PROMPT_FIELDS.items():
                if old in prompts:
                    bridge[new] = prompts.pop(old)
            d["bridge"] = bridge
        else:
            for old in _LEGACY_PROMPT_FIELDS:
                prompts.pop(old, None)
        d["prompts"] = PromptStyle(**prompts)
        return cls(**d)


class VisionLanguageModel(UserVerbs, nn.Module):
    """A frozen vision encoder, a bridge and an optional language model. Build it with `vlbridge.load(...)`,
    `vlbridge.models.builder.build_model(...)` or from parts."""

    def __init__(
        self,
        *,
        config: VLMConfig | Any,
        vision: FrozenVisionEncoder,
        language_model: PreTrainedModel | None = None,
        bridge: Bridge | None = None,
    ) -> None:
        super().__init__()
        config = config.to_config() if hasattr(config, "to_config") else config  # a legacy Blip2Config
        self.config = config
        self.vision = vision
        lm_width = None if language_model is None else language_model.get_input_embeddings().weight.shape[1]
        if bridge is None:
            bridge = build_bridge(config.bridge, vision_width=vision.width, lm_width=lm_width)
        self.bridge = bridge
        config.bridge = bridge_spec(bridge.kind, bridge.config)
        self.language_model = language_model
        if language_model is not None:
            set_language_training(language_model, config.language_training, LoraSettings(**config.lora))
        elif config.language_training != "frozen":
            raise ConfigError(f"language_training={config.language_training!r} needs a language model")
        # The processors, set by the loader: the LLM's tokenizer, the bridge's own (BERT's, for a Q-Former that
        # reads text), and the image preprocessing.
        self.tokenizer = None
        self.bridge_tokenizer = None
        self.image_processor = None

    def __getattr__(self, name: str) -> Any:
        """Attributes of the bridge read through the model (`model.qformer`, `model.temp`), as before bridges."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            bridge = self.__dict__.get("_modules", {}).get("bridge")
            if bridge is None or name.startswith("_"):
                raise
            return getattr(bridge, name)

    @property
    def qformer_tokenizer(self):
        """The bridge's tokenizer under its BLIP-2 name."""
        return self.bridge_tokenizer

    @qformer_tokenizer.setter
    def qformer_tokenizer(self, value) -> None:
        self.bridge_tokenizer = value

    # ----------------------------------------------------------------------------------------- parts
    @property
    def device(self) -> torch.device:
        return next(self.bridge.parameters()).device

    def train(self, mode: bool = True) -> VisionLanguageModel:
        super().train(mode)
        lm = self.language_model
        if lm is not None and not any(p.requires_grad for p in lm.parameters()):
            lm.eval()  # frozen: never dropout
        return self

    def merge_lora(self) -> VisionLanguageModel:
        """Fold the LM's LoRA adapters into its weights: a plain (frozen) LM, savable in any format."""
        merge_lora(self.language_model)
        set_language_training(self.language_model, "frozen")
        self.config.language_training, self.config.lora = "frozen", {}
        return self

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    @property
    def retrieval(self) -> Bridge | None:
        """The bridge if it has image-text matching heads (`vlbridge.bridges.base.RetrievalHeads`), else None."""
        return self.bridge if self.bridge.has_retrieval else None

    # ----------------------------------------------------------------------------------------- features
    def select_tokens(self, vision_feats: Tensor) -> Tensor:
        """The encoder's hidden states [B, N', Dv] (what the feature cache stores) -> the tokens the bridge reads."""
        return vision_feats[:, 1:] if self.config.vision_select == "patch" else vision_feats  # "patch": drop [CLS]

    def image_tokens(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [B, 3, H, W] -> the frozen encoder's tokens [B, N, Dv] that the bridge reads."""
        return self.select_tokens(self.vision(pixel_values.to(self.device)))

    def image_embeds(self, pixel_values: Tensor) -> Tensor:
        """The image tokens after the bridge's own input normalisation (BLIP-2's `ln_vision`)."""
        return self.bridge.normalize(self.image_tokens(pixel_values))

    @property
    def num_image_tokens(self) -> int:
        """N, the number of tokens the encoder gives the bridge per image."""
        return self.vision.num_tokens - (1 if self.config.vision_select == "patch" else 0)

    @property
    def num_visual_tokens(self) -> int:
        """How many prefix positions of the LM one image takes."""
        return self.bridge.num_output_tokens(self.num_image_tokens)

    def bridge_text(self, texts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
        """Texts in the bridge's own vocabulary -> (ids [B, T], mask [B, T]) on the model's device."""
        if self.bridge_tokenizer is None:
            raise InputError("this model has no tokenizer for its bridge's text input (a Q-Former's BERT vocabulary)")
        enc = self.bridge_tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    def prefix_from_features(
        self, vision_feats: Tensor, instruction_ids: Tensor | None = None, instruction_mask: Tensor | None = None
    ) -> Tensor:
        """Encoder hidden states [B, N', Dv] (+ instruction tokens) -> soft prefix [B, Q, D] in the LM's dtype."""
        if self.language_model is None:
            raise ValueError("this model has no language model (a stage-1 / retrieval checkpoint)")
        device = self.device
        ids = None if instruction_ids is None else instruction_ids.to(device)
        mask = None if instruction_mask is None else instruction_mask.to(device)
        out = self.bridge(self.select_tokens(vision_feats.to(device)), instruction_ids=ids, instruction_mask=mask)
        if out.prefix is None:
            raise ValueError(f"the {self.bridge.kind!r} bridge gives the LM no prefix")
        return out.prefix.to(self.language_model.get_input_embeddings().weight.dtype)

    def visual_prefix(self, pixel_values: Tensor, instructions: list[str] | None = None) -> Tensor:
        """Images (+ the instructions, for an instruction-aware bridge) -> soft prefix [B, Q, D] in the LM's dtype."""
        ids = mask = None
        if self.bridge.instruction_aware:
            ids, mask = self.bridge_text(instructions or [""] * len(pixel_values), self.bridge.instruction_max_length)
        return self.prefix_from_features(self.vision(pixel_values.to(self.device)), ids, mask)
