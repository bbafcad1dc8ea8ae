"""Cheap periodic validation during training, on a small held-out slice of `data.val`.

With ``run.val_every: N`` (and ``data.val`` set) the loop calls a :class:`Validator` every N optimiser steps and
at the last step, and writes what it returns into that step's `log.csv` row:

- stage 1: ITC recall@1/5 both ways on the first ``data.val_samples`` images of `data.val` (with all their
  captions), without ITM re-ranking (that stays in the end-of-run evaluation) — columns ``val_txt_r1``,
  ``val_txt_r5``, ``val_img_r1``, ``val_img_r5``;
- stage 2: the language-modelling loss of those images' captions (mean over target tokens) — ``val_lm_loss``.

The frozen encoder's features of the slice are computed once, at set-up; each validation then costs Q-Former
passes only. Every rank validates (the stage-2 loss averages token counts across ranks); rank 0 logs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vlbridge.errors import ConfigError

if TYPE_CHECKING:
    from vlbridge.models.vlm import VisionLanguageModel
    from vlbridge.training.recipe import TrainConfig

__all__ = ["Validator", "make_validator"]


class Validator:
    """Validation of one run; call it with the model to get the ``val_*`` values."""

    def __init__(self, cfg: TrainConfig, model: VisionLanguageModel) -> None:
        from vlbridge.data.datasets import read_caption_manifest
        from vlbridge.inference.tasks import pixel_values

        every, samples = cfg.run.val_every, cfg.data.val_samples
        if every is None or isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"config key 'run.val_every': must be >= 1 (or null: no validation), got {every!r}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ConfigError(f"config key 'data.val_samples': must be >= 1, got {samples!r}")
        self.every, self.stage, self.batch_size = every, cfg.stage, cfg.data.batch_size
        records = read_caption_manifest(cfg.data.val)
        keep = set(list(dict.fromkeys(r.image_id for r in records))[:samples])
        self.records = [r for r in records if r.image_id in keep]
        self.images = list(dict.fromkeys(r.image_id for r in self.records))
        first = {}
        for r in self.records:
            first.setdefault(r.image_id, r.image)
        was_training = model.training
        model.eval()
        feats = []
        with torch.inference_mode():
            for start in range(0, len(self.images), self.batch_size):
                chunk = [first[i] for i in self.images[start : start + self.batch_size]]
                feats.append(model.vision(pixel_values(model, chunk).to(model.device)).cpu())
        model.train(was_training)
        self.features = torch.cat(feats)  # [images, N, Dv], frozen encoder output (before ln_vision)
        self.row = {image_id: n for n, image_id in enumerate(self.images)}
        self.collate = None
        if self.stage == "stage2":
            from vlbridge.training.stage2 import PromptCollate

            self.collate = PromptCollate(model, max_text_length=cfg.data.max_text_length, feature_key="vision_feats")

    def due(self, step: int, total: int) -> bool:
        """Whether to validate after optimiser step `step` of `total`."""
        return step % self.every == 0 or step == total

    def __call__(self, model: VisionLanguageModel) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return self._itc_recall(model) if self.stage == "stage1" else self._lm_loss(model)
        finally:
            model.train(was_training)

    def _itc_recall(self, model: VisionLanguageModel) -> dict[str, float]:
        from vlbridge.eval.retrieval import recall_at_k
        from vlbridge.inference.retrieval import (
            _image_features,
            _image_state,
            _max_over_queries,
            _text_features,
            _tokenize,
        )

        image_q = []
        for start in range(0, len(self.features), self.batch_size):
            tokens = model.select_tokens(self.features[start : start + self.batch_size].to(model.device))
            image_q.append(_image_features(model, _image_state(model, tokens)))
        texts = [r.caption for r in self.records]
        ids, mask = _tokenize(model, texts)
        text = _text_features(model, ids, mask, 4 * self.batch_size, False)
        sim = _max_over_queries(torch.cat(image_q), text)  # [images, texts]
        owner = [self.row[r.image_id] for r in self.records]
        metrics = recall_at_k(sim, owner, ks=(1, 5))
        return {f"val_{k}": round(metrics[k], 4) for k in ("txt_r1", "txt_r5", "img_r1", "img_r5")}

    def _lm_loss(self, model: VisionLanguageModel) -> dict[str, float]:
        from vlbridge.training.stage2 import Stage2Module

        module = Stage2Module(model)
        total, tokens = 0.0, 0
        for start in range(0, len(self.records), self.batch_size):
            chunk = self.records[start : start + self.batch_size]
            samples = [
                {
                    "prompt": None,
                    "target": r.caption,
                    "history": (),
                    "image_id": r.image_id,
                    "index": start + n,
                    "split_seed": start + n,  # T5's prefix split: fixed, so every validation is comparable
                    "vision_feats": self.features[self.row[r.image_id]],
                }
                for n, r in enumerate(chunk)
            ]
            batch = self.collate(samples)
            count = sum(len(t) for t in batch["target_ids"])
            out = module(batch)
            total += float(out.lm_loss) * count
            tokens += count
        return {"val_lm_loss": round(total / max(tokens, 1), 5)}


def make_validator(cfg: TrainConfig, model: VisionLanguageModel) -> Validator | None:
    """A :class:`Validator` when ``run.val_every`` and ``data.val`` are set, else None."""
    if cfg.run.val_every is None:
        return None
    if not cfg.data.val:
        raise ConfigError("run.val_every needs data.val: a caption manifest to validate on")
    return Validator(cfg, model)
