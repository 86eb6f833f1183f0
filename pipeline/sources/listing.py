"""File access shared by the file-based sources: fsspec roots, sorted listings, keys, checksums.

Every source reads through fsspec so a root can be a local path, ``file://``, ``memory://`` or
``s3://`` URL. Sources keep only the root string and ``storage_options`` (plain data) and open a
filesystem per call: fsspec caches instances itself, and a filesystem object held across a fork
breaks in forked workers (PITFALLS.md), so nothing is opened at construction.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from pipeline.errors import DatasetError, SampleError
from pipeline.images import decode_image
from pipeline.sources.base import LoadedSample, Reject, SourceRecord

# What the generic readers accept as images (lower-case, compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")

# Default cap on decoded pixels per image (about a 20k x 20k RGB scene): larger inputs are
# rejected as "decompression bomb" rather than exhausting a Ray worker's memory.
DEFAULT_MAX_PIXELS = 400_000_000

_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-]")


def open_root(url: str, storage_options: dict[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem and protocol-stripped path of ``url`` (no trailing slash)."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path.rstrip("/") or path


def to_url(fs: AbstractFileSystem, path: str) -> str:
    """A string that ``open_root`` maps back to ``path``: plain for local files, a URL otherwise."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return fs.unstrip_protocol(path)


@dataclass(frozen=True)
class Listing:
    """Files below a root: relative paths (``/``-separated) in sorted order, with sizes."""

    fs: AbstractFileSystem
    root: str
    files: dict[str, int]  # relative path -> size in bytes, insertion order sorted

    def url(self, rel: str) -> str:
        """The URL of a listed file, usable in ``SourceRecord.source`` and ``read_bytes``."""
        return to_url(self.fs, f"{self.root}/{rel}")


def list_files(url: str, storage_options: dict[str, Any] | None = None) -> Listing:
    """Every file below ``url``, recursively, sorted by relative path (deterministic order).

    Raises:
        DatasetError: the root does not exist or is not a directory.
    """
    fs, root = open_root(url, storage_options)
    if not fs.isdir(root):
        raise DatasetError(f"{url}: dataset folder not found")
    found = fs.find(root, withdirs=False, detail=True)
    prefix = root + "/"
    files: dict[str, int] = {}
    for path in sorted(found):
        info = found[path]
        if info.get("type", "file") != "file" or not path.startswith(prefix):
            continue
        files[path[len(prefix) :]] = int(info.get("size") or 0)
    return Listing(fs=fs, root=root, files=files)


def read_bytes(
    url: str, storage_options: dict[str, Any] | None = None, reason: str = "missing file"
) -> bytes:
    """The whole content of ``url``.

    Raises:
        SampleError: the file is gone (``reason``, e.g. "missing metadata") or cannot be read.
    """
    fs, path = open_root(url, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as err:
        raise SampleError(url, reason) from err
    except OSError as err:
        raise SampleError(url, "unreadable file", str(err)) from err


def read_many(
    urls: list[str], storage_options: dict[str, Any] | None = None, chunk: int = 256
) -> Iterator[tuple[str, bytes | Exception]]:
    """``(url, bytes or the exception)`` for each url, in order, fetched ``chunk`` at a time.

    ``fs.cat`` on a list fetches concurrently on async filesystems (s3fs), which is what makes
    reading hundreds of thousands of small sidecars while listing bearable.
    """
    for start in range(0, len(urls), chunk):
        group = urls[start : start + chunk]
        fs, _ = open_root(group[0], storage_options)
        paths = [open_root(u, storage_options)[1] for u in group]
        out = fs.cat(paths, on_error="return")
        for url, path in zip(group, paths):
            if path in out:
                yield url, out[path]
                continue
            try:  # a filesystem that normalised the path in its answer: ask for this one alone
                yield url, fs.cat_file(path)
            except Exception as err:  # noqa: BLE001 - handed to the caller, which rejects the view
                yield url, err


def sanitize_key(text: str) -> str:
    """``text`` with every character outside ``[A-Za-z0-9_-]`` replaced by ``_`` (dots split keys)."""
    return _KEY_BAD.sub("_", text)


def sha256_hex(data: bytes | memoryview) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def has_image_extension(name: str, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> bool:
    """Whether ``name`` ends in one of ``extensions``, ignoring case."""
    lower = name.lower()
    return any(lower.endswith(ext) for ext in extensions)


class KeyGuard:
    """Remembers the keys handed out by one ``records`` call so a collision becomes a reject.

    Sanitising names can map two files to one key (``a.b.jpg`` and ``a_b.jpg``); the second one
    must not overwrite the first in a shard.
    """

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def claim(self, key: str, source: str) -> str | None:
        """None if ``key`` is new (and now taken), else the source that already holds it."""
        if key in self._seen:
            return self._seen[key]
        self._seen[key] = source
        return None

    def admit(self, record: SourceRecord) -> SourceRecord | Reject:
        """The record when its key is new, else a "duplicate key" reject naming the holder."""
        holder = self.claim(record.key, record.source)
        if holder is None:
            return record
        return Reject(record.source, "duplicate key", record.split, f"{record.key} already used by {holder}")


def check_bools(owner: str, **values: Any) -> None:
    """Raise a ValueError naming ``owner.field=value`` for the first bad boolean option.

    Options arrive from YAML/CLI as plain data; a string "false" must not silently read as true.
    """
    for name, value in values.items():
        if not isinstance(value, bool):
            raise ValueError(f"{owner}.{name}={value!r}: must be true or false")


def load_image_file(
    record: SourceRecord, channels: int, max_pixels: int, storage_options: dict[str, Any] | None = None
) -> LoadedSample:
    """Read and decode one image file of a record: the whole of loading for file-per-image datasets.

    Raises:
        SampleError: missing or undecodable file.
    """
    data = read_bytes(record.source, storage_options)
    image = decode_image(data, record.source, channels, max_pixels)
    meta = {
        **record.meta,
        "label": record.label,
        "label_name": record.label_name,
        "width": int(image.shape[1]),
        "height": int(image.shape[0]),
    }
    return LoadedSample(image=image, meta=meta, sha256=sha256_hex(data))
