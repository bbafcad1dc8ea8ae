"""BLIP-2: frozen vision encoder -> LayerNorm -> Q-Former -> projection -> frozen LLM (soft visual prompt).

The module composes the parts and computes features; `vlbridge.inference` turns them into captions,
answers, scores and matches. Heads for stage-1 (ITC/ITM) are optional: a generation checkpoint has none,
a retrieval checkpoint has no LLM.

Shapes: B batch, N image tokens, Dv image width, Q queries, H Q-Former width, T text tokens, D LLM width,
E ITC embedding width.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from vlbridge.bridges.qformer import QFormer, QFormerConfig
from vlbridge.encoders.vision import FrozenVisionEncoder


@dataclass
class PromptStyle:
    """Prompt conventions of a checkpoint (the paper's defaults; T5 checkpoints say "Short answer")."""

    caption_prompt: str = ""  # prompt for captioning when the caller gives none
    vqa_template: str = "Question: {} Answer:"
    chat_turn: str = "Question: {} Answer: {}"  # one finished turn of a multi-turn chat
    instruct: bool = False  # InstructBLIP: the prompt/question is also fed to the Q-Former
    qformer_max_length: int = 512  # InstructBLIP's Q-Former text length limit
    text_max_length: int = 35  # ITM/ITC text length limit (LAVIS max_txt_len)


@dataclass
class Blip2Config:
    """Everything besides weights that a BLIP-2 model needs to be rebuilt (saved as JSON)."""

    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    vision: dict[str, Any] = field(default_factory=dict)  # transformers config dict of the vision model
    vision_layer: int = -1
    vision_norm_eps: float = 1e-6  # ln_vision
    language: dict[str, Any] | None = None  # transformers config dict of the LLM (None: no LLM)
    embed_dim: int | None = 256  # ITC projection width; None: no stage-1 heads
    prompts: PromptStyle = field(default_factory=PromptStyle)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Blip2Config:
        d = dict(d)
        d["qformer"] = QFormerConfig(**d.get("qformer", {}))
        d["prompts"] = PromptStyle(**d.get("prompts", {}))
        return cls(**d)


class LMHead(nn.Module):
    """BERT's masked-LM head, used for ITG: transform (dense, GELU, LayerNorm) then the tied word embeddings."""

    def __init__(self, config: QFormerConfig, *, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        H = config.hidden_size
        self.dense = nn.Linear(H, H)
        self.norm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(H, config.vocab_size)
        self.decoder.weight = word_embeddings.weight  # tied, as in BERT
        nn.init.zeros_(self.decoder.bias)
        nn.init.normal_(self.dense.weight, std=0.02)
        nn.init.zeros_(self.dense.bias)

    def forward(self, x: Tensor) -> Tensor:
        """[B, T, H] -> logits [B, T, V]."""
        return self.decoder(self.norm(F.gelu(self.dense(x))))


class Blip2(nn.Module):
    """The BLIP-2 composition. Build it with `vlbridge.load(...)` or from parts."""

    def __init__(
        self,
        *,
        config: Blip2Config,
        vision: FrozenVisionEncoder,
        language_model: PreTrainedModel | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        qcfg = config.qformer
        self.vision = vision
        self.ln_vision = nn.LayerNorm(vision.width, eps=config.vision_norm_eps)  # trainable, unlike the encoder
        self.qformer = QFormer(config=qcfg)
        if config.embed_dim is not None:
            self.vision_proj = nn.Linear(qcfg.hidden_size, config.embed_dim)
            self.text_proj = nn.Linear(qcfg.hidden_size, config.embed_dim)
            self.itm_head = nn.Linear(qcfg.hidden_size, 2)
            self.temp = nn.Parameter(torch.tensor(0.07))
            self.itg_head = LMHead(qcfg, word_embeddings=self.qformer.embeddings.word_embeddings)
        self.language_model = language_model
        if language_model is not None:
            language_model.requires_grad_(False)
            language_model.eval()
            d_llm = language_model.get_input_embeddings().weight.shape[1]
            self.language_projection = nn.Linear(qcfg.hidden_size, d_llm)
        # Set by the loader: tokenizers and image preprocessing of the checkpoint.
        self.tokenizer = None  # the LLM's
        self.qformer_tokenizer = None  # BERT's (+ [DEC]); for ITM/ITC and InstructBLIP
        self.image_processor = None

    # ----------------------------------------------------------------------------------------- features
    @property
    def device(self) -> torch.device:
        return self.qformer.query_tokens.device

    def train(self, mode: bool = True) -> Blip2:
        super().train(mode)
        if self.language_model is not None:
            self.language_model.eval()  # frozen: never dropout
        return self

    def image_embeds(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [B, 3, H, W] -> normalised frozen features [B, N, Dv] that the Q-Former reads."""
        feats = self.vision(pixel_values.to(self.device))
        return self.ln_vision(feats.to(self.ln_vision.weight.dtype))

    def query_output(
        self, image_embeds: Tensor, qformer_ids: Tensor | None = None, qformer_mask: Tensor | None = None
    ) -> Tensor:
        """Query outputs [B, Q, H]; with `qformer_ids` [B, T] the instruction joins the queries (InstructBLIP)."""
        out = self.qformer(
            image_embeds=image_embeds, input_ids=qformer_ids, attention_mask=qformer_mask, regime="bidirectional"
        )
        return out.query_output

    def soft_prompt(self, query_output: Tensor) -> Tensor:
        """Query outputs [B, Q, H] -> LLM input embeddings [B, Q, D] in the LLM's dtype."""
        if self.language_model is None:
            raise ValueError("this model has no language model (a stage-1 / retrieval checkpoint)")
        dtype = self.language_model.get_input_embeddings().weight.dtype
        return self.language_projection(query_output).to(dtype)

    def itc_image_features(self, image_embeds: Tensor) -> Tensor:
        """L2-normalised per-query image embeddings [B, Q, E]."""
        q = self.qformer(image_embeds=image_embeds).query_output
        return F.normalize(self.vision_proj(q), dim=-1)

    def itc_text_features(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """L2-normalised text embeddings [B, E] from the [CLS] output of a text-only pass."""
        out = self.qformer(input_ids=input_ids, attention_mask=attention_mask, use_queries=False)
        return F.normalize(self.text_proj(out.hidden_states[:, 0]), dim=-1)

    def itm_logits(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Match logits [B, 2] of aligned (image, text) pairs: the ITM head averaged over query outputs."""
        out = self.qformer(
            image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask, regime="bidirectional"
        )
        return self.itm_head(out.query_output).mean(dim=1)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    # ----------------------------------------------------------------------------------------- user API
    def caption(self, images, prompt=None, *, num_beams: int = 1, max_new_tokens: int = 30, **kwargs) -> list[str]:
        """Caption images (paths, PIL images or pixel tensors); `prompt`: one for all or one per image."""
        from vlbridge.inference import tasks

        return tasks.caption(self, images, prompt, num_beams=num_beams, max_new_tokens=max_new_tokens, **kwargs)

    def answer(self, images, questions, *, num_beams: int = 1, max_new_tokens: int = 10, **kwargs) -> list[str]:
        """Answer one question per image (a single string is asked of every image)."""
        from vlbridge.inference import tasks

        return tasks.answer(self, images, questions, num_beams=num_beams, max_new_tokens=max_new_tokens, **kwargs)

    def chat(self, image, **kwargs):
        """Start a multi-turn conversation about one image: `chat = model.chat(img); chat.ask("...")`."""
        from vlbridge.inference import tasks

        return tasks.Chat(self, image, **kwargs)

    def score(self, images, texts, *, prompt=None, **kwargs) -> list[float]:
        """Log-likelihood of each text (+ EOS) given its image and prompt."""
        from vlbridge.inference import tasks

        return tasks.score(self, images, texts, prompt=prompt, **kwargs)

    def rank_answers(self, images, questions, candidates, **kwargs) -> list[str]:
        """Closed-set VQA: the most likely candidate answer for each (image, question)."""
        from vlbridge.inference import tasks

        return tasks.rank_answers(self, images, questions, candidates, **kwargs)

    def itm(self, images, texts, **kwargs) -> list[float]:
        """Match probability of each (image, text) pair."""
        from vlbridge.inference import tasks

        return tasks.itm(self, images, texts, **kwargs)

    def itc(self, images, texts, **kwargs) -> Tensor:
        """[n_images, n_texts] cosine similarity, max over queries."""
        from vlbridge.inference import tasks

        return tasks.itc(self, images, texts, **kwargs)

    def embed_images(self, images, **kwargs) -> Tensor:
        """Multi-vector ITC embeddings [n_images, Q, E] (one per query; an image scores a text by its best one)."""
        from vlbridge.inference import tasks

        return tasks.embed_images(self, images, **kwargs)

    def embed_texts(self, texts, **kwargs) -> Tensor:
        """ITC text embeddings [n_texts, E], in the space of :meth:`embed_images`."""
        from vlbridge.inference import tasks

        return tasks.embed_texts(self, texts, **kwargs)

    def save(self, directory, format: str = "native"):
        """Save as `format="native"` (vlbridge) or `format="hf"` (a transformers checkpoint)."""
        if format == "hf":
            from vlbridge.interop.hf import save_hf

            return save_hf(self, directory)
        if format == "native":
            from vlbridge.interop.native import save_native

            return save_native(self, directory)
        raise ValueError(f"unknown format {format!r}: use 'native' or 'hf'")
