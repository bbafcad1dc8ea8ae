"""Zero-shot classification with the stage-1 heads: every image against a prompt per class (CLIP's recipe).

Class prompts are encoded once (several templates averaged per class: the prompt ensemble), images are scored by
ITC as in retrieval (`inference.retrieval`, whose batching, K/V reuse and ITM scoring this shares), and each
image's top classes can be re-ranked by ITM.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vlbridge.errors import InputError
from vlbridge.eval.retrieval import zero_shot_accuracy
from vlbridge.inference.retrieval import (
    _TEXT_BATCH_FACTOR,
    KVs,
    _bar,
    _check_texts,
    _eval_mode,
    _finite,
    _image_features,
    _image_state,
    _index_kv,
    _itm_match_logit,
    _max_over_queries,
    _name,
    _positive_int,
    _prefetch,
    _text_features,
    _tokenize,
    _trimmed,
)
from vlbridge.inference.tasks import _require_heads, pixel_values

if TYPE_CHECKING:
    from torch import nn


__all__ = ["zero_shot_classify"]


def zero_shot_classify(
    model: nn.Module,
    images: Sequence[Any],
    class_names: Sequence[str],
    labels: Sequence[int] | None = None,
    *,
    template: str | Sequence[str] = "a photo of a {}.",
    rerank: bool = False,
    k: int = 10,
    batch_size: int = 32,
    progress: bool = False,
    top: int = 5,
) -> dict[str, Any]:
    """Zero-shot classification: each image against one prompt per class, by ITC (optionally ITM re-ranked).

    Args:
        model: A model with stage-1 heads.
        images: Image paths (or PIL images / ``[3, H, W]`` pixel tensors).
        class_names: The classes; each becomes ``template.format(name)`` for every template.
        labels: Optional true class index per image; gives ``accuracy``.
        template: Prompt template with one ``{}``, or several: their normalised ITC text embeddings are averaged
            per class and re-normalised (CLIP's prompt ensemble); ITM re-ranking averages the templates' logits.
        rerank: Re-score each image's top-``k`` classes by ``itm_logit + itc`` (others score ``-inf``). Only the
            image -> class direction is re-ranked (classification has no class queries).
        k: Classes per image re-scored by ITM; clipped to the number of classes.
        batch_size: Images per batch (and pairs per ITM batch).
        progress: Show a tqdm progress bar on stderr.
        top: Classes listed per image in ``predictions``.

    Returns:
        ``{"task", "class_names", "template" (the first), "templates", "rerank", "k", "count",
        "predicted": [class index per image],
        "predictions": [{"image", "top": [{"class", "index", "score"}]}], "accuracy": {"top1", "top5", "count"}``
        (only with ``labels``; via :func:`vlbridge.eval.retrieval.zero_shot_accuracy`), ``"timings"}``.

    Raises:
        InputError: No images or classes, empty or duplicate class names, a template without ``{}``, labels of the
            wrong length or out of range, bad ``k`` / ``batch_size`` / ``top``, or a model without ITM/ITC heads.
        ImageError: An image file is missing or unreadable.
    """
    start = time.perf_counter()
    if isinstance(images, str | bytes | os.PathLike) or not isinstance(images, Sequence):
        raise InputError(f"images must be a sequence of images, got {type(images).__name__}")
    images = list(images)
    if not images:
        raise InputError("no images given")
    names = _check_texts(class_names, "class_names")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"duplicate class names: {dupes[:5]}")
    templates = [template] if isinstance(template, str) else list(template) if isinstance(template, Sequence) else []
    if not templates or any(not isinstance(t, str) or "{}" not in t for t in templates):
        raise InputError(f"template must be a string with one '{{}}' for the class name (or a list), got {template!r}")
    k = _positive_int(k, "k")
    batch_size = _positive_int(batch_size, "batch_size")
    top = _positive_int(top, "top")
    target = None
    if labels is not None:
        try:
            if isinstance(labels, str):
                raise TypeError
            target = [int(x) for x in labels]
        except (TypeError, ValueError):
            raise InputError(f"labels must be a sequence of class indices, got {labels!r:.80}") from None
        if len(target) != len(images):
            raise InputError(f"{len(images)} images but {len(target)} labels")
        bad = [x for x in target if not 0 <= x < len(names)]
        if bad:
            raise InputError(f"labels must lie in [0, {len(names)}), got {bad[:5]}")
    _require_heads(model)
    prompts = [t.format(n) for t in templates for n in names]  # template-major: row t * C + c
    n_templates = len(templates)
    n_classes = len(names)
    k_classes = min(k, n_classes)

    with _eval_mode(model):
        ids, mask = _tokenize(model, prompts)
        text_feats = _text_features(model, ids, mask, batch_size * _TEXT_BATCH_FACTOR, False)  # [P * C, E]
        # Prompt ensemble: mean of the normalised embeddings of each class's prompts, normalised again.
        text_feats = F.normalize(text_feats.reshape(n_templates, n_classes, -1).mean(dim=0), dim=-1)  # [C, E]
        rows = []
        with _bar(len(images), "zero-shot", "img", progress) as bar:
            for pixels in _prefetch(images, batch_size, lambda batch: pixel_values(model, list(batch))):
                kv = _image_state(model, model.image_tokens(pixels))
                sim = _max_over_queries(_image_features(model, kv), text_feats)  # [b, C]
                if rerank:
                    sim = _rerank_classes(model, kv, sim, ids, mask, k_classes, batch_size, n_templates)
                rows.append(sim)
                bar.update(len(pixels))
        scores = torch.cat(rows)  # [I, C]

    values, idx = scores.topk(min(top, n_classes), dim=1)
    predictions = [
        {
            "image": _name(image),
            "top": [{"class": names[c], "index": c, "score": _finite(v)} for v, c in zip(vs, cs) if math.isfinite(v)],
        }
        for image, vs, cs in zip(images, values.tolist(), idx.tolist())
    ]
    result: dict[str, Any] = {
        "task": "zero_shot",
        "class_names": names,
        "template": templates[0],
        "templates": templates,
        "rerank": rerank,
        "k": k_classes if rerank else None,
        "count": len(images),
        "predicted": idx[:, 0].tolist(),
        "predictions": predictions,
    }
    if target is not None:
        result["accuracy"] = zero_shot_accuracy(scores, target)
    result["timings"] = {"total": round(time.perf_counter() - start, 4)}
    return result


def _rerank_classes(
    model: nn.Module, kv: KVs, sim: Tensor, ids: Tensor, mask: Tensor, k: int, batch_size: int, n_templates: int = 1
) -> Tensor:
    """Each image's top-k classes -> ``itm_logit + itc``, the rest ``-inf`` (image -> class direction only).

    With several templates (``ids`` rows ``t * C + c``) the ITM logit is the mean over the class's prompts.
    """
    n, n_classes = sim.shape
    shortlist = sim.topk(k, dim=1).indices  # [b, k]
    pair_image = torch.arange(n).repeat_interleave(k)
    pair_class = shortlist.reshape(-1)
    # Every (pair, template): the prompt row of template t for class c is t * C + c.
    rows_image = pair_image.repeat(n_templates)  # [T * P]
    rows_prompt = (torch.arange(n_templates).repeat_interleave(len(pair_class)) * n_classes) + pair_class.repeat(
        n_templates
    )
    itm = []
    for start in range(0, len(rows_image), batch_size):
        im, pr = rows_image[start : start + batch_size], rows_prompt[start : start + batch_size]
        b_ids, b_mask = _trimmed(ids[pr.to(ids.device)], mask[pr.to(ids.device)])
        itm.append(_itm_match_logit(model, _index_kv(model, kv, im.to(model.device)), b_ids, b_mask).float().cpu())
    logit = torch.cat(itm).reshape(n_templates, -1).mean(dim=0)  # [P]: mean over the class's prompts
    out = torch.full_like(sim, float("-inf"))
    out[pair_image, pair_class] = logit + sim[pair_image, pair_class]
    return out
