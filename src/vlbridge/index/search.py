"""Search an image index: a text or an image query -> ITC shortlist from FAISS -> optional ITM re-rank.

The same :class:`ImageIndex` serves ``vlbridge index search``, the service's ``/v1/search`` and the web page.

- A text query is one ITC vector; an image scores it by its best query vector (as ``Blip2.itc``).
- An image query is Q vectors; an image scores it by the best pair of vectors.
- ``rerank=True`` (text queries) re-scores the ``shortlist`` best ITC images with the ITM head and orders them by
  the match probability (ITC breaking ties); the rest of the ranking is dropped, as in BLIP-2's evaluation.

Results name images by their index id and their path relative to the collection; paths come only from the index,
never from a request.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vlbridge.errors import InputError
from vlbridge.index.ann import AnnSettings, read_ann, search_images
from vlbridge.index.build import ANN_NAME, check_fingerprint
from vlbridge.index.store import IndexStore

if TYPE_CHECKING:
    from vlbridge.models.vlm import VisionLanguageModel

DEFAULT_SHORTLIST = 32  # ITC candidates re-scored by ITM


@dataclass
class SearchHit:
    """One result. ``score`` orders the results: ``itm`` when re-ranked, else ``itc``."""

    id: int
    path: str
    score: float
    itc: float
    itm: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ImageIndex:
    """An index built by :func:`vlbridge.index.build_index`, opened for searching with the model that built it.

    Example:
        index = ImageIndex("photos.index", vlbridge.load("my-stage1-model"))
        for hit in index.search("a red circle", k=5, rerank=True):  # or index.search(image="query.jpg")
            print(hit.score, hit.path)
    """

    def __init__(
        self, directory: str | os.PathLike, model: VisionLanguageModel, *, ann: AnnSettings | None = None
    ) -> None:
        self.directory = Path(directory).expanduser()
        self.store = IndexStore(self.directory)
        self.model = model
        self.ann_settings = ann or AnnSettings()
        if self.store.get_meta("fingerprint") is None:
            raise InputError(f"{self.directory}: the index is empty (its build never finished a batch)")
        check_fingerprint(self.store, model)
        ann_path = self.directory / ANN_NAME
        if not ann_path.exists() or self.store.get_meta("ann_generation") != self.store.generation:
            raise InputError(f"{self.directory}: the index build did not finish; run 'vlbridge index build' again")
        self.ann = read_ann(ann_path)
        self.root = Path(self.store.get_meta("root"))
        self.queries = int(self.store.get_meta("queries"))

    @classmethod
    def open(cls, directory: str | os.PathLike, model: VisionLanguageModel | None = None, **kwargs: Any) -> ImageIndex:
        """Open an index; without ``model``, load the one recorded at build time (``model_source``)."""
        if model is None:
            store = IndexStore(directory)
            source = store.get_meta("model")
            store.close()
            if not source:
                raise InputError(f"{directory}: the index does not record its model; pass the model that built it")
            from vlbridge.cli import load_model

            model = load_model(source)
        return cls(directory, model, **kwargs)

    def __len__(self) -> int:
        return self.store.count()

    def close(self) -> None:
        self.store.close()

    # ------------------------------------------------------------------------------------------------ search
    def search(
        self,
        text: str | None = None,
        *,
        image: Any = None,
        k: int = 10,
        rerank: bool = False,
        shortlist: int = DEFAULT_SHORTLIST,
    ) -> list[SearchHit]:
        """The ``k`` best images for a text, or for an image (path, PIL image, pixel tensor): give one of the two.

        Args:
            text: A non-empty search text.
            image: An image to search by instead.
            k: How many results.
            rerank: Re-score a text query's ITC shortlist with ITM.
            shortlist: ITC candidates re-scored when re-ranking (at least ``k``).

        Raises:
            InputError: Neither or both queries, an empty text, ``k`` < 1, or ``rerank`` with an image query.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        if (text is None) == (image is None):
            raise InputError("search needs either a text or an image (not both)")
        if text is not None and (not isinstance(text, str) or not text.strip()):
            raise InputError(f"the search text must be a non-empty string, got {text!r}")
        if rerank and text is None:
            raise InputError("re-ranking (ITM) needs a text query; search by image without it")
        if text is not None:
            vectors = self.model.embed_texts([text]).numpy()  # [1, E]
        else:
            vectors = self.model.embed_images([image]).numpy()[0]  # [Q, E]
        wanted = max(k, shortlist) if rerank else k
        hits = self.search_vectors(vectors, wanted)
        if rerank:
            hits = self._rerank(text, hits)
        return hits[:k]

    def search_vectors(self, vectors: np.ndarray, k: int) -> list[SearchHit]:
        """The ``k`` best images for query vectors [M, E] already in the index's embedding space."""
        if len(self) == 0:
            return []
        ranked = search_images(self.ann, vectors, k, self.queries, self.ann_settings)
        hits = []
        for image_id, score in ranked:
            row = self.store.row(image_id)
            if row is not None:  # None: dropped since the FAISS file was written (never, within one build)
                hits.append(SearchHit(id=image_id, path=row.path, score=float(score), itc=float(score)))
        return hits

    def _rerank(self, text: str, hits: list[SearchHit]) -> list[SearchHit]:
        present = [h for h in hits if self.path(h.id) is not None]  # a file deleted since indexing is left out
        if not present:
            return []
        probs = self.model.itm([str(self.path(h.id)) for h in present], [text] * len(present))
        for hit, p in zip(present, probs):
            hit.itm = float(p)
            hit.score = float(p)
        return sorted(present, key=lambda h: (-h.score, -h.itc, h.id))

    # ------------------------------------------------------------------------------------------------ files
    def path(self, image_id: int) -> Path | None:
        """The file of an indexed image, or None if the id is unknown or the file is gone."""
        row = self.store.row(int(image_id))
        if row is None:
            return None
        path = self.root / row.path
        return path if path.is_file() else None
