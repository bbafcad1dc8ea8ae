"""A CLIP dual encoder (Radford et al., 2021): the kind of frozen image encoder BLIP-2 is built on.

Two towers map an image and a text into one embedding space; training pulls matched pairs together and pushes the
other pairs of the batch apart with a symmetric InfoNCE loss over cosine similarities scaled by a learnable
temperature::

    image ──► CLIPVisionModel ──► [CLS] (post_layernorm) ──► visual_projection ──► L2-normalise ─┐
                                                                                                ├─► s · I Tᵀ
    text  ──► CLIPTextModel   ──► [EOS] (final_layer_norm) ──► text_projection  ──► L2-normalise ─┘

The logit scale ``s = exp(t)`` starts at ``1 / 0.07`` and is clamped at 100, as in CLIP.

The parameter names are those of transformers' ``CLIPModel`` (``vision_model.*``, ``text_model.*``,
``visual_projection``, ``text_projection``, ``logit_scale``), so :meth:`ClipDualEncoder.save` writes a ``CLIPModel``
checkpoint that transformers loads as is, and :meth:`ClipDualEncoder.save_vision` writes the vision tower alone as a
``CLIPVisionModel`` folder, which :func:`vlbridge.encoders.vision.load_vision_model` reads as BLIP-2's frozen image
encoder.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

from vlbridge.data.images import ImageProcessorConfig
from vlbridge.errors import CheckpointError

__all__ = [
    "LOGIT_SCALE_INIT",
    "LOGIT_SCALE_MAX",
    "ClipDualEncoder",
    "build_word_tokenizer",
    "clip_loss",
    "text_config_for",
    "tokenize",
]

LOGIT_SCALE_INIT: float = math.log(1 / 0.07)
"""Initial value of the log logit scale: a temperature of 0.07."""
LOGIT_SCALE_MAX: float = 100.0
"""The logit scale is clamped here so training cannot make the softmax arbitrarily sharp."""

# Special tokens of the word-level tokenizer. CLIPTextModel pools the first `eos_token_id`; an eos id of 2 would
# switch it to its legacy "largest token id" rule, so [EOS] is 3.
PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
_SPECIALS = (PAD, UNK, BOS, EOS)


def _as_config(config: CLIPVisionConfig | CLIPTextConfig | dict[str, Any], cls: type) -> Any:
    if isinstance(config, cls):
        return config
    if isinstance(config, dict):
        kwargs = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
        return cls(**kwargs)
    raise TypeError(f"expected a {cls.__name__} or a dict, got {type(config).__name__}")


def clip_loss(
    image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor, groups: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE over a batch of matched pairs.

    Args:
        image_embeds: ``[B, D]`` L2-normalised image embeddings.
        text_embeds: ``[B, D]`` L2-normalised text embeddings; text ``i`` describes image ``i``.
        logit_scale: The scale ``s`` (a scalar tensor, already exponentiated and clamped).
        groups: Optional ``[B]`` integer ids: pairs with equal ids are all positives (e.g. two images whose captions
            are the same string). None: only the diagonal is positive.

    Returns:
        ``(loss, logits_per_image)``: the mean of the image→text and text→image cross-entropies, and the ``[B, B]``
        logits ``s · I Tᵀ``.
    """
    logits_per_image = logit_scale * image_embeds @ text_embeds.t()  # [B, B]
    logits_per_text = logits_per_image.t()
    if groups is None:
        labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    else:
        positive = (groups[:, None] == groups[None, :]).to(logits_per_image.dtype)  # symmetric
        targets = positive / positive.sum(dim=1, keepdim=True)
        loss = (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2
    return loss, logits_per_image


class ClipDualEncoder(nn.Module):
    """CLIP: a ViT image tower and a causal Transformer text tower projected into one embedding space.

    Args:
        vision_config: The image tower (a ``CLIPVisionConfig`` or its dict).
        text_config: The text tower (a ``CLIPTextConfig`` or its dict). Its ``eos_token_id`` must be the id the
            tokenizer appends to every text: the text embedding is read there.
        embed_dim: Width of the shared embedding space.
        logit_scale_init: Initial log logit scale (``log(1 / 0.07)``).
    """

    def __init__(
        self,
        vision_config: CLIPVisionConfig | dict[str, Any],
        text_config: CLIPTextConfig | dict[str, Any],
        embed_dim: int = 128,
        *,
        logit_scale_init: float = LOGIT_SCALE_INIT,
    ) -> None:
        super().__init__()
        vision_config = _as_config(vision_config, CLIPVisionConfig)
        text_config = _as_config(text_config, CLIPTextConfig)
        if text_config.eos_token_id == 2:
            raise ValueError("text_config.eos_token_id must not be 2 (CLIPTextModel would pool the largest token id)")
        self.embed_dim = embed_dim
        self.vision_model = CLIPVisionModel(vision_config)
        self.text_model = CLIPTextModel(text_config)
        self.visual_projection = nn.Linear(vision_config.hidden_size, embed_dim, bias=False)
        self.text_projection = nn.Linear(text_config.hidden_size, embed_dim, bias=False)
        nn.init.normal_(self.visual_projection.weight, std=vision_config.hidden_size**-0.5)
        nn.init.normal_(self.text_projection.weight, std=text_config.hidden_size**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))

    @property
    def vision_config(self) -> CLIPVisionConfig:
        return self.vision_model.config

    @property
    def text_config(self) -> CLIPTextConfig:
        return self.text_model.config

    def scale(self) -> Tensor:
        """The logit scale ``exp(t)``, clamped at :data:`LOGIT_SCALE_MAX` (no gradient beyond the clamp)."""
        return self.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the parameter itself into ``[0, log(100)]`` (call after each optimiser step, as CLIP does)."""
        self.logit_scale.clamp_(0.0, math.log(LOGIT_SCALE_MAX))

    def encode_image(self, pixel_values: Tensor, *, normalize: bool = True) -> Tensor:
        """Image embeddings ``[B, embed_dim]`` from ``pixel_values`` ``[B, 3, H, W]``: projected ``[CLS]``."""
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output  # [B, Dv], post_layernorm([CLS])
        embeds = self.visual_projection(pooled)
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, normalize: bool = True) -> Tensor:
        """Text embeddings ``[B, embed_dim]`` from right-padded ``input_ids`` ``[B, L]``: projected ``[EOS]``."""
        pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output  # [B, Dt]
        embeds = self.text_projection(pooled)
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def forward(
        self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(image_embeds, text_embeds)``, both L2-normalised ``[B, embed_dim]``."""
        return self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask)

    def loss(
        self,
        pixel_values: Tensor,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        groups: Tensor | None = None,
    ) -> Tensor:
        """The symmetric InfoNCE loss of a batch of matched (image, text) pairs (see :func:`clip_loss`)."""
        image_embeds, text_embeds = self(pixel_values, input_ids, attention_mask)
        loss, _ = clip_loss(image_embeds.float(), text_embeds.float(), self.scale(), groups)
        return loss

    @torch.no_grad()
    def similarity(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Cosine similarities ``[n_images, n_texts]`` of every image with every text."""
        return self.encode_image(pixel_values) @ self.encode_text(input_ids, attention_mask).t()

    # ------------------------------------------------------------------------------------------------------------------
    # Saving and loading

    def to_hf(self) -> CLIPModel:
        """The same weights as a transformers ``CLIPModel`` (a copy)."""
        config = CLIPConfig(
            text_config=self.text_config.to_dict(),
            vision_config=self.vision_config.to_dict(),
            projection_dim=self.embed_dim,
            logit_scale_init_value=LOGIT_SCALE_INIT,
        )
        model = CLIPModel(config)
        model.load_state_dict(self.state_dict(), strict=True)
        return model

    def save(
        self,
        directory: str | os.PathLike,
        *,
        tokenizer: Any | None = None,
        image_processor: ImageProcessorConfig | None = None,
    ) -> Path:
        """Write a transformers ``CLIPModel`` checkpoint (loadable by ``CLIPModel.from_pretrained``).

        Args:
            directory: Folder to write (created).
            tokenizer: A transformers tokenizer to save alongside, if any.
            image_processor: Preprocessing to record; defaults to a plain resize to the tower's image size.

        Returns:
            The folder.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.to_hf().save_pretrained(directory)
        self._write_preprocessor(directory, image_processor)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        return directory

    def save_vision(self, directory: str | os.PathLike, *, image_processor: ImageProcessorConfig | None = None) -> Path:
        """Write the image tower alone as a transformers ``CLIPVisionModel`` folder plus ``preprocessor_config.json``.

        Args:
            directory: Folder to write (created).
            image_processor: Preprocessing to record; defaults to a plain resize to the tower's image size with
                CLIP's mean and std.

        Returns:
            The folder.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.vision_model.save_pretrained(directory)
        self._write_preprocessor(directory, image_processor)
        return directory

    def _write_preprocessor(self, directory: Path, image_processor: ImageProcessorConfig | None) -> None:
        if image_processor is None:
            size = self.vision_config.image_size
            image_processor = ImageProcessorConfig(image_size=(size, size))
        text = json.dumps(image_processor.to_hf_dict(), indent=2) + "\n"
        (directory / "preprocessor_config.json").write_text(text, encoding="utf-8")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ClipDualEncoder:
        """Load a transformers ``CLIPModel`` folder (as written by :meth:`save`, or any local CLIP checkpoint).

        Raises:
            CheckpointError: The folder holds no CLIP checkpoint.
        """
        directory = Path(directory)
        try:
            config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{directory}: no readable config.json ({e})") from e
        if config.get("model_type") != "clip":
            raise CheckpointError(f"{directory}: not a CLIP checkpoint (model_type {config.get('model_type')!r})")
        hf = CLIPModel.from_pretrained(directory)
        model = cls(hf.config.vision_config, hf.config.text_config, hf.config.projection_dim)
        model.load_state_dict(hf.state_dict(), strict=True)
        return model


def build_word_tokenizer(words: Iterable[str], *, max_length: int = 64) -> Any:
    """A lowercase word-level tokenizer (``tokenizers`` library) that wraps every text as ``[BOS] ... [EOS]``.

    Ids: ``[PAD]`` 0, ``[UNK]`` 1, ``[BOS]`` 2, ``[EOS]`` 3, then the words sorted. Punctuation splits off as its
    own (usually unknown) token.

    Args:
        words: The vocabulary (e.g. :func:`vlbridge.data.world.world_vocabulary`).
        max_length: ``model_max_length`` of the returned tokenizer.

    Returns:
        A transformers ``PreTrainedTokenizerFast`` (pads on the right).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*_SPECIALS, *sorted(set(words) - set(_SPECIALS))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=max_length,
        padding_side="right",
    )


def text_config_for(tokenizer: Any, **kwargs: Any) -> CLIPTextConfig:
    """A ``CLIPTextConfig`` whose vocabulary and special ids match ``tokenizer`` (other fields from ``kwargs``)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **kwargs,
    )


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int | None = None) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` ``[N, L]`` for ``texts``, right-padded to the longest, truncated to
    ``max_length`` with the final ``[EOS]`` kept."""
    enc = tokenizer(list(texts), padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if max_length is not None and ids.shape[1] > max_length:
        lengths = mask.sum(dim=1)
        ids, mask = ids[:, :max_length].clone(), mask[:, :max_length].clone()
        cut = lengths > max_length
        ids[cut, max_length - 1] = tokenizer.eos_token_id
    return ids, mask
