"""utils.io: the atomic file writer and the JSONL reader every module shares."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlbridge.errors import InputError, StorageError
from vlbridge.utils.io import atomic_file, iter_jsonl, read_jsonl, replace_dir, write_bytes, write_text


def test_atomic_file_replaces_whole_and_leaves_nothing_behind(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    write_text(path, "old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_file_in_a_missing_folder_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="missing"):
        write_text(tmp_path / "missing" / "a.txt", "x")


def test_replace_dir_swaps_in_the_new_folder(tmp_path: Path) -> None:
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "f").write_text("new")
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "old").write_text("old")
    replace_dir(tmp_path / "new", tmp_path / "target")
    assert [p.name for p in tmp_path.iterdir()] == ["target"]
    assert [p.name for p in (tmp_path / "target").iterdir()] == ["f"]


def test_read_jsonl_skips_blank_lines_and_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('\ufeff{"a": 1}\n\n{"b": "x\u2028y"}\n', encoding="utf-8")
    assert read_jsonl(path) == [{"a": 1}, {"b": "x\u2028y"}]
    assert [n for n, _ in iter_jsonl(path)] == [1, 3]
    path.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(InputError, match=r"m\.jsonl:2: invalid JSON"):
        read_jsonl(path)
    path.write_text("[1]\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"m\.jsonl:1: expected a JSON object, got list"):
        read_jsonl(path)
    path.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(InputError, match="not UTF-8"):
        read_jsonl(path)
    with pytest.raises(InputError, match="cannot read"):
        read_jsonl(tmp_path / "absent.jsonl")
