"""Random access to one pyramid inside a shard: a seekable file over a byte span, by ranged reads.

``access: random`` (DESIGN.md section 3): a sample far too big to stream is read where it lies.
The manifest gives its ``.tif`` member's ``offset`` and ``size`` in its shard; ``RangedFile``
presents those bytes as a read-only seekable file, each ``read`` one ``fs.cat_file(path, start,
end)`` (an HTTP range request on S3), and ``read_ranges`` many spans at once through
``fs.cat_ranges`` (concurrent on s3fs), adjacent spans merged into one request. So
``PyramidReader`` fetches the header (IFDs, read ahead per level) and the tiles a read needs, and
nothing else. Every byte that comes back from fsspec is counted (``ByteCounter``): that is the
"bytes read" the loader logs beside the decoded-pixel fraction.

``MemberRef`` is the plain, picklable address of one member; the header chunks a loader worker
already fetched travel with it (``known``), so the training process does not fetch them again.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import FormatError
from pipeline.storage import join, open_url

MERGE_GAP = 0  # spans closer than this many bytes are fetched in one request (gap bytes included)


class ByteCounter:
    """Bytes and requests that came back from the filesystem; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0
        self.requests = 0

    def add(self, nbytes: int, requests: int = 1) -> None:
        with self._lock:
            self.bytes += nbytes
            self.requests += requests


class RangedFile(io.RawIOBase):
    """Bytes ``[offset, offset + size)`` of ``path`` on ``fs`` as a read-only seekable file.

    ``known`` holds ``(position, bytes)`` chunks already fetched (positions relative to the span):
    a read that lies inside one is served from it and not counted. Reads are recorded in
    ``chunks`` when ``record`` is true, to hand them on as another reader's ``known``.
    """

    def __init__(self, fs: Any, path: str, offset: int, size: int, *, counter: ByteCounter | None = None,
                 known: Sequence[tuple[int, bytes]] = (), record: bool = False, where: str = "") -> None:
        super().__init__()
        if offset < 0 or size < 0:
            raise ValueError(f"{path}: bad span offset={offset} size={size}")
        self.fs, self.path, self.offset, self.size = fs, path, offset, size
        self.counter = counter if counter is not None else ByteCounter()
        self.known = list(known)
        self.chunks: list[tuple[int, bytes]] | None = [] if record else None
        self.where = where or path
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + pos < 0:
            raise ValueError(f"{self.where}: seek to negative position {base + pos}")
        self._pos = base + pos
        return self._pos

    def _known(self, start: int, end: int) -> bytes | None:
        for at, data in self.known:
            if at <= start and end <= at + len(data):
                return data[start - at:end - at]
        return None

    def read(self, n: int = -1) -> bytes:
        start = self._pos
        end = self.size if n is None or n < 0 else min(self.size, start + n)
        if end <= start:
            return b""
        data = self._known(start, end)
        if data is None:
            data = self.fs.cat_file(self.path, start=self.offset + start, end=self.offset + end)
            self.counter.add(len(data))
            if self.chunks is not None:
                self.chunks.append((start, data))
        self._pos = start + len(data)
        return data

    def read_ranges(self, spans: Sequence[tuple[int, int]]) -> list[bytes]:
        """``[(position, size), ...]`` -> their bytes, in one batch of merged ranged requests.

        Raises:
            FormatError: a span outside the member, or a short answer from the store.
        """
        for pos, size in spans:
            if pos < 0 or size < 0 or pos + size > self.size:
                raise FormatError(f"{self.where}: span [{pos}, {pos + size}) outside the member of {self.size} bytes")
        order = sorted(range(len(spans)), key=lambda i: spans[i][0])
        groups: list[list[int]] = []
        for i in order:
            if groups and spans[i][0] <= _end(spans, groups[-1]) + MERGE_GAP:
                groups[-1].append(i)
            else:
                groups.append([i])
        starts = [spans[g[0]][0] for g in groups]
        ends = [_end(spans, g) for g in groups]
        blobs = self.fs.cat_ranges([self.path] * len(groups), [self.offset + s for s in starts],
                                   [self.offset + e for e in ends])
        out: list[bytes] = [b""] * len(spans)
        for g, start, end, blob in zip(groups, starts, ends, blobs):
            if isinstance(blob, Exception):
                raise FormatError(f"{self.where}: ranged read [{start}, {end}) failed: {blob}")
            if len(blob) != end - start:
                raise FormatError(f"{self.where}: ranged read [{start}, {end}) returned {len(blob)} bytes")
            self.counter.add(len(blob))
            for i in g:
                pos, size = spans[i]
                out[i] = blob[pos - start:pos - start + size]
        return out


def _end(spans: Sequence[tuple[int, int]], group: list[int]) -> int:
    return max(spans[i][0] + spans[i][1] for i in group)


@dataclass(frozen=True)
class MemberRef:
    """Where one sample's pyramid lies: shard URL relative to the dataset, byte span, header chunks."""

    url: str  # dataset prefix
    shard: str  # tar path relative to the prefix
    offset: int
    size: int
    storage_options: dict[str, Any] = field(default_factory=dict)
    known: tuple[tuple[int, bytes], ...] = ()

    def open(self, counter: ByteCounter | None = None, record: bool = False, where: str = "") -> RangedFile:
        """A ``RangedFile`` over the member (the filesystem is opened here: fork-safe)."""
        fs, root = open_url(self.url, self.storage_options)
        return RangedFile(fs, join(root, self.shard), self.offset, self.size, counter=counter,
                          known=self.known, record=record, where=where or f"{self.url}/{self.shard}")
