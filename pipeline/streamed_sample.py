"""What a source hands the sharder for an image too big to decode in memory, and the file plumbing.

A source that can stream implements ``load_stream(record) -> StreamedSample | None`` beside
``load``: None means "small enough, use ``load``". The sharder then builds the pyramid with
``streaming.build_pyramid_file`` into a temporary file and copies it into the tar in chunks
(``FileMember``), so neither the image nor its pyramid is ever held in memory whole.

Remote inputs (s3://...) are copied to a local temporary file first, in chunks, hashing on the
way: libvips and OpenSlide read local files, and the copy is read once more at most.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from pipeline.errors import SampleError
from pipeline.sources.listing import open_root
from pipeline.streaming import BandSource

CHUNK = 8 << 20


@dataclass
class StreamedSample:
    """A source image as bands, with the metadata and checksum ``LoadedSample`` would carry."""

    bands: BandSource
    meta: dict[str, Any]
    sha256: str
    cleanup: list[Callable[[], None]] = field(default_factory=list)  # run by close()

    def close(self) -> None:
        """Release the band source and temporary copies (idempotent)."""
        while self.cleanup:
            self.cleanup.pop()()


class FileMember:
    """A tar member whose data is ``size`` bytes of an open file: written in chunks, never whole."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f, self.size = f, size

    def __len__(self) -> int:
        return self.size

    def chunks(self, chunk: int = CHUNK) -> Iterator[bytes]:
        """The data from its start, ``chunk`` bytes at a time.

        Raises:
            OSError: the file is shorter than ``size``.
        """
        self.f.seek(0)
        left = self.size
        while left:
            data = self.f.read(min(chunk, left))
            if not data:
                raise OSError(f"temporary member file ended {left} bytes early")
            left -= len(data)
            yield data

    def close(self) -> None:
        self.f.close()


def file_sha256(path: str) -> str:
    """Hex sha256 of a local file, read in chunks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(CHUNK):
            sha.update(data)
    return sha.hexdigest()


def local_file(url: str, storage_options: dict[str, Any] | None = None,
               tmp_dir: str | None = None, hash_local: bool = True) -> tuple[str, str, Callable[[], None]]:
    """``(local path, sha256, cleanup)`` for ``url``: the file itself when local, else a chunked copy.

    ``hash_local=False`` skips hashing a local file (sha256 "") until the caller knows it needs it.

    Raises:
        SampleError: "missing file" or "unreadable file".
    """
    fs, path = open_root(url, storage_options)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    try:
        if protocol in ("file", "local"):
            if not os.path.isfile(path):
                raise FileNotFoundError(path)
            return path, file_sha256(path) if hash_local else "", lambda: None
        fd, tmp = tempfile.mkstemp(dir=tmp_dir, suffix=os.path.splitext(path)[1])
        sha = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, fs.open(path, "rb", block_size=CHUNK, cache_type="none") as src:
                while data := src.read(CHUNK):
                    sha.update(data)
                    out.write(data)
        except BaseException:
            os.unlink(tmp)
            raise
        return tmp, sha.hexdigest(), lambda: os.unlink(tmp)
    except FileNotFoundError as err:
        raise SampleError(url, "missing file") from err
    except OSError as err:
        raise SampleError(url, "unreadable file", str(err)) from err
