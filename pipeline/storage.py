"""Object storage through fsspec: open a URL, commit objects atomically, keep credentials out of logs.

Why atomic commits: an interrupted upload must never look like data. s3fs uploads the partial
object even when the ``with fs.open(..., "wb")`` block raises, so every object is first written to a
temporary key under ``{prefix}/_tmp/``, its size (and optionally its sha256) is verified, and only
then is it moved to its final key: ``os.replace`` on a local disk, a server-side copy plus delete on
S3. A reader therefore sees either the complete object or none. ``_tmp/`` is scratch space that a
re-run deletes before it starts.

Listing caches are disabled (``use_listings_cache=False``) because a stale listing would hide a
shard that another process committed a moment ago.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import PipelineError

TMP_DIR = "_tmp"
_SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "auth", "signature")
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
READ_BLOCK = 8 << 20


class StorageError(PipelineError):
    """An object could not be written, verified or committed."""


def open_url(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """Return ``(filesystem, path)`` for a local path, ``file://`` URL or ``s3://`` (any fsspec) URL.

    Local paths are made absolute, so Ray workers whose working directory differs from the
    driver's see the same files. For S3, credentials and endpoint come from ``storage_options``
    (``key``, ``secret``, ``client_kwargs={"endpoint_url": ...}``) or, when absent, from the
    standard AWS environment variables and config files, which s3fs/botocore read themselves.

    Raises:
        ValueError: when ``url`` is empty.
    """
    if not url:
        raise ValueError("url='': empty storage URL")
    options = dict(storage_options or {})
    if "://" not in url:
        url = os.path.abspath(os.path.expanduser(url))
    elif url.startswith("file://"):
        url = "file://" + os.path.abspath(url[len("file://") :])
    else:
        options.setdefault("use_listings_cache", False)
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path.rstrip("/") or path


def is_local(fs: Any) -> bool:
    """True for the local disk, where ``os.replace`` gives a truly atomic rename."""
    return isinstance(fs, LocalFileSystem)


def join(base: str, *parts: str) -> str:
    """Join storage paths with ``/`` on every platform and protocol."""
    return posixpath.join(base, *parts)


def redact(options: Any) -> Any:
    """Copy of ``options`` with every credential-like value replaced by ``"***"``.

    Keys are matched by name (anything containing key, secret, token, password, credential, auth,
    signature), nested mappings and lists are followed, and ``user:password@`` in URL strings is
    removed. Use it on everything that reaches logs, exceptions, dataset.json or MLflow.
    """
    if isinstance(options, Mapping):
        out = {}
        for name, value in options.items():
            if isinstance(name, str) and any(w in name.lower() for w in _SECRET_WORDS) and not isinstance(
                value, Mapping
            ):
                out[name] = "***" if value not in (None, "") else value
            else:
                out[name] = redact(value)
        return out
    if isinstance(options, list | tuple):
        return type(options)(redact(v) for v in options)
    if isinstance(options, str):
        return _URL_USERINFO.sub(r"\g<scheme>***@", options)
    return options


class HashingWriter:
    """A write-only file wrapper that counts bytes and hashes them on the way through.

    ``tell()`` is the number of bytes written so far, which is all ``tarfile``-like writers need,
    and works on S3 streams that cannot seek.
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._raw.write(data)
        self._sha.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


@dataclass(frozen=True)
class Committed:
    """What ``atomic_writer`` committed: the final path, its size and sha256."""

    path: str
    size: int
    sha256: str


class _Commit:
    """Filled in by ``atomic_writer`` after the object is committed."""

    result: Committed | None = None


def tmp_path(fs: Any, root: str, final_path: str) -> str:
    """A unique temporary key under ``{root}/_tmp/`` for ``final_path``."""
    name = final_path[len(root) :].strip("/").replace("/", "-") if final_path.startswith(root) else final_path
    return join(root, TMP_DIR, f"{posixpath.basename(name)}.{uuid.uuid4().hex}")


