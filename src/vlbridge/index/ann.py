"""FAISS over BLIP-2's multi-vector image embeddings: choose an index kind by size, build it, search it.

Every image is Q vectors (one per query token), stored under the FAISS id ``image_id * Q + q``. An image's score
for a query vector is its best vector's inner product (the cosine, as ITC scores it); a query of several vectors
(an image query) takes the best over all pairs. Searching the top ``k * Q`` vectors is enough to find the exact top
``k`` images with an exact index: ahead of the k-th best image's best vector there are at most ``(k - 1) * Q``
vectors of better images.

The choice of kind follows autofaiss / clip-retrieval: exact ``flat`` search while it is cheap, an inverted file
(``ivf``, k-means cells, ``nprobe`` of them searched) beyond; ``hnsw`` (a graph, no training) on request.

Shapes: M query vectors, K results, E embedding width, Q vectors per image.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlbridge.errors import InputError
from vlbridge.utils.io import atomic_file, storage_error

KINDS = ("auto", "flat", "ivf", "hnsw")
FLAT_MAX_VECTORS = 100_000  # exact search below this: ~25 ms per query at E=256 on one core, no training
IVF_TRAIN_POINTS_PER_CELL = 40  # k-means sample per cell (FAISS warns below 39)
HNSW_NEIGHBOURS = 32


def faiss_module() -> Any:
    """``import faiss``, or an install hint."""
    try:
        import faiss
    except ImportError:
        raise InputError("the image index needs faiss: pip install 'vlbridge[serve]' (or faiss-cpu)") from None
    return faiss


@dataclass
class AnnSettings:
    """How an index is built and searched.

    Attributes:
        kind: ``auto`` (flat below ``flat_max_vectors``, else ivf), ``flat``, ``ivf`` or ``hnsw``.
        flat_max_vectors: The size where ``auto`` leaves exact search.
        nlist: IVF cells; None: ``4 * sqrt(n_vectors)`` (autofaiss's rule), at most one per 40 vectors.
        nprobe: IVF cells searched per query; None: ``max(16, nlist // 16)``.
        ef_search: HNSW candidate list while searching (raised to the number of results asked for).
    """

    kind: str = "auto"
    flat_max_vectors: int = FLAT_MAX_VECTORS
    nlist: int | None = None
    nprobe: int | None = None
    ef_search: int = 128

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"unknown index kind {self.kind!r}: use one of {', '.join(KINDS)}")

    def resolve(self, n_vectors: int) -> str:
        """The kind used for ``n_vectors``."""
        if self.kind != "auto":
            return self.kind
        return "flat" if n_vectors < self.flat_max_vectors else "ivf"

    def cells(self, n_vectors: int) -> int:
        """IVF cells for ``n_vectors``: ``nlist`` as given (at most one per vector), else autofaiss's rule."""
        if self.nlist is not None:
            return max(1, min(self.nlist, n_vectors))
        return max(1, min(int(4 * math.sqrt(n_vectors)), n_vectors // IVF_TRAIN_POINTS_PER_CELL))


def build_ann(vectors: np.ndarray, ids: np.ndarray, settings: AnnSettings | None = None, *, seed: int = 0) -> Any:
    """A FAISS inner-product index over ``vectors`` [n, E] (float32, L2-normalised) with int64 ``ids`` [n]."""
    faiss = faiss_module()
    settings = settings or AnnSettings()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    n, dim = vectors.shape
    kind = settings.resolve(n)
    if kind == "ivf" and n == 0:
        kind = "flat"  # nothing to train the cells on
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif kind == "hnsw":
        index = faiss.IndexIDMap2(faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT))
    else:
        nlist = settings.cells(n)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        sample = np.random.default_rng(seed).permutation(n)[: nlist * 64]
        index.train(vectors[sample])
        index.nprobe = settings.nprobe or max(16, nlist // 16)
    if n:
        index.add_with_ids(vectors, ids)
    return index


def describe(index: Any) -> dict[str, Any]:
    """Kind and parameters of a built index (for metadata and benchmark output)."""
    faiss = faiss_module()
    ivf = _ivf(index)
    if ivf is not None:
        return {"kind": "ivf", "nlist": int(ivf.nlist), "nprobe": int(ivf.nprobe), "vectors": int(index.ntotal)}
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    kind = "hnsw" if isinstance(inner, faiss.IndexHNSW) else "flat"
    return {"kind": kind, "vectors": int(index.ntotal)}


def _ivf(index: Any) -> Any:
    faiss = faiss_module()
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def search_vectors(index: Any, queries: np.ndarray, k: int, settings: AnnSettings | None = None) -> tuple:
    """Top-``k`` stored vectors for each query vector: (scores [M, k], ids [M, k]; id -1 where fewer exist)."""
    faiss = faiss_module()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = max(1, min(k, int(index.ntotal)))
    params = None
    ivf = _ivf(index)
    if ivf is not None and settings is not None and settings.nprobe:
        params = faiss.SearchParametersIVF(nprobe=settings.nprobe)
    elif isinstance(index, faiss.IndexIDMap2):
        inner = faiss.downcast_index(index.index)
        if isinstance(inner, faiss.IndexHNSW):
            ef = max(k, settings.ef_search if settings else 128)
            params = faiss.SearchParametersHNSW(efSearch=ef)
    return index.search(queries, k, params=params)


def best_per_image(scores: np.ndarray, ids: np.ndarray, queries_per_image: int, k: int) -> list[tuple[int, float]]:
    """Vector hits -> the ``k`` best images ``[(image_id, score)]``, each scored by its best vector over all queries."""
    best: dict[int, float] = {}
    for score, vector_id in zip(scores.ravel().tolist(), ids.ravel().tolist()):
        if vector_id < 0:
            continue
        image = vector_id // queries_per_image
        if score > best.get(image, -math.inf):
            best[image] = score
    ranked = sorted(best.items(), key=lambda item: (-item[1], item[0]))
    return ranked[:k]


def search_images(
    index: Any, queries: np.ndarray, k: int, queries_per_image: int, settings: AnnSettings | None = None
) -> list[tuple[int, float]]:
    """The ``k`` best images for a query of one or more vectors [M, E] (max over query and image vectors)."""
    scores, ids = search_vectors(index, queries, k * queries_per_image, settings)
    return best_per_image(scores, ids, queries_per_image, k)


def write_ann(index: Any, path: str | os.PathLike) -> None:
    """Write an index atomically (a temporary file beside it, then renamed over it)."""
    faiss = faiss_module()
    path = Path(path)
    try:
        with atomic_file(path) as tmp:
            faiss.write_index(index, str(tmp))
    except RuntimeError as exc:  # FAISS reports I/O failures as RuntimeError
        raise storage_error(OSError(str(exc)), path) from exc


def read_ann(path: str | os.PathLike, *, mmap: bool = True) -> Any:
    """Read an index written by :func:`write_ann`, memory-mapped where FAISS can (flat and IVF lists)."""
    faiss = faiss_module()
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError:
        return faiss.read_index(str(path))  # kinds that cannot be mapped are read into memory
