"""Image search: FAISS over BLIP-2's multi-vector ITC embeddings, with an SQLite store beside it.

- :func:`build_index` (``vlbridge index build``): embed a folder, resumably and incrementally.
- :class:`ImageIndex` (``vlbridge index search``, the service's ``/v1/search``): text or image queries, ITC
  shortlist, optional ITM re-rank.
- :mod:`vlbridge.index.ann`: the FAISS part (index kind by size, max over an image's vectors).

FAISS is imported only when an index is built or opened.
"""

from vlbridge.index.ann import AnnSettings
from vlbridge.index.build import BuildReport, build_index
from vlbridge.index.search import ImageIndex, SearchHit

__all__ = ["AnnSettings", "BuildReport", "ImageIndex", "SearchHit", "build_index"]