@contextmanager
def atomic_writer(
    fs: Any, path: str, root: str, verify_sha256: bool = False
) -> Iterator[tuple[HashingWriter, _Commit]]:
    """Write an object to a temporary key under ``root`` and commit it to ``path`` on success.

    Yields ``(writer, commit)``; after the ``with`` block ``commit.result`` holds the ``Committed``
    size and sha256. On an exception the temporary object is deleted and nothing appears at
    ``path``. ``verify_sha256`` re-reads the temporary object before committing (costs one read).

    Raises:
        StorageError: when the stored object's size or checksum differs from what was written.
    """
    tmp = tmp_path(fs, root, path)
    if is_local(fs):
        fs.makedirs(posixpath.dirname(tmp), exist_ok=True)
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    commit = _Commit()
    try:
        with fs.open(tmp, "wb") as raw:
            writer = HashingWriter(raw)
            yield writer, commit
        _verify(fs, tmp, writer.size, writer.hexdigest() if verify_sha256 else None)
        _move(fs, tmp, path)
        fs.invalidate_cache(path)
        stored = fs.info(path)["size"]
        if stored != writer.size:
            raise StorageError(f"{path}: committed object has {stored} bytes, wrote {writer.size}")
        commit.result = Committed(path, writer.size, writer.hexdigest())
    except BaseException:
        _remove_quietly(fs, tmp)
        raise


def write_atomic(fs: Any, path: str, data: bytes, root: str, verify_sha256: bool = True) -> Committed:
    """Commit ``data`` to ``path`` atomically (see ``atomic_writer``); small objects only."""
    with atomic_writer(fs, path, root, verify_sha256=verify_sha256) as (writer, commit):
        writer.write(data)
    assert commit.result is not None  # set by atomic_writer on success
    return commit.result


def file_sha256(fs: Any, path: str) -> str:
    """sha256 of a stored object, read in blocks (streaming, constant memory)."""
    sha = hashlib.sha256()
    with fs.open(path, "rb", block_size=READ_BLOCK, cache_type="none") as f:
        while chunk := f.read(READ_BLOCK):
            sha.update(chunk)
    return sha.hexdigest()


def read_range(fs: Any, path: str, offset: int, size: int) -> bytes:
    """Bytes ``[offset, offset + size)`` of an object, one ranged request on S3.

    Raises:
        StorageError: when the object is shorter than the requested range.
    """
    if offset < 0 or size < 0:
        raise ValueError(f"{path}: bad range offset={offset} size={size}")
    data = fs.cat_file(path, start=offset, end=offset + size)
    if len(data) != size:
        raise StorageError(f"{path}: range [{offset}, {offset + size}) returned {len(data)} bytes")
    return data


def exists(fs: Any, path: str) -> bool:
    """``fs.exists`` without trusting any cached listing."""
    fs.invalidate_cache(path)
    return fs.exists(path)


def clean_tmp(fs: Any, root: str) -> int:
    """Delete the temporary area ``{root}/_tmp`` left by interrupted writes; returns objects removed."""
    tmp = join(root, TMP_DIR)
    fs.invalidate_cache(tmp)
    if not fs.exists(tmp):
        return 0
    files = [p for p in fs.find(tmp) if p.rstrip("/") != tmp]
    for p in files:
        _remove_quietly(fs, p)
    if is_local(fs):
        fs.rm(tmp, recursive=True)
    fs.invalidate_cache(tmp)
    return len(files)


def _verify(fs: Any, tmp: str, size: int, sha256: str | None) -> None:
    fs.invalidate_cache(tmp)
    stored = fs.info(tmp)["size"]
    if stored != size:
        raise StorageError(f"{tmp}: stored {stored} bytes, wrote {size}")
    if sha256 is not None and file_sha256(fs, tmp) != sha256:
        raise StorageError(f"{tmp}: stored object's sha256 differs from the bytes written")


def _move(fs: Any, tmp: str, path: str) -> None:
    if is_local(fs):
        os.replace(tmp, path)
        return
    fs.copy(tmp, path)  # server-side copy on S3: no bytes go through this process
    fs.rm(tmp)


def _remove_quietly(fs: Any, path: str) -> None:
    try:
        fs.invalidate_cache(path)
        if fs.exists(path):
            fs.rm(path)
    except Exception:  # noqa: BLE001 - best-effort cleanup; clean_tmp catches leftovers on re-run
        pass
