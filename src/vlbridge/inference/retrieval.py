"""Image-text retrieval with a BLIP-2 stage-1 model (the paper's protocol); zero-shot classification, built on
the same scoring, is in `inference.zero_shot`.

:func:`evaluate_retrieval` follows BLIP-2 / LAVIS on COCO and Flickr30k (Karpathy splits):

1. Records are grouped by ``image_id`` (unique images in first-seen order, several captions each).
2. Every image goes once through the frozen vision encoder; its Q-Former cross-attention keys/values are
   projected once and serve the ITC pass. Every caption goes once through the text-only Q-Former pass.
3. ITC similarity ``sim[i, t] = max_q <image_query_q, text>`` (cosines, before the temperature).
4. With ``rerank=True`` each query's top-``k`` ITC candidates (both directions) are re-scored by
   ``itm_logit(match) + sim`` (:func:`vlbridge.eval.retrieval.rerank_with_itm`); all other pairs score ``-inf``.
5. Recall@K in both directions with the any-caption convention
   (:func:`vlbridge.eval.retrieval.recall_at_k`), as fractions in [0, 1].

Re-ranking needs an image's cross-attention K/V again. They are never stored for all images: per image they take
``2 · L_cross · N · H`` numbers, more than the ``N · Dv`` frozen features they come from (ViT-g + BERT-base:
9,216 vs 1,408 per image token, ~9.5 MB vs ~1.4 MB per image in fp32). Instead the frozen features
``[n_images, N, Dv]`` are kept (on the CPU) when they fit in ``max_cache_bytes``; otherwise they are dropped and
recomputed from the image files during re-ranking. Either way the K/V are projected from them only for the
images of the current ITM batch, and kept until the next batch: the shortlisted pairs arrive sorted by image, so
every image's K/V are projected once for the whole re-ranking (and, without the cache, its vision pass is run
once more).

Missing or corrupt images are errors (:class:`vlbridge.errors.ImageError`), not skipped: a skipped image would
silently change the metric.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vlbridge.errors import InputError
from vlbridge.eval.progress import progress_bar
from vlbridge.eval.retrieval import recall_at_k, repeated_captions, rerank_with_itm
from vlbridge.inference.tasks import _qformer_tokens, _require_heads, pixel_values
from vlbridge.utils.io import write_text

Model = nn.Module  # a `vlbridge.models.vlm.VisionLanguageModel` with matching heads (`model.retrieval`)

if TYPE_CHECKING:
    from vlbridge.data.datasets import CaptionRecord

__all__ = [
    "DEFAULT_MAX_CACHE_BYTES",
    "RetrievalScores",
    "default_k",
    "evaluate_retrieval",
    "retrieval_scores",
    "write_report",
]

KVs = list[tuple[Tensor, Tensor] | None]  # per Q-Former layer: cross-attention (keys, values) [B, nh, N, hd]

DEFAULT_MAX_CACHE_BYTES = 8 * 2**30  # frozen image features kept for re-ranking (CPU memory)
_SIM_CHUNK_ELEMENTS = 2**26  # bound on the [rows, Q, T] temporary of the max-over-queries similarity
_TEXT_BATCH_FACTOR = 4  # text-only passes are cheap: batch this many times more texts than images
DEFAULT_ITM_BATCH_SIZE = 256  # pairs per ITM pass: 32 left the CPU's matrix units idle (see benchmarks/)


# ------------------------------------------------------------------------------------------------------------ results
@dataclass
class RetrievalScores:
    """Score matrices of a retrieval set, before any metric.

    Attributes:
        images: One entry per unique image (first-seen order): its path as a string.
        image_ids: The ``image_id`` of each unique image.
        texts: The captions, in record order.
        text_to_image: For each caption, the index of its image.
        itc: ``[n_images, n_texts]`` ITC similarities (max over queries of the cosines), float32, CPU.
        i2t: ``[n_images, n_texts]`` re-ranked scores (``itm_logit + itc``; ``-inf`` off the shortlist), or None.
        t2i: ``[n_texts, n_images]`` re-ranked scores for text queries, or None.
        itm_pairs: How many distinct (image, text) pairs the ITM head scored.
        k: The shortlist of each direction (texts per image query ``i2t``, images per text query ``t2i``).
        image_cache: ``"features"`` (frozen features kept for re-ranking), ``"recompute"`` (over the memory
            budget: recomputed from the files) or ``"none"`` (no re-ranking).
        timings: Seconds per stage (``images``, ``texts``, ``similarity``, ``rerank``).
    """

    images: list[str]
    image_ids: list[Any]
    texts: list[str]
    text_to_image: list[int]
    itc: Tensor
    i2t: Tensor | None = None
    t2i: Tensor | None = None
    itm_pairs: int = 0
    k: dict[str, int] = field(default_factory=dict)  # shortlist used per direction: {"i2t": ..., "t2i": ...}
    image_cache: str = "none"
    timings: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------ checks
def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value


def _group_records(records: Sequence[CaptionRecord]) -> tuple[list[Any], list[Any], list[str], list[int]]:
    """Records -> (image sources, image ids, captions, caption -> image index); unique images in first-seen order."""
    if isinstance(records, str | bytes) or not isinstance(records, Sequence):
        raise InputError(f"records must be a sequence of CaptionRecord, got {type(records).__name__}")
    if len(records) == 0:
        raise InputError("no records given: retrieval needs at least one (image, caption) pair")
    index: dict[Any, int] = {}
    sources: list[Any] = []
    ids: list[Any] = []
    texts: list[str] = []
    owner: list[int] = []
    for n, r in enumerate(records):
        if not all(hasattr(r, a) for a in ("image", "caption", "image_id")):
            raise InputError(f"records[{n}] is a {type(r).__name__}, not a CaptionRecord (image, caption, image_id)")
        if not isinstance(r.caption, str) or not r.caption.strip():
            raise InputError(f"records[{n}] has an empty or non-string caption: {r.caption!r}")
        try:
            i = index.get(r.image_id)
        except TypeError:
            raise InputError(f"records[{n}] has an unhashable image_id {r.image_id!r}") from None
        if i is None:
            i = index[r.image_id] = len(sources)
            sources.append(r.image)
            ids.append(r.image_id)
        elif _name(r.image) != _name(sources[i]):
            raise InputError(
                f"records[{n}]: image_id {r.image_id!r} is used for two different images "
                f"({_name(sources[i])} and {_name(r.image)})"
            )
        texts.append(r.caption)
        owner.append(i)
    return sources, ids, texts, owner


def _name(source: Any) -> str:
    if isinstance(source, str | os.PathLike):
        return str(source)
    return f"<{type(source).__name__}>"


def _check_texts(texts: Sequence[str], name: str) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise InputError(f"{name} must be a sequence of strings, got {type(texts).__name__}")
    out = list(texts)
    if not out:
        raise InputError(f"no {name} given")
    for n, t in enumerate(out):
        if not isinstance(t, str) or not t.strip():
            raise InputError(f"{name}[{n}] must be a non-empty string, got {t!r}")
    return out


# ------------------------------------------------------------------------------------------------------------ helpers
@contextmanager
def _eval_mode(model: Model) -> Iterator[None]:
    """Evaluate without dropout, then give the model back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _bar(total: int | None, desc: str, unit: str, enabled: bool) -> Any:
    """A tqdm bar on a terminal, periodic plain lines otherwise (:func:`vlbridge.eval.progress.progress_bar`)."""
    return progress_bar(total, desc, unit, enabled)


