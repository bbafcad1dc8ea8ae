"""Webdataset tar shards as an iterable caption dataset: brace-expanded shard lists, split across ranks and
DataLoader workers, samples grouped by key, shuffled in a buffer, and unreadable members skipped like any other
bad image (`data.datasets.SkippedSample`).
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import tarfile
import urllib.request
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from vlbridge.data.datasets import SkippedSample, Transform, _AugmentedViews, _reason
from vlbridge.data.images import load_image
from vlbridge.data.transforms import augmentation_seed
from vlbridge.errors import ImageError, InputError

__all__ = ["WebDatasetShards", "expand_braces"]

logger = logging.getLogger(__name__)


_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces as webdataset does: ``"a-{000..002}.tar"`` → three names; ``{x,y}`` alternatives.

    Numeric ranges keep zero padding when an endpoint has a leading zero. Several groups expand as a product.

    Args:
        pattern: A path or URL, possibly with brace groups.

    Returns:
        The expanded names, in order.

    Raises:
        InputError: A brace group is neither ``{a..b}`` (with a <= b) nor a comma list.
    """
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = _RANGE.fullmatch(body)
    if numeric:
        lo_text, hi_text = numeric.groups()
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise InputError(f"bad brace range {{{body}}} in {pattern!r}: end is before start")
        padded = any(len(t.lstrip("-")) > 1 and t.lstrip("-").startswith("0") for t in (lo_text, hi_text))
        width = max(len(lo_text), len(hi_text)) if padded else 0
        options = [str(i).zfill(width) for i in range(lo, hi + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise InputError(f"bad brace group {{{body}}} in {pattern!r}: expected {{a..b}} or {{x,y,...}}")
    rests = expand_braces(pattern[match.end() :])
    return [pattern[: match.start()] + option + rest for option in options for rest in rests]


_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


def _split_key(name: str) -> tuple[str, str] | None:
    """``"dir/000123.seg.png"`` → ``("dir/000123", "seg.png")``; None for names without an extension or hidden."""
    directory, _, base = name.rpartition("/")
    if not base or base.startswith(".") or "." not in base:
        return None
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _local(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def _open_shard(url: str) -> io.BufferedIOBase:
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url)  # the user chose this URL
    return _local(url).open("rb")


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class WebDatasetShards(IterableDataset):
    """Stream image-text samples from webdataset tar shards, without the ``webdataset`` package.

    Members are grouped by key (path up to the first dot of the file name), as webdataset writes them:
    ``000001.jpg`` + ``000001.txt`` form one sample. The image comes from ``.jpg``/``.jpeg``/``.png``/``.webp``,
    the text from ``.txt`` or else from the ``"caption"`` (or ``"text"``) field of ``.json`` (a list of captions
    gives its first); ``image_id`` comes from the JSON's ``"image_id"`` when present, else the key.

    Each sample is ``{"pixel_values", "text", "image_id", "key", "shard"}``. A sample with a corrupt image, no
    image or no text, and a shard that breaks off mid-stream, come back as :class:`SkippedSample` markers (use
    :func:`collate_skipping`).

    Shards are split across DataLoader workers and ``torch.distributed`` ranks (shard ``i`` goes to global worker
    ``i % (world_size * num_workers)``), so no sample is read twice; use at least that many shards, or some
    workers get none. Ranks may get different numbers of samples, so a distributed loop should run a fixed number
    of steps per epoch. With ``shuffle_buffer > 0`` the shard order is shuffled per epoch (identically on every
    rank) and samples are shuffled within a buffer of that many (undecoded) samples per worker; with 0 the order
    is the shards' order.
    """

    def __init__(
        self,
        urls_or_paths: str | Sequence[str],
        transform: Transform,
        *,
        shuffle_buffer: int = 0,
        seed: int = 0,
        views: int = 1,
    ) -> None:
        """Set up the stream.

        Args:
            urls_or_paths: Shard paths or ``http(s)://``/``file://`` URLs, with brace expansion
                (``"data/shard-{000..009}.tar"``).
            transform: ``TrainTransform``/``EvalTransform`` or any callable ``(image[, generator=]) -> [3, H, W]``.
            shuffle_buffer: Samples held for shuffling per worker; 0 keeps the stored order.
            seed: Base seed for shuffling and augmentation (augmentation uses ``(seed, epoch, shard file name, key,
                view)``).
            views: Augmented views per sample (``pixel_values`` becomes ``[views, 3, H, W]`` when > 1).
        """
        patterns = [urls_or_paths] if isinstance(urls_or_paths, str) else list(urls_or_paths)
        self.shards = [name for pattern in patterns for name in expand_braces(pattern)]
        if not self.shards:
            raise InputError("no webdataset shards given")
        missing = [s for s in self.shards if not s.startswith(("http://", "https://")) and not _local(s).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise InputError(f"webdataset shard not found: {missing[0]}{more}")
        if shuffle_buffer < 0:
            raise InputError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.transform = transform
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self._views = _AugmentedViews(transform, views, seed)
        # Spawned DataLoader workers do not inherit the process group: remember the rank seen at construction.
        self._rank_world = _rank_world()

    @property
    def epoch(self) -> int:
        return self._views.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that seeds shuffling and augmentation (see ``CaptionDataset.set_epoch``)."""
        self._views.epoch = int(epoch)

    def worker_shards(self) -> list[str]:
        """The shards the calling process (this rank's DataLoader worker, or the main process) should read."""
        live = _rank_world()
        rank, world = live if live != (0, 1) else self._rank_world
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shards = list(self.shards)
        if self.shuffle_buffer > 0:
            random.Random(augmentation_seed(self.seed, self.epoch, "shards")).shuffle(shards)
        return shards[rank * workers + worker :: world * workers]

    def __iter__(self) -> Iterator[dict[str, Any] | SkippedSample]:
        shards = self.worker_shards()
        if not shards:
            warnings.warn(
                f"a webdataset reader got no shards: {len(self.shards)} shards for more ranks x workers",
                stacklevel=2,
            )
            return
        groups: Iterator[tuple[str, str, dict[str, bytes]] | SkippedSample] = self._groups(shards)
        if self.shuffle_buffer > 0:
            info = get_worker_info()
            rank, _ = self._rank_world
            rng = random.Random(augmentation_seed(self.seed, self.epoch, "buffer", rank, info.id if info else 0))
            groups = _shuffled(groups, self.shuffle_buffer, rng)
        for group in groups:
            yield group if isinstance(group, SkippedSample) else self._decode(*group)

    def _groups(self, shards: list[str]) -> Iterator[tuple[str, str, dict[str, bytes]] | SkippedSample]:
        """Raw ``(shard, key, {ext: bytes})`` groups; a shard that fails to read ends with a skip marker."""
        for url in shards:
            key: str | None = None
            members: dict[str, bytes] = {}
            count = 0
            try:
                with _open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                    for member in tar:
                        split = _split_key(member.name) if member.isfile() else None
                        if split is None:
                            continue
                        member_key, ext = split
                        file = tar.extractfile(member)
                        data = file.read() if file is not None else b""
                        if len(data) != member.size:  # a stream cut off mid-member just reads short
                            raise tarfile.ReadError(f"{member.name} is truncated ({len(data)} of {member.size} bytes)")
                        if member_key != key:
                            if members:
                                yield url, key, members
                                count += 1
                            key, members = member_key, {}
                        members[ext] = data
                    # tarfile stops quietly at a cut-off header; a complete archive ends with a zero block, which
                    # leaves the stream exactly one block past the last header offset.
                    if getattr(tar.fileobj, "pos", tar.offset + tarfile.BLOCKSIZE) - tar.offset < tarfile.BLOCKSIZE:
                        raise tarfile.ReadError("archive ends without its end-of-archive marker (truncated)")
                if members:
                    yield url, key, members
            except _TAR_ERRORS as exc:
                logger.debug("shard %s broke off after %d samples: %s", url, count, exc)
                yield SkippedSample(url, f"unreadable shard after {count} samples: {_reason(exc)}")

    def _decode(self, url: str, key: str, members: dict[str, bytes]) -> dict[str, Any] | SkippedSample:
        where = f"{url}#{key}"
        image_ext = next((ext for ext in _IMAGE_EXTS if ext in members), None)
        if image_ext is None:
            return SkippedSample(where, "no image member (.jpg/.jpeg/.png/.webp)")
        meta: dict[str, Any] = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                return SkippedSample(where, f"bad .json member: {_reason(exc)}")
            if not isinstance(meta, dict):
                return SkippedSample(where, f".json member is a {type(meta).__name__}, not an object")
        text: Any = None
        if "txt" in members:
            try:
                text = members["txt"].decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                return SkippedSample(where, f"bad .txt member: {_reason(exc)}")
        else:
            text = meta.get("caption", meta.get("text"))
            if isinstance(text, list):
                text = text[0] if text else None
        if not isinstance(text, str) or not text.strip():
            return SkippedSample(where, "no caption (.txt, or .json with a 'caption' or 'text' field)")
        try:
            # load_image takes paths or PIL images; Image.open only reads the header, load_image then checks the
            # size limit and decodes fully.
            image = load_image(Image.open(io.BytesIO(members[image_ext])))
            pixels = self._views(image, url.rsplit("/", 1)[-1], key)  # shard name, not path: same seeds anywhere
        except (ImageError, OSError, Image.DecompressionBombError) as exc:
            logger.debug("skipping %s: %s", where, exc)
            return SkippedSample(where, _reason(exc))
        image_id = meta.get("image_id")
        return {
            "pixel_values": pixels,
            "text": text.strip(),
            "image_id": key if image_id is None else str(image_id),
            "key": key,
            "shard": url,
        }


def _shuffled(items: Iterator[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Reservoir-style shuffle: fill a buffer, then emit a random element for each new one."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer
