"""The image index's SQLite store: one row per image (path, mtime, size, content hash, its Q ITC vectors).

SQLite is the source of truth; the FAISS file beside it is derived from it and rebuilt when the rows change.
Every build batch is one transaction, so a killed build keeps every batch it finished and loses none of the
store's consistency (WAL journal). ``generation`` counts committed changes; the FAISS file records the generation
it was built from, so a FAISS file that lags behind the rows is detected instead of silently searched.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlbridge.errors import InputError

DB_NAME = "index.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,          -- relative to the collection root, '/'-separated
    mtime_ns INTEGER NOT NULL,
    size INTEGER NOT NULL,
    hash TEXT NOT NULL,                 -- vlbridge.utils.io.file_digest(full=True)
    vectors BLOB NOT NULL               -- float32 [Q, E], little-endian
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class ImageRow:
    """One indexed image (without its vectors)."""

    id: int
    path: str
    mtime_ns: int
    size: int
    hash: str


class IndexStore:
    """The rows of an image index. Open it with ``IndexStore(directory)``; ``create=True`` makes a new one."""

    def __init__(self, directory: str | os.PathLike, *, create: bool = False) -> None:
        self.directory = Path(directory)
        path = self.directory / DB_NAME
        if not path.exists():
            if not create:
                raise InputError(
                    f"{self.directory} is not an image index (no {DB_NAME}): build one with 'vlbridge index build'"
                )
            self.directory.mkdir(parents=True, exist_ok=True)
        # check_same_thread=False: the service reads from its model worker; every write happens in one thread.
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        version = self.get_meta("schema_version")
        if version is None:
            self.set_meta("schema_version", SCHEMA_VERSION)
        elif version != SCHEMA_VERSION:
            raise InputError(f"{path}: index schema version {version}, this vlbridge reads {SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------------------------------------ meta
    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    @property
    def generation(self) -> int:
        return int(self.get_meta("generation", 0))

    # ------------------------------------------------------------------------------------------------ writes
    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic change of the rows; bumps ``generation`` with it."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.set_meta("generation", self.generation + 1)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def upsert(self, path: str, mtime_ns: int, size: int, digest: str, vectors: np.ndarray) -> None:
        """Insert a new image or replace a changed one's vectors (keeping its id). Call inside a transaction."""
        blob = np.ascontiguousarray(vectors, dtype="<f4").tobytes()
        self.db.execute(
            "INSERT INTO images (path, mtime_ns, size, hash, vectors) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(path) DO UPDATE SET mtime_ns=excluded.mtime_ns, size=excluded.size, hash=excluded.hash, "
            "vectors=excluded.vectors",
            (path, mtime_ns, size, digest, blob),
        )

    def touch(self, path: str, mtime_ns: int, size: int) -> None:
        """Record a new mtime for a file whose content did not change. Call inside a transaction."""
        self.db.execute("UPDATE images SET mtime_ns = ?, size = ? WHERE path = ?", (mtime_ns, size, path))

    def delete(self, paths: Iterable[str]) -> None:
        """Drop images. Call inside a transaction."""
        self.db.executemany("DELETE FROM images WHERE path = ?", [(p,) for p in paths])

    # ------------------------------------------------------------------------------------------------ reads
    def rows(self) -> dict[str, ImageRow]:
        """Every image, by path."""
        cur = self.db.execute("SELECT id, path, mtime_ns, size, hash FROM images")
        return {r[1]: ImageRow(*r) for r in cur}

    def row(self, image_id: int) -> ImageRow | None:
        r = self.db.execute("SELECT id, path, mtime_ns, size, hash FROM images WHERE id = ?", (image_id,)).fetchone()
        return None if r is None else ImageRow(*r)

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def vectors(self, queries: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """All vectors [n * Q, E] float32 and their FAISS ids ``image_id * Q + q`` [n * Q]."""
        n = self.count()
        out = np.empty((n * queries, dim), dtype=np.float32)
        ids = np.empty(n * queries, dtype=np.int64)
        cur = self.db.execute("SELECT id, vectors FROM images ORDER BY id")
        row = -1
        for row, (image_id, blob) in enumerate(cur):
            block = np.frombuffer(blob, dtype="<f4")
            if block.size != queries * dim:
                raise InputError(f"index row {image_id} holds {block.size} numbers, expected {queries} x {dim}")
            out[row * queries : (row + 1) * queries] = block.reshape(queries, dim)
            ids[row * queries : (row + 1) * queries] = image_id * queries + np.arange(queries)
        if row + 1 != n:  # rows changed while reading
            out, ids = out[: (row + 1) * queries], ids[: (row + 1) * queries]
        return out, ids