def _prefetch(items: Sequence[Any], batch_size: int, load: Callable[[Sequence[Any]], Any]) -> Iterator[Any]:
    """Yield ``load(batch)`` for consecutive batches, preparing the next batch in a thread while one is used.

    Image decoding and resizing (PIL, numpy) run while the model computes on the previous batch.
    """
    starts = list(range(0, len(items), batch_size))
    if not starts:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, items[starts[0] : starts[0] + batch_size])
        for nxt in [*starts[1:], None]:
            current = pending.result()
            if nxt is not None:
                pending = pool.submit(load, items[nxt : nxt + batch_size])
            yield current


def _image_state(model: Model, image_tokens: Tensor) -> KVs:
    """What the matching heads compute once per image (a Q-Former's cross-attention K/V)."""
    return model.retrieval.image_state(image_tokens)


def _image_features(model: Model, image_kv: KVs) -> Tensor:
    """ITC image features [B, Q, E] from an image state."""
    return model.retrieval.image_embeddings(image_kv)


def _itm_match_logit(model: Model, image_kv: KVs, ids: Tensor, mask: Tensor) -> Tensor:
    """ITM "match" logit [B] of aligned (image state, text) rows."""
    return model.retrieval.match_logits(image_kv, ids, mask)[:, 1]


def _index_kv(model: Model, image_kv: KVs, rows: Tensor) -> KVs:
    return model.retrieval.select_state(image_kv, rows)


