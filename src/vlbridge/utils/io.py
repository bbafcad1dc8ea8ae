"""Files that are either fully written or not there at all, JSON that stays JSON, and file checksums.

- :func:`atomic_dir` writes a folder through a temporary sibling and swaps it in with one atomic
  ``renameat2(RENAME_EXCHANGE)`` where the OS has it, so the target never goes missing, not even for an instant;
  elsewhere two renames, and :func:`recover_dir` puts the previous version back if a crash fell between them.
  :func:`replace_dir` is that swap alone, for a folder already written beside its target.
- :func:`atomic_file`: a temporary file in the same folder, fsync, ``os.replace``; :func:`write_text`,
  :func:`write_bytes` and :func:`write_json` write through it. :func:`finite` turns NaN / inf into None first,
  because ``json.dumps`` would write ``NaN``, which is not JSON.
- :func:`read_jsonl`: the records of a JSON Lines file, an error naming the file and line for a bad one.
- :func:`file_digest`: a cheap digest (size + a few sampled blocks) checked every time a file is opened, and a full
  one (every byte, ~4 GB/s) checked on demand.

Write failures (full disk, read-only folder, a file where a folder should be) become :class:`StorageError`, one
line naming the path.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from vlbridge.errors import InputError, StorageError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100

try:  # glibc >= 2.28; elsewhere the two-rename fallback (and recover_dir) is used
    _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
except (AttributeError, OSError):  # pragma: no cover - depends on the C library
    _renameat2 = None


def storage_error(exc: BaseException, path: str | os.PathLike, what: str = "write") -> StorageError:
    """A one-line :class:`StorageError` for an OSError (or a safetensors write error) at ``path``."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
    err = StorageError(f"cannot {what} {path}: {reason}")
    if isinstance(exc, OSError):
        err.errno = exc.errno
    return err


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the OS cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _backup(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def recover_dir(target: str | os.PathLike) -> bool:
    """Put back the previous version of an :func:`atomic_dir` target that a crash left missing; True if it did."""
    target = Path(target)
    backup = _backup(target)
    if not os.path.lexists(target) and backup.is_dir():
        os.rename(backup, target)
        return True
    return False


def atomic_dir(directory: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a folder atomically: ``write(tmp)`` fills a temporary sibling, which then replaces ``directory``.

    Readers see the old folder or the new one, never a mix; an exception (or Ctrl-C) leaves the old one as it was.

    Args:
        directory: The folder to (re)place.
        write: Fills the temporary folder it is given.

    Returns:
        ``directory`` as a Path.

    Raises:
        StorageError: The folder cannot be written (full disk, read-only, a file in the way).
    """
    target = Path(directory)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover_dir(target)
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a kill during an earlier write
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise storage_error(exc, target) from exc
    try:
        write(tmp)
        replace_dir(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise storage_error(exc, target) from exc
        raise
    return target


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished folder ``tmp`` (a sibling of ``target``) onto ``target``, replacing any older version.

    One atomic exchange where the OS has it (the old version is then deleted; readers that opened its files keep
    them until they close), else two renames with a backup that :func:`recover_dir` puts back after a crash.

    Raises:
        StorageError: ``target`` is something other than a folder, or a rename fails.
    """
    tmp, target = Path(tmp), Path(target)
    try:
        if target.is_dir() and not target.is_symlink() and _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old version
        elif os.path.lexists(target):
            if not target.is_dir() or target.is_symlink():
                raise StorageError(f"cannot write {target}: it exists and is not a folder")
            backup = _backup(target)
            shutil.rmtree(backup, ignore_errors=True)
            os.rename(target, backup)  # a crash here leaves the backup, which recover_dir puts back
            os.rename(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        raise storage_error(exc, target) from exc


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; when the block ends it is fsynced and renamed over ``path``.

    Readers see the old file or the new one, never part of one; an exception (or Ctrl-C) in the block deletes the
    temporary file and leaves ``path`` as it was. The file gets the mode ``open()`` would give it (umask applies).

    Raises:
        StorageError: The file cannot be written (full disk, read-only folder, a missing folder).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise storage_error(exc, path) from exc
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise storage_error(exc, path) from exc
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a binary file atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def finite(obj: Any) -> Any:
    """``obj`` with every NaN / inf float replaced by None (recursively through dicts, lists and tuples)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never writes NaN / Infinity (they become null) and stringifies unknown objects."""
    return json.dumps(finite(obj), allow_nan=False, default=str, **kwargs)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as strict JSON (see :func:`dumps`), atomically."""
    write_text(path, dumps(obj, indent=indent))


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSON Lines file (UTF-8, a BOM allowed).

    Raises:
        InputError: The file cannot be read, is not UTF-8, or a line is not a JSON object; the message names the
            file and the line (``path:line: invalid JSON (...)``).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    for lineno, line in enumerate(text.split("\n"), start=1):  # only newlines: a JSON string may hold U+2028
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The objects of a JSON Lines file, blank lines skipped; errors as in :func:`iter_jsonl`."""
    return [obj for _, obj in iter_jsonl(path)]


# ------------------------------------------------------------------------------------------------------ checksums
_ROW_WORDS = 64  # checksums view bytes as rows of 64 little-endian 8-byte words (512 bytes)
_ROW_BYTES = 8 * _ROW_WORDS
_positions_cache = np.arange(1, 2, dtype=np.uint64)


def _positions(n: int) -> np.ndarray:
    """``[1, 2, ..., n]`` as uint64 (cached: allocating it per call costs more than the sums)."""
    global _positions_cache
    if _positions_cache.size < n:
        _positions_cache = np.arange(1, max(n, 2 * _positions_cache.size) + 1, dtype=np.uint64)
    return _positions_cache[:n]


def fast_checksum(raw: np.ndarray) -> bytes:
    """Checksums of a byte array, reading every byte once at memory speed (~4 GB/s; SHA-256 does ~1 GB/s here).

    The bytes are viewed as a matrix of 8-byte words with 64 columns. The result holds the 64 column sums, the
    position-weighted sum of the row sums (``sum((r + 1) * rowsum_r)``), all mod 2**64, and the < 512 trailing
    bytes that do not fill a row. Wrapping integer sums are exact and order-free. Any changed word changes its
    column's sum; swapping two different words changes the column sums unless both are in the same column, and
    then the weighted row sum. This guards against damage and stale files, not adversaries.
    """
    n_rows = raw.size // _ROW_BYTES
    body = raw[: n_rows * _ROW_BYTES].view("<u8").reshape(n_rows, _ROW_WORDS)
    columns = body.sum(axis=0, dtype=np.uint64)
    rows = body.sum(axis=1, dtype=np.uint64)
    weighted = int((rows * _positions(n_rows)).sum(dtype=np.uint64))  # uint64 arrays wrap silently
    return columns.astype("<u8").tobytes() + weighted.to_bytes(8, "little") + raw[n_rows * _ROW_BYTES :].tobytes()


_SAMPLE_BLOCK = 4096
_SAMPLES = 16


def file_digest(path: str | os.PathLike, *, full: bool = False) -> str:
    """A hex digest of a file's size and contents.

    Args:
        path: The file.
        full: False: the size, the first and last 64 KiB and 16 evenly spaced 4 KiB blocks (milliseconds for any
            size: catches truncation, zeroing, a swapped file). True: every byte (:func:`fast_checksum` over the
            file in 64 MiB chunks).
    """
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(f"{'full' if full else 'sample'}:{size}:".encode())
    with open(path, "rb") as f:
        if not full:
            offsets = {0, max(0, size - 65536)}
            offsets |= {(size * k // (_SAMPLES + 1)) // _SAMPLE_BLOCK * _SAMPLE_BLOCK for k in range(1, _SAMPLES + 1)}
            for offset in sorted(offsets):
                f.seek(offset)
                h.update(f.read(65536 if offset in (0, max(0, size - 65536)) else _SAMPLE_BLOCK))
            return h.hexdigest()
        chunk = 64 << 20  # each chunk's checksum is hashed in turn
        while True:
            data = f.read(chunk)
            if not data:
                break
            h.update(fast_checksum(np.frombuffer(data, dtype=np.uint8)))
    return h.hexdigest()


def folder_digests(folder: str | os.PathLike, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """``{relative name: {"size", "sample", "full"}}`` for the files of a folder (all, recursively, by default)."""
    folder = Path(folder)
    if names is None:
        names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return {
        name: {
            "size": (folder / name).stat().st_size,
            "sample": file_digest(folder / name),
            "full": file_digest(folder / name, full=True),
        }
        for name in names
    }


def verify_digests(folder: str | os.PathLike, digests: dict[str, Any], *, full: bool = False) -> str | None:
    """The first problem with the files of ``folder`` against :func:`folder_digests` output, or None if intact."""
    folder = Path(folder)
    if not isinstance(digests, dict):
        return "its checksum table is not a mapping"
    for name, expected in digests.items():
        file = folder / name
        if not isinstance(expected, dict):
            return f"its checksum entry for {name} is malformed"
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected.get("size"):
            return f"{name} has {size} bytes, expected {expected.get('size')} (truncated or replaced)"
        if file_digest(file) != expected.get("sample"):
            return f"{name} does not match its checksum (corrupted)"
        if full and file_digest(file, full=True) != expected.get("full"):
            return f"{name} does not match its full checksum (corrupted)"
    return None
