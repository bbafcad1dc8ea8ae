"""Image-text retrieval metrics (Karpathy-split convention) and ITM re-ranking.

Conventions, following the BLIP-2 paper and LAVIS's retrieval evaluation:

- **Text retrieval** (image → text, keys ``txt_r{K}``): an image query is a hit at K if *any* of its
  captions ranks within the top K texts.
- **Image retrieval** (text → image, keys ``img_r{K}``): a caption query is a hit at K if its own
  image ranks within the top K images.
- ``txt_r_mean`` / ``img_r_mean`` average the recalls over the requested K; ``r_mean`` averages
  those two. LAVIS reports percentages; we return **fractions in [0, 1]** (multiply by 100 to
  compare with the paper).
- **Ties: rank by sorted order** (the Karpathy / LAVIS evaluation code): a query's rank is the position of
  its first ground-truth candidate in the candidates sorted by score, descending, with equal scores kept in
  index order (a stable sort; LAVIS's ``np.argsort`` leaves the order of ties unspecified, we fix it). So a
  wrong candidate tied with the best correct one ranks ahead of it only if it comes first in the gallery.
  When several images share a caption text (templated data), their captions tie exactly and the tie is
  broken by position — :func:`repeated_captions` finds such texts, and the evaluation warns about them.
  ``-inf`` scores (candidates not shortlisted by :func:`rerank_with_itm`) rank behind every finite score.

The paper's protocol: ITC similarity for all pairs, then for every query its top ``k = 128`` ITC
candidates are re-scored with ``itm_logit + itc_similarity`` (:func:`rerank_with_itm`), everything
else scored ``-inf``, and recall is computed on the re-scored matrices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from vlbridge.errors import InputError

__all__ = ["recall_at_k", "repeated_captions", "rerank_with_itm", "zero_shot_accuracy"]

# Rows of a score matrix processed at once when counting ranks (bounds the temporary masks).
_ROW_CHUNK = 1024


def _check_matrix(name: str, matrix: Tensor) -> None:
    if not isinstance(matrix, Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(matrix).__name__}")
    if matrix.dim() != 2:
        raise InputError(f"{name} must be 2-D, got shape {tuple(matrix.shape)}")
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise InputError(f"{name} is empty (shape {tuple(matrix.shape)})")
    if not (matrix.is_floating_point() or matrix.dtype in (torch.int32, torch.int64)):
        raise InputError(f"{name} must hold real-valued scores, got dtype {matrix.dtype}")
    if matrix.is_floating_point() and bool(torch.isnan(matrix).any()):
        raise InputError(f"{name} contains NaN")


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    out = tuple(ks)
    if not out or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in out):
        raise InputError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    return out


def _ranks_of_targets(scores: Tensor, positive: Tensor) -> Tensor:
    """0-based rank of each row's first positive in the stable descending sort of the row's scores.

    Equal to ``argsort(-scores, stable=True).tolist().index(first positive)`` without sorting: the
    candidates scoring strictly higher than the best positive, plus those tying with it at a lower index.

    Args:
        scores: ``[rows, cols]`` scores.
        positive: ``[rows, cols]`` boolean mask of the correct candidates (at least one per row).

    Returns:
        ``[rows]`` long tensor of ranks.
    """
    if not scores.is_floating_point():
        scores = scores.double()
    cols = scores.shape[1]
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)  # [rows, 1]
    index = torch.arange(cols, device=scores.device).expand_as(scores)
    # The first positive of the sort: the lowest-index positive among those scoring `best`.
    first = torch.where(positive & (scores == best), index, cols).amin(dim=1, keepdim=True)  # [rows, 1]
    return ((scores > best) | ((scores == best) & (index < first))).sum(dim=1)


def repeated_captions(texts: Sequence[str], text_to_image: Sequence[int]) -> dict[str, int]:
    """Caption texts that belong to more than one image, with how many images share each.

    Such captions score identically against every image, so retrieval cannot tell their images apart
    by them; recall then depends on the tie rule (see the module docstring). Texts are compared after
    lower-casing and collapsing white space.

    Args:
        texts: The captions.
        text_to_image: For each caption, the index of its image.

    Returns:
        ``{text: number of distinct images}`` for every text shared by two or more images.
    """
    owners: dict[str, set[int]] = {}
    for text, image in zip(texts, text_to_image):
        owners.setdefault(" ".join(str(text).lower().split()), set()).add(int(image))
    return {t: len(o) for t, o in owners.items() if len(o) > 1}


def recall_at_k(
    sim_i2t: Tensor,
    text_to_image: Sequence[int] | Tensor,
    ks: Sequence[int] = (1, 5, 10),
    sim_t2i: Tensor | None = None,
) -> dict[str, float]:
    """Recall@K for text and image retrieval with the Karpathy any-caption convention.

    Args:
        sim_i2t: ``[n_images, n_texts]`` scores used to rank texts for each image (higher is better).
        text_to_image: For each text, the index of its image (``n_texts`` entries, values in
            ``[0, n_images)``); several texts may share an image.
        ks: The cut-offs K.
        sim_t2i: ``[n_texts, n_images]`` scores used to rank images for each text. Defaults to
            ``sim_i2t.T``; pass it when the two directions were scored separately, e.g. the two
            matrices returned by :func:`rerank_with_itm`.

    Returns:
        ``txt_r{K}`` and ``img_r{K}`` for each K, ``txt_r_mean``, ``img_r_mean`` and ``r_mean``,
        all fractions in [0, 1].

    Raises:
        InputError: On shape mismatches, out-of-range image indices, NaN scores, an image with no
            text, or invalid ``ks``.
    """
    _check_matrix("sim_i2t", sim_i2t)
    ks = _check_ks(ks)
    n_images, n_texts = sim_i2t.shape
    if sim_t2i is None:
        sim_t2i = sim_i2t.T
    else:
        _check_matrix("sim_t2i", sim_t2i)
        if tuple(sim_t2i.shape) != (n_texts, n_images):
            raise InputError(f"sim_t2i must have shape {(n_texts, n_images)}, got {tuple(sim_t2i.shape)}")
    owner = torch.as_tensor(text_to_image, dtype=torch.long, device=sim_i2t.device).reshape(-1)
    if owner.numel() != n_texts:
        raise InputError(f"text_to_image has {owner.numel()} entries but there are {n_texts} texts")
    if bool(((owner < 0) | (owner >= n_images)).any()):
        raise InputError(f"text_to_image values must lie in [0, {n_images})")
    captions_per_image = torch.bincount(owner, minlength=n_images)
    if bool((captions_per_image == 0).any()):
        missing = torch.nonzero(captions_per_image == 0).flatten()[:5].tolist()
        raise InputError(f"images {missing} have no text in text_to_image; every image needs at least one")

    # Image -> text: rank of the best-ranked caption of each image.
    txt_ranks = []
    for start in range(0, n_images, _ROW_CHUNK):
        rows = torch.arange(start, min(start + _ROW_CHUNK, n_images), device=sim_i2t.device)
        positive = owner.unsqueeze(0) == rows.unsqueeze(1)
        txt_ranks.append(_ranks_of_targets(sim_i2t[rows], positive))
    txt_rank = torch.cat(txt_ranks)

    # Text -> image: rank of each caption's own image.
    owner_t2i = owner.to(sim_t2i.device)
    img_ranks = []
    for start in range(0, n_texts, _ROW_CHUNK):
        rows = torch.arange(start, min(start + _ROW_CHUNK, n_texts), device=sim_t2i.device)
        positive = torch.zeros(len(rows), n_images, dtype=torch.bool, device=sim_t2i.device)
        positive[torch.arange(len(rows), device=sim_t2i.device), owner_t2i[rows]] = True
        img_ranks.append(_ranks_of_targets(sim_t2i[rows], positive))
    img_rank = torch.cat(img_ranks)

    result: dict[str, float] = {}
    for k in ks:
        result[f"txt_r{k}"] = (txt_rank < k).double().mean().item()
    for k in ks:
        result[f"img_r{k}"] = (img_rank < k).double().mean().item()
    result["txt_r_mean"] = sum(result[f"txt_r{k}"] for k in ks) / len(ks)
    result["img_r_mean"] = sum(result[f"img_r{k}"] for k in ks) / len(ks)
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result


def rerank_with_itm(
    itc_sim: Tensor,
    itm_score_fn: Callable[[list[int], list[int]], Tensor],
    k: int = 128,
    batch_size: int = 64,
    *,
    k_t2i: int | None = None,
    on_pairs: Callable[[int], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Re-score each query's top-k ITC candidates with ``itm_logit + itc_similarity``.

    For every image, its ``min(k, n_texts)`` most ITC-similar texts are shortlisted; for every text,
    its ``min(k, n_images)`` most similar images. Each shortlisted pair gets the score
    ``itm_score_fn(image, text) + itc_sim[image, text]``; every other entry is ``-inf``. A pair
    shortlisted in both directions is scored by ``itm_score_fn`` only once. Pairs are sent to
    ``itm_score_fn`` sorted by image index (so consecutive calls mostly share images), at most
    ``batch_size`` pairs per call, under ``torch.no_grad()``.

    Args:
        itc_sim: ``[n_images, n_texts]`` ITC similarities (BLIP-2: max over queries of the cosine
            similarities, before the temperature).
        itm_score_fn: Called as ``itm_score_fn(image_indices, text_indices)`` with two equally long
            lists of ints; returns a tensor of that many ITM scores (BLIP-2: the positive-class
            logit averaged over the query outputs).
        k: Candidates per query (the paper uses 128); clipped to the number of candidates. With ``k_t2i``
            set, this is the shortlist of image queries (texts per image) only.
        batch_size: Maximum number of pairs per ``itm_score_fn`` call.
        k_t2i: Images shortlisted per text query (default: ``k``).
        on_pairs: Called once, before scoring, with the number of distinct pairs to score (e.g. to size a
            progress bar).

    Returns:
        ``(scores_i2t, scores_t2i)`` with shapes ``[n_images, n_texts]`` and ``[n_texts, n_images]``,
        float (at least float32), on ``itc_sim``'s device; feed both to :func:`recall_at_k`
        (``recall_at_k(scores_i2t, text_to_image, sim_t2i=scores_t2i)``).

    Raises:
        InputError: On a bad ``itc_sim``, ``k`` or ``batch_size``, or if ``itm_score_fn`` returns the
            wrong number of scores.
    """
    _check_matrix("itc_sim", itc_sim)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if k_t2i is None:
        k_t2i = k
    if isinstance(k_t2i, bool) or not isinstance(k_t2i, int) or k_t2i < 1:
        raise InputError(f"k_t2i must be a positive integer, got {k_t2i!r}")
    n_images, n_texts = itc_sim.shape
    device = itc_sim.device
    dtype = torch.promote_types(itc_sim.dtype, torch.float32)
    sim = itc_sim.to(dtype)

    k_texts = min(k, n_texts)
    k_images = min(k_t2i, n_images)
    top_texts = sim.topk(k_texts, dim=1).indices  # [n_images, k_texts]
    top_images = sim.T.topk(k_images, dim=1).indices  # [n_texts, k_images]

    i2t_image = torch.arange(n_images, device=device).repeat_interleave(k_texts)
    i2t_text = top_texts.reshape(-1)
    t2i_text = torch.arange(n_texts, device=device).repeat_interleave(k_images)
    t2i_image = top_images.reshape(-1)

    # Score each distinct pair once; keys sort by image, then text.
    keys = torch.cat([i2t_image * n_texts + i2t_text, t2i_image * n_texts + t2i_text])
    unique_keys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    pair_image = (unique_keys // n_texts).tolist()
    pair_text = (unique_keys % n_texts).tolist()
    if on_pairs is not None:
        on_pairs(len(pair_image))

    itm_chunks = []
    with torch.no_grad():
        for start in range(0, len(pair_image), batch_size):
            images = pair_image[start : start + batch_size]
            texts = pair_text[start : start + batch_size]
            scores = itm_score_fn(images, texts)
            scores = torch.as_tensor(scores).reshape(-1)
            if scores.numel() != len(images):
                raise InputError(f"itm_score_fn returned {scores.numel()} scores for {len(images)} pairs")
            itm_chunks.append(scores.to(device=device, dtype=dtype))
    itm = torch.cat(itm_chunks)[inverse]
    itm_i2t, itm_t2i = itm[: i2t_image.numel()], itm[i2t_image.numel() :]

    scores_i2t = torch.full((n_images, n_texts), float("-inf"), dtype=dtype, device=device)
    scores_i2t[i2t_image, i2t_text] = itm_i2t + sim[i2t_image, i2t_text]
    scores_t2i = torch.full((n_texts, n_images), float("-inf"), dtype=dtype, device=device)
    scores_t2i[t2i_text, t2i_image] = itm_t2i + sim[t2i_image, t2i_text]
    return scores_i2t, scores_t2i


def zero_shot_accuracy(image_class_sim: Tensor, labels: Tensor | Sequence[int], ks: Sequence[int] = (1, 5)) -> dict:
    """Zero-shot classification accuracy from image-to-class-prompt similarities.

    Args:
        image_class_sim: ``[n_images, n_classes]`` scores (higher is better).
        labels: ``[n_images]`` true class indices.
        ks: Top-K cut-offs; a K larger than ``n_classes`` is clipped (and scores 1.0).

    Returns:
        ``{"top1": float, "top5": float, "count": int}`` (one ``top{K}`` per K), fractions in [0, 1].
        Ties are broken by sorted order (class index), as in :func:`recall_at_k`.

    Raises:
        InputError: On shape mismatches, out-of-range labels, NaN scores or invalid ``ks``.
    """
    _check_matrix("image_class_sim", image_class_sim)
    ks = _check_ks(ks)
    n_images, n_classes = image_class_sim.shape
    target = torch.as_tensor(labels, dtype=torch.long, device=image_class_sim.device).reshape(-1)
    if target.numel() != n_images:
        raise InputError(f"labels has {target.numel()} entries but there are {n_images} images")
    if bool(((target < 0) | (target >= n_classes)).any()):
        raise InputError(f"labels must lie in [0, {n_classes})")
    ranks = []
    for start in range(0, n_images, _ROW_CHUNK):
        rows = torch.arange(start, min(start + _ROW_CHUNK, n_images), device=image_class_sim.device)
        positive = torch.zeros(len(rows), n_classes, dtype=torch.bool, device=image_class_sim.device)
        positive[torch.arange(len(rows), device=image_class_sim.device), target[rows]] = True
        ranks.append(_ranks_of_targets(image_class_sim[rows], positive))
    rank = torch.cat(ranks)
    result: dict = {f"top{k}": (rank < min(k, n_classes)).double().mean().item() for k in ks}
    result["count"] = n_images
    return result