def _trimmed(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the padding columns that no row of this batch needs."""
    width = max(int(mask.sum(dim=1).max()), 1)
    return ids[:, :width], mask[:, :width]


def _tokenize(model: Model, texts: list[str]) -> tuple[Tensor, Tensor]:
    return _qformer_tokens(model, texts, model.retrieval.text_max_length)


def _text_features(model: Model, ids: Tensor, mask: Tensor, batch_size: int, progress: bool) -> Tensor:
    """ITC text features [T, E] for pre-tokenised texts."""
    feats = []
    with _bar(len(ids), "texts", "txt", progress) as bar:
        for start in range(0, len(ids), batch_size):
            b_ids, b_mask = _trimmed(ids[start : start + batch_size], mask[start : start + batch_size])
            feats.append(model.retrieval.text_embeddings(b_ids, b_mask).float())
            bar.update(len(b_ids))
    return torch.cat(feats)


def _max_over_queries(image_feats: Tensor, text_feats: Tensor) -> Tensor:
    """``max_q <image_feats[i, q], text_feats[t]>`` -> [I, T] float32 on the CPU, in bounded-memory row chunks."""
    n_images, n_queries, _ = image_feats.shape
    rows = max(1, _SIM_CHUNK_ELEMENTS // max(1, n_queries * text_feats.shape[0]))
    text_feats = text_feats.to(image_feats.device, torch.float32)
    out = []
    for start in range(0, n_images, rows):
        chunk = image_feats[start : start + rows].float()
        out.append(torch.einsum("iqe,te->iqt", chunk, text_feats).amax(dim=1).cpu())
    return torch.cat(out)


class _ImageKV:
    """Cross-attention K/V of the images in the current ITM batch, from kept frozen features or recomputed.

    ``get(images)`` returns the K/V for a list of image indices (one row per entry, repeats allowed). The K/V of
    the images of the previous call are kept (stacked, one row per image), so with pairs sorted by image each
    image is projected once; new images are projected together in one call.
    """

    def __init__(self, model: Model, features: Tensor | None, sources: list[Any], batch_size: int) -> None:
        self.model = model
        self.features = features  # [n_images, N, Dv] on the CPU, or None: recompute from `sources`
        self.sources = sources
        self.batch_size = batch_size
        self.held: dict[int, int] = {}  # image index -> row of `self.kv`
        self.kv: KVs = []

    def _compute(self, images: list[int]) -> KVs:
        """K/V of `images`, stacked in that order (per layer [len(images), nh, N, hd])."""
        model = self.model
        if self.features is not None:
            return _image_state(model, self.features[images].to(model.device))
        parts = []
        for start in range(0, len(images), self.batch_size):
            chunk = [self.sources[i] for i in images[start : start + self.batch_size]]
            parts.append(_image_state(model, model.image_tokens(pixel_values(model, chunk))))
        layers = zip(*parts)  # per layer: that layer's (keys, values) of every chunk, or Nones
        return [
            None if kv[0] is None else (torch.cat([x[0] for x in kv]), torch.cat([x[1] for x in kv])) for kv in layers
        ]

    def get(self, images: list[int]) -> KVs:
        unique = list(dict.fromkeys(images))
        kept = [i for i in unique if i in self.held]
        missing = [i for i in unique if i not in self.held]
        device = self.model.device
        fresh = self._compute(missing) if missing else None
        old_rows = torch.tensor([self.held[i] for i in kept], dtype=torch.long, device=device)
        stacked: KVs = []
        n_layers = len(fresh) if fresh is not None else len(self.kv)
        for layer in range(n_layers):
            parts = []
            if kept:
                kv = self.kv[layer]
                parts.append(None if kv is None else (kv[0][old_rows], kv[1][old_rows]))
            if fresh is not None:
                parts.append(fresh[layer])
            if parts[0] is None:
                stacked.append(None)
            elif len(parts) == 1:
                stacked.append(parts[0])
            else:
                stacked.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
        self.kv = stacked
        self.held = {i: n for n, i in enumerate(kept + missing)}
        rows = torch.tensor([self.held[i] for i in images], dtype=torch.long, device=device)
        return _index_kv(self.model, stacked, rows)


def default_k(gallery: int) -> int:
    """The re-ranking shortlist for a gallery of ``gallery`` candidates: 5% of it, at least 16, at most 128.

    128 is the paper's value on COCO's 5k test images (2.6% of the images, 0.5% of the 25k captions); a small
    gallery gets a proportionally larger shortlist, always enough for recall@10.
    """
    return max(1, min(gallery, max(16, min(128, math.ceil(0.05 * gallery)))))


# ------------------------------------------------------------------------------------------------------------ retrieval
def retrieval_scores(
    model: Model,
    records: Sequence[CaptionRecord],
    *,
    k: int | None = None,
    batch_size: int = 32,
    rerank: bool = True,
    progress: bool = True,
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
    itm_batch_size: int = DEFAULT_ITM_BATCH_SIZE,
) -> RetrievalScores:
    """Compute the ITC (and re-ranked) score matrices of a caption set; the metrics come from them.

    Args:
        model: A model with stage-1 heads (a retrieval / stage-1 checkpoint).
        records: One record per caption; records sharing an ``image_id`` share their image.
        k: ITC candidates per query re-scored by ITM (the paper uses 128); clipped to the candidate count.
            None: :func:`default_k` of each direction's gallery (texts for image queries, images for text queries).
        batch_size: Images per vision batch; texts are batched 4x larger.
        rerank: Re-score the shortlist with ITM (False: ITC only).
        progress: Progress on stderr (a tqdm bar on a terminal, a plain line every 30 s otherwise).
        max_cache_bytes: Keep the frozen image features for re-ranking only if they fit in this many bytes
            (CPU memory); otherwise recompute them from the files during re-ranking. 0 always recomputes.
        itm_batch_size: (image, text) pairs per ITM forward pass.

    Returns:
        The :class:`RetrievalScores`. Identical caption texts are encoded once, so their ITC scores tie exactly.

    Raises:
        InputError: Empty or malformed records, an ``image_id`` used for two different images, a bad ``k`` or
            ``batch_size``, or a model without ITM/ITC heads.
        ImageError: An image file is missing or unreadable.
    """
    if k is not None:
        k = _positive_int(k, "k")
    batch_size = _positive_int(batch_size, "batch_size")
    itm_batch_size = _positive_int(itm_batch_size, "itm_batch_size")
    if isinstance(max_cache_bytes, bool) or not isinstance(max_cache_bytes, int) or max_cache_bytes < 0:
        raise InputError(f"max_cache_bytes must be a non-negative integer, got {max_cache_bytes!r}")
    _require_heads(model)
    sources, image_ids, texts, owner = _group_records(records)
    n_images = len(sources)
    k_i2t = default_k(len(texts)) if k is None else k
    k_t2i = default_k(n_images) if k is None else k
    timings: dict[str, float] = {}

    with _eval_mode(model):
        # Each distinct text is tokenised and encoded once; `text_rows` maps captions to those rows.
        distinct = list(dict.fromkeys(texts))
        row_of = {t: n for n, t in enumerate(distinct)}
        text_rows = torch.tensor([row_of[t] for t in texts], dtype=torch.long)
        ids, mask = _tokenize(model, distinct)

        # Images: frozen features -> cross-attention K/V (once) -> ITC query features.
        t0 = time.perf_counter()
        image_feats: list[Tensor] = []
        kept: list[Tensor] | None = [] if rerank else None
        with _bar(n_images, "images", "img", progress) as bar:
            for pixels in _prefetch(sources, batch_size, lambda batch: pixel_values(model, list(batch))):
                embeds = model.image_tokens(pixels)  # [b, N, Dv]
                image_feats.append(_image_features(model, _image_state(model, embeds)))
                if kept is not None:
                    per_image = embeds[0].numel() * embeds.element_size()
                    if per_image * n_images <= max_cache_bytes:
                        kept.append(embeds.cpu())
                    else:
                        kept = None
                bar.update(len(embeds))
        image_q = torch.cat(image_feats)  # [I, Q, E]
        timings["images"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        text_feats = _text_features(model, ids, mask, batch_size * _TEXT_BATCH_FACTOR, progress)  # [distinct, E]
        text_feats = text_feats[text_rows.to(text_feats.device)]  # [T, E]
        timings["texts"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        itc = _max_over_queries(image_q, text_feats)  # [I, T]
        timings["similarity"] = time.perf_counter() - t0
        result = RetrievalScores(
            images=[_name(s) for s in sources],
            image_ids=image_ids,
            texts=texts,
            text_to_image=owner,
            itc=itc,
            timings=timings,
        )
        if not rerank:
            return result

        # Re-ranking: ITM on each query's top-k, image K/V reprojected once per image (pairs come sorted by image).
        t0 = time.perf_counter()
        features = torch.cat(kept) if kept else None
        images_kv = _ImageKV(model, features, sources, batch_size)
        scored = 0
        with _bar(None, "itm re-rank", "pair", progress) as bar:

            def itm_score(images: list[int], text_rows_: list[int]) -> Tensor:
                nonlocal scored
                rows = text_rows[torch.tensor(text_rows_)].to(ids.device)
                b_ids, b_mask = _trimmed(ids[rows], mask[rows])  # padded to the longest text of this batch
                logits = _itm_match_logit(model, images_kv.get(images), b_ids, b_mask)
                scored += len(images)
                bar.update(len(images))
                return logits.float()

            i2t, t2i = rerank_with_itm(
                itc, itm_score, k=k_i2t, k_t2i=k_t2i, batch_size=itm_batch_size, on_pairs=lambda n: bar.reset(total=n)
            )
        timings["rerank"] = time.perf_counter() - t0
        result.i2t, result.t2i = i2t, t2i
        result.itm_pairs = scored
        result.k = {"i2t": min(k_i2t, len(texts)), "t2i": min(k_t2i, n_images)}
        result.image_cache = "features" if features is not None else "recompute"
        return result


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _examples(scores: RetrievalScores, i2t: Tensor, t2i: Tensor, n_queries: int, top: int) -> dict[str, list]:
    """Top-``top`` candidates of the first ``n_queries`` queries in each direction (finite scores only)."""
    owner = scores.text_to_image
    image_queries = []
    for i in range(min(n_queries, len(scores.images))):
        values, idx = i2t[i].topk(min(top, i2t.shape[1]))
        image_queries.append(
            {
                "image": scores.images[i],
                "image_id": scores.image_ids[i],
                "captions": [t for t, o in zip(scores.texts, owner) if o == i],
                "top": [
                    {"text": scores.texts[t], "score": _finite(v), "correct": owner[t] == i}
                    for v, t in zip(values.tolist(), idx.tolist())
                    if math.isfinite(v)
                ],
            }
        )
    text_queries = []
    for t in range(min(n_queries, len(scores.texts))):
        values, idx = t2i[t].topk(min(top, t2i.shape[1]))
        text_queries.append(
            {
                "text": scores.texts[t],
                "image": scores.images[owner[t]],
                "top": [
                    {"image": scores.images[i], "score": _finite(v), "correct": i == owner[t]}
                    for v, i in zip(values.tolist(), idx.tolist())
                    if math.isfinite(v)
                ],
            }
        )
    return {"image_to_text": image_queries, "text_to_image": text_queries}


def _json_id(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


def evaluate_retrieval(
    model: Model,
    records: Sequence[CaptionRecord],
    *,
    k: int | None = None,
    batch_size: int = 32,
    rerank: bool = True,
    progress: bool = True,
    ks: Sequence[int] = (1, 5, 10),
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
    n_examples: int = 5,
    itm_batch_size: int = DEFAULT_ITM_BATCH_SIZE,
) -> dict[str, Any]:
    """Evaluate image-text retrieval with the BLIP-2 protocol and return a JSON-able report.

    Args:
        model: A model with stage-1 heads (a retrieval / stage-1 checkpoint).
        records: One record per caption (e.g. from ``read_coco_karpathy(..., split="test")``); records sharing an
            ``image_id`` share their image.
        k: ITC candidates per query re-scored by ITM (the paper uses 128); None: :func:`default_k` of each
            direction's gallery.
        batch_size: Images per vision batch.
        rerank: Also re-rank with ITM (the paper's numbers); False reports ITC only.
        progress: Show tqdm progress bars on stderr.
        ks: Recall cut-offs.
        max_cache_bytes: Memory budget for keeping frozen image features between the ITC pass and re-ranking
            (see the module docstring).
        n_examples: How many queries per direction get their top-5 candidates listed under ``examples``.
        itm_batch_size: Pairs per ITM forward pass.

    Returns:
        ``{"task", "counts": {"images", "texts", "itm_pairs"}, "k" (as given), "k_used": {"i2t", "t2i"},
        "rerank", "ks", "tie_rule", "repeated_captions": {"texts", "examples"}, "metrics": {"itc": {...},
        "itm": {...}}`` (``itm`` only with re-ranking; keys as :func:`vlbridge.eval.retrieval.recall_at_k`,
        fractions in [0, 1]), ``"image_cache"``, ``"timings"`` (seconds per stage, ``total``, ``images_per_s``),
        ``"examples": {"image_to_text": [...], "text_to_image": [...]}`` (scores are the re-ranked ones when
        re-ranking, else ITC)``}``. Strict JSON: no NaN or infinity.

    Raises:
        InputError: Bad arguments or records (see :func:`retrieval_scores`), bad ``ks``.
        ImageError: An image file is missing or unreadable.
    """
    start = time.perf_counter()
    ks = tuple(ks)
    if not ks or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in ks):
        raise InputError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 0:
        raise InputError(f"n_examples must be a non-negative integer, got {n_examples!r}")
    scores = retrieval_scores(
        model,
        records,
        k=k,
        batch_size=batch_size,
        rerank=rerank,
        progress=progress,
        max_cache_bytes=max_cache_bytes,
        itm_batch_size=itm_batch_size,
    )
    repeated = repeated_captions(scores.texts, scores.text_to_image)
    if repeated:
        shown = ", ".join(f"{t!r} ({n} images)" for t, n in sorted(repeated.items(), key=lambda x: -x[1])[:3])
        warnings.warn(
            f"{len(repeated)} caption texts belong to several images (e.g. {shown}): their images cannot be told "
            "apart by them, and recall ranks such ties by gallery order (the Karpathy rule)",
            stacklevel=2,
        )
    t0 = time.perf_counter()
    metrics = {"itc": recall_at_k(scores.itc, scores.text_to_image, ks)}
    if rerank:
        metrics["itm"] = recall_at_k(scores.i2t, scores.text_to_image, ks, sim_t2i=scores.t2i)
    timings = dict(scores.timings)
    timings["metrics"] = time.perf_counter() - t0
    i2t = scores.i2t if rerank else scores.itc
    t2i = scores.t2i if rerank else scores.itc.T
    examples = _examples(scores, i2t, t2i, n_examples, 5)
    timings["total"] = time.perf_counter() - start
    timings["images_per_s"] = len(scores.images) / timings["images"] if timings["images"] > 0 else 0.0
    for example in examples["image_to_text"]:
        example["image_id"] = _json_id(example["image_id"])
    return {
        "task": "retrieval",
        "counts": {"images": len(scores.images), "texts": len(scores.texts), "itm_pairs": scores.itm_pairs},
        "k": k,
        "k_used": scores.k or None,
        "rerank": rerank,
        "ks": list(ks),
        "tie_rule": "sorted order: rank of the first ground truth in a stable descending sort (Karpathy)",
        "repeated_captions": {"texts": len(repeated), "examples": sorted(repeated, key=lambda t: -repeated[t])[:5]},
        "metrics": metrics,
        "image_cache": scores.image_cache,
        "timings": {name: round(value, 4) for name, value in timings.items()},
        "examples": examples,
    }


# ------------------------------------------------------------------------------------------------------------ reports
def write_report(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a result dict as JSON, atomically (a temporary file in the same folder, then renamed into place).

    Args:
        result: A JSON-able dict (e.g. from :func:`evaluate_retrieval`).
        path: Target file; missing parent folders are created.

    Returns:
        The path written.

    Raises:
        InputError: ``result`` is not JSON-serialisable (checked before anything is written); NaN or infinite
            numbers are refused too, since strict JSON has none.
    """
    target = Path(path)
    try:
        text = json.dumps(result, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    except (TypeError, ValueError) as e:
        raise InputError(f"report is not JSON-serialisable: {e}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text(target, text)
    return target
