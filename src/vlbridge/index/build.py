"""``vlbridge index build``: embed a folder of images into a searchable index, resumably and incrementally.

1. Scan the folder (recursively; hidden entries and the index's own folder skipped) for image files.
2. Compare with the store: a file whose size and mtime are unchanged is kept; one whose stat changed is hashed,
   and re-embedded only if its content changed; a file no longer there is dropped; a new file is added.
3. Embed what is new or changed in batches (``Blip2.embed_images``: Q vectors per image), one SQLite transaction
   per batch, so a killed build resumes where it stopped: the finished batches are unchanged files next time.
4. Rebuild the FAISS file from the store (flat or IVF by size, see :mod:`vlbridge.index.ann`).

The store records the model's fingerprint (its ITC embedding of a fixed probe text): adding images embedded by
another model to an index would make scores meaningless, so that is refused.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlbridge.errors import ImageError, InputError
from vlbridge.eval.progress import progress_bar
from vlbridge.index.ann import AnnSettings, build_ann, describe, write_ann
from vlbridge.index.store import IndexStore
from vlbridge.utils.io import file_digest

if TYPE_CHECKING:
    from vlbridge.models.vlm import VisionLanguageModel

ANN_NAME = "vectors.faiss"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
PROBE_TEXT = "a photo"  # the fingerprint text: its embedding identifies the model that built an index
FINGERPRINT_TOLERANCE = 1e-3


@dataclass
class BuildReport:
    """What a build did. ``skipped`` lists ``(path, reason)`` of files that are not usable images."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    images: int = 0
    ann: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fingerprint(model: VisionLanguageModel) -> list[float]:
    """The model's ITC embedding of :data:`PROBE_TEXT` (rounded), which tells models apart."""
    return [round(float(x), 5) for x in model.embed_texts([PROBE_TEXT])[0]]


def check_fingerprint(store: IndexStore, model: VisionLanguageModel) -> None:
    """Refuse a model whose embeddings are not those the index was built with."""
    recorded = store.get_meta("fingerprint")
    if recorded is None:
        return
    ours = fingerprint(model)
    if len(ours) != len(recorded) or max(abs(a - b) for a, b in zip(ours, recorded)) > FINGERPRINT_TOLERANCE:
        raise InputError(
            f"the index in {store.directory} was built with another model ({store.get_meta('model')}): its "
            "embeddings cannot be compared with this model's; use that model, or build a new index with --out"
        )


def scan_images(root: Path, *, exclude: Path | None = None) -> list[str]:
    """Image files under ``root``, as sorted '/'-separated relative paths (hidden entries skipped)."""
    found = []
    exclude = exclude.resolve() if exclude is not None else None
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() != exclude)
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append((here / name).relative_to(root).as_posix())
    return sorted(found)


def _model_shape(model: VisionLanguageModel) -> tuple[int, int]:
    """(Q vectors per image, E width) of the model's ITC image embeddings, from embedding one blank image."""
    from PIL import Image

    q, e = model.embed_images([Image.new("RGB", (16, 16))]).shape[1:]
    return int(q), int(e)


