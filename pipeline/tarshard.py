"""Deterministic WebDataset tar shards: writing samples, and range-reading one member back.

Why our own writer instead of ``tarfile.TarFile``/``webdataset.TarWriter``: we need (1) byte-identical
output for identical input, so every header field that could carry the environment is fixed
(mtime 0, uid/gid 0, empty uname/gname, mode 0o644, POSIX/PAX format), and (2) the byte offset of
each member's header and data, which goes into the manifest so a reader can fetch one sample's
pyramid with an HTTP range request instead of streaming the shard. The headers themselves come
from ``tarfile.TarInfo.tobuf`` so the result is an ordinary tar any tool reads; PAX extended
headers appear only when a field needs them (a name over 100 bytes, a member over 8 GiB).

Layout: for each sample the members ``{key}.tif``, ``{key}.json``, ``{key}.cls`` are adjacent and
in that order (WebDataset groups adjacent members by the key before the first dot). The archive
ends with two zero blocks and is padded to a multiple of 10240 bytes, as GNU tar and ``tarfile`` do.
"""

from __future__ import annotations

import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from pipeline.errors import FormatError
from pipeline.storage import open_url, read_range

BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # 10240
MEMBER_MODE = 0o644


@dataclass(frozen=True)
class MemberSpan:
    """Where one member lies in its shard: header start, data start and data size, in bytes."""

    name: str
    header_offset: int
    offset: int
    size: int


def member_header(name: str, size: int) -> bytes:
    """The tar header block(s) for a regular file ``name`` of ``size`` bytes, environment-free."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = MEMBER_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


class TarShardWriter:
    """Append samples to a tar stream and report member offsets.

    ``out`` needs only ``write``; the writer counts bytes itself, so it works on non-seekable S3
    upload streams. Call ``close()`` to write the end-of-archive marker; the caller closes ``out``.
    """

    def __init__(self, out: BinaryIO | Any) -> None:
        self._out = out
        self._pos = 0
        self._keys: set[str] = set()
        self._closed = False

    @property
    def position(self) -> int:
        return self._pos

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._pos += len(data)

    def add_sample(self, key: str, members: Sequence[tuple[str, bytes]]) -> dict[str, MemberSpan]:
        """Write members ``{key}.{ext}`` adjacently, in the given order; returns spans by extension.

        A member's data is bytes, or an object with ``len()`` and ``chunks()`` (an iterator of
        bytes) for data too big to hold in memory (a streamed gigapixel pyramid).

        Raises:
            ValueError: a key with a dot or slash (WebDataset would split it), a repeated key,
                an extension with a slash, or writing after ``close()``.
        """
        if self._closed:
            raise ValueError(f"{key}: shard already closed")
        if not key or "." in key or "/" in key:
            raise ValueError(f"key={key!r}: keys must be non-empty without '.' or '/'")
        if key in self._keys:
            raise ValueError(f"{key}: key written twice in one shard")
        self._keys.add(key)
        spans: dict[str, MemberSpan] = {}
        for ext, data in members:
            if not ext or "/" in ext:
                raise ValueError(f"{key}: bad member extension {ext!r}")
            name = f"{key}.{ext}"
            header = member_header(name, len(data))
            start = self._pos
            self._write(header)
            spans[ext] = MemberSpan(name, start, self._pos, len(data))
            chunks = getattr(data, "chunks", None)  # a file-backed member (streamed_sample.FileMember)
            if chunks is None:
                self._write(data)
            else:
                for chunk in chunks():
                    self._write(chunk)
            self._write(_padding(len(data)))
        return spans

    def close(self) -> int:
        """Write the two zero blocks and pad to a whole record; returns the archive size."""
        if not self._closed:
            self._write(b"\0" * (2 * BLOCK))
            self._write(b"\0" * (-self._pos % RECORD))
            self._closed = True
        return self._pos


def check_key(key: str, where: str = "") -> str:
    """``key`` if it is safe to use as a file name stem anywhere downstream, else ``FormatError``.

    Why: a sample key read from a shard comes from a tar member name, which an attacker controls.
    Our writer never makes keys with ``/`` or ``.`` (``add_sample`` refuses them), so a key that is
    absolute, climbs with ``..``, holds a separator, a NUL or a control character is a hostile or
    foreign shard; refusing it here means nothing later (attention overlays, logs) can be steered
    outside its folder. We never extract tars to disk, so this is the one place names matter.

    Raises:
        FormatError: naming ``where`` and the refused key.
    """
    if (not isinstance(key, str) or not key or key in (".", "..") or len(key) > 255
            or any(c in key for c in "/\\.") or any(ord(c) < 32 or ord(c) == 127 for c in key)):
        raise FormatError(f"{where}: unsafe sample key {key!r} (absolute, '..', separator or control character)")
    return key


def parse_member_header(block: bytes, where: str = "") -> tuple[str, int]:
    """(name, size) of a plain USTAR header block; used to check a manifest offset.

    Raises:
        FormatError: when ``block`` is not a valid tar header.
    """
    try:
        info = tarfile.TarInfo.frombuf(block[:BLOCK], encoding="utf-8", errors="strict")
    except tarfile.HeaderError as exc:
        raise FormatError(f"{where}: not a tar header ({exc})") from None
    return info.name, info.size


def read_member(
    url: str,
    offset: int,
    size: int,
    storage_options: Mapping[str, Any] | None = None,
    fs: Any = None,
) -> bytes:
    """Range-read one member's data from a shard, given its manifest ``offset`` and ``size``.

    ``url`` is the shard's URL (or path when ``fs`` is given). One request on object storage;
    the rest of the shard is never read.
    """
    if fs is None:
        fs, url = open_url(url, storage_options)
    return read_range(fs, url, offset, size)