def build_index(
    images_dir: str | os.PathLike,
    model: VisionLanguageModel,
    out: str | os.PathLike,
    *,
    model_source: str | None = None,
    batch_size: int = 16,
    ann: AnnSettings | None = None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> BuildReport:
    """Build or update the index of a folder of images.

    Args:
        images_dir: The collection; every image file below it (recursively) is indexed.
        model: A model with ITC heads; the same model must search the index.
        out: The index folder (created if missing; an existing index is updated in place).
        model_source: How to load ``model`` again (recorded so that ``vlbridge serve --index`` can find it).
        batch_size: Images per embedding batch and per committed transaction.
        ann: Index kind and parameters (default: flat below 100k vectors, IVF above).
        progress: A progress bar (tqdm on a terminal) on stderr.
        on_batch: Called after each committed batch with the number of files processed so far (for tests and
            callers that report progress themselves).

    Returns:
        The :class:`BuildReport`.

    Raises:
        InputError: ``images_dir`` is not a folder, the model has no ITC heads, or the index was built with
            another model.
    """
    start = time.perf_counter()
    root = Path(images_dir).expanduser().resolve()
    if not root.is_dir():
        raise InputError(f"{images_dir}: not a folder of images")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    queries, dim = _model_shape(model)
    out = Path(out).expanduser()
    store = IndexStore(out, create=True)
    try:
        check_fingerprint(store, model)
        recorded_root = store.get_meta("root")
        if recorded_root is not None and recorded_root != str(root):
            raise InputError(f"the index in {out} is of {recorded_root}, not {root}: use another --out")
        if store.get_meta("fingerprint") is None:
            with store.transaction():
                store.set_meta("fingerprint", fingerprint(model))
                store.set_meta("model", model_source)
                store.set_meta("root", str(root))
                store.set_meta("queries", queries)
                store.set_meta("dim", dim)
        report = BuildReport()
        todo = _plan(root, store, out, report)
        _embed(root, store, model, todo, batch_size, progress, on_batch, report)
        report.images = store.count()
        if store.get_meta("ann_generation") != store.generation or not (out / ANN_NAME).exists():
            vectors, ids = store.vectors(queries, dim)
            index = build_ann(vectors, ids, ann)
            write_ann(index, out / ANN_NAME)
            report.ann = describe(index)
            with store.transaction():
                store.set_meta("ann", report.ann)
            store.set_meta("ann_generation", store.generation)  # the generation the file was built from
        else:
            report.ann = store.get_meta("ann", {})
        report.seconds = round(time.perf_counter() - start, 3)
        return report
    finally:
        store.close()


def _plan(root: Path, store: IndexStore, out: Path, report: BuildReport) -> list[tuple[str, os.stat_result]]:
    """Drop deleted files, note unchanged ones; return the files to embed."""
    on_disk = scan_images(root, exclude=out)
    rows = store.rows()
    gone = sorted(set(rows) - set(on_disk))
    if gone:
        with store.transaction():
            store.delete(gone)
        report.deleted = len(gone)
    todo = []
    touched = []
    for rel in on_disk:
        try:
            stat = (root / rel).stat()
        except OSError as exc:
            report.skipped.append((rel, exc.strerror or str(exc)))
            continue
        row = rows.get(rel)
        if row is not None and row.mtime_ns == stat.st_mtime_ns and row.size == stat.st_size:
            report.unchanged += 1
        elif row is not None and row.size == stat.st_size and row.hash == file_digest(root / rel, full=True):
            touched.append((rel, stat))  # same content, new mtime (copied, touched)
            report.unchanged += 1
        else:
            todo.append((rel, stat))
    if touched:
        with store.transaction():
            for rel, stat in touched:
                store.touch(rel, stat.st_mtime_ns, stat.st_size)
    return todo


def _embed(
    root: Path,
    store: IndexStore,
    model: VisionLanguageModel,
    todo: Sequence[tuple[str, os.stat_result]],
    batch_size: int,
    progress: bool,
    on_batch: Callable[[int], None] | None,
    report: BuildReport,
) -> None:
    from vlbridge.data.images import load_image

    known = set(store.rows())
    done = 0
    with progress_bar(len(todo), "indexing", "img", progress) as bar:
        for first in range(0, len(todo), batch_size):
            batch = todo[first : first + batch_size]
            loaded = []
            for rel, stat in batch:
                try:
                    loaded.append((rel, stat, load_image(root / rel)))
                except ImageError as exc:
                    report.skipped.append((rel, str(exc)))
            if loaded:
                vectors = model.embed_images([image for _, _, image in loaded], batch_size=batch_size).numpy()
                with store.transaction():
                    for (rel, stat, _), v in zip(loaded, vectors):
                        store.upsert(rel, stat.st_mtime_ns, stat.st_size, file_digest(root / rel, full=True), v)
                for rel, _, _ in loaded:
                    if rel in known:
                        report.updated += 1
                    else:
                        report.added += 1
            done += len(batch)
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(done)
