"""PyramidReader on corrupt, truncated and hostile bytes: FormatError (naming the file) or pixels,
never another exception, never a hang, never an unbounded read. Also foreign layouts (JPEGTables)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.errors import FormatError
from pipeline.pyramid import PyramidReader, build_pyramid
from pipeline.tiff_ifd import READAHEAD

WHERE = "s3://bucket/shard-000001.tar#key.tif"


def _image(channels: int) -> np.ndarray:
    rng = np.random.default_rng(11)
    small = rng.integers(0, 256, size=(8, 12) + ((3,) if channels == 3 else ()), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((300, 200), Image.BICUBIC))


VALID = build_pyramid(_image(3), tile=128)  # levels 300x200 (3x2 tiles), 150x100 (2x1), 75x50 (1)


class Counting(io.BytesIO):
    """BytesIO that counts bytes read."""

    bytes_read = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data


def _exercise(src: bytes | io.BytesIO) -> None:
    """Everything a loader does with a reader; only FormatError may escape."""
    reader = PyramidReader(src, where=WHERE)
    assert reader.channels in (1, 3)
    for level in range(len(reader.levels)):
        arr = reader.read_level(level)
        assert arr.shape[:2] == reader.levels[level][::-1]
    out = reader.read_region((-10.5, 20.25, reader.width * 0.7, reader.height + 5), (33, 17))
    assert out.shape[:2] == (17, 33) and out.dtype == np.uint8


def test_the_fuzzed_pyramid_is_valid_to_start_with() -> None:
    _exercise(VALID)


@pytest.mark.timeout(120)
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), as_file=st.booleans(), truncate=st.booleans())
def test_corrupt_pyramids_raise_format_error_only(data, as_file: bool, truncate: bool) -> None:
    blob = bytearray(VALID)
    if truncate:
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 8))):
            # half the flips land in the first 2 KiB, where the header and the first IFDs live
            hi = min(2048, len(blob)) if data.draw(st.booleans()) else len(blob)
            pos = data.draw(st.integers(0, hi - 1))
            blob[pos] = data.draw(st.integers(0, 255))
    try:
        _exercise(Counting(bytes(blob)) if as_file else bytes(blob))
    except FormatError as exc:
        assert str(exc).startswith(WHERE)


@pytest.mark.parametrize("blob", [b"", b"II*\x00", b"\x89PNG\r\n\x1a\n" + bytes(100), bytes(range(256)) * 4,
                                  b"II*\x00\x08\x00\x00\x00" + b"\xff\xff" + bytes(40)])
def test_garbage_is_a_format_error(blob: bytes) -> None:
    with pytest.raises(FormatError, match="^s3://bucket"):
        PyramidReader(blob, where=WHERE)


def _page_offsets(blob: bytes) -> list[int]:
    with tifffile.TiffFile(io.BytesIO(blob)) as tif:
        return [page.offset for page in tif.pages]


def test_ifd_loop_is_refused() -> None:
    blob = bytearray(VALID)
    offsets = _page_offsets(VALID)
    last = offsets[-1]
    count = struct.unpack("<H", blob[last:last + 2])[0]
    struct.pack_into("<I", blob, last + 2 + 12 * count, offsets[0])  # last IFD -> first IFD
    with pytest.raises(FormatError, match="IFD loop"):
        PyramidReader(bytes(blob), where=WHERE)


def test_size_over_max_pixels_is_refused_before_any_tile() -> None:
    fh = Counting(VALID)
    with pytest.raises(FormatError, match="max_pixels"):
        PyramidReader(fh, where=WHERE, max_pixels=300 * 200 - 1)
    assert fh.bytes_read <= READAHEAD  # the header's one read-ahead chunk, nothing more


def test_tile_over_max_tile_bytes_is_refused_before_reading_it() -> None:
    fh = Counting(VALID)
    reader = PyramidReader(fh, where=WHERE, max_tile_bytes=64)
    header = fh.bytes_read
    with pytest.raises(FormatError, match="max_tile_bytes=64"):
        reader.read_region((0, 0, 10, 10), 10)
    assert fh.bytes_read == header and reader.bytes_read == 0


def test_broken_tiles_are_format_errors() -> None:
    with tifffile.TiffFile(io.BytesIO(VALID)) as tif:
        offset, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    no_eoi = bytearray(VALID)
    no_eoi[offset + count - 2:offset + count] = b"\x00\x00"
    zeros = bytearray(VALID)
    zeros[offset:offset + count] = bytes(count)
    for blob, match in ((no_eoi, "truncated JPEG"), (zeros, "tile")):
        reader = PyramidReader(bytes(blob), where=WHERE)
        with pytest.raises(FormatError, match=match):
            reader.read_region((0, 0, 50, 50), 50)
        reader.read_region((200, 150, 300, 200), 50)  # other tiles still read


def test_truncated_file_fails_on_the_missing_tiles_only() -> None:
    offsets = _page_offsets(VALID)
    with tifffile.TiffFile(io.BytesIO(VALID)) as tif:
        last_tile_end = max(o + c for p in tif.pages for o, c in zip(p.dataoffsets, p.databytecounts))
    cut = VALID[:last_tile_end - 10]
    if max(offsets) < len(cut):  # IFDs before the data: the header still parses
        reader = PyramidReader(cut, where=WHERE)
        with pytest.raises(FormatError):
            for level in range(len(reader.levels)):
                reader.read_level(level)
    else:
        with pytest.raises(FormatError):
            PyramidReader(cut, where=WHERE)


def test_unseekable_source_is_refused() -> None:
    class Stream:
        def read(self, n: int = -1) -> bytes:
            return b""

    with pytest.raises(FormatError, match="seekable"):
        PyramidReader(Stream(), where=WHERE)  # type: ignore[arg-type]


def _split_jpeg(stream: bytes) -> tuple[bytes, bytes]:
    """(JPEGTables: SOI + DQT/DHT + EOI, abbreviated stream without them) of a baseline JPEG."""
    tables, rest, pos = [b"\xff\xd8"], [b"\xff\xd8"], 2
    while stream[pos + 1] != 0xDA:  # up to the start of scan
        length = struct.unpack(">H", stream[pos + 2:pos + 4])[0]
        segment = stream[pos:pos + 2 + length]
        (tables if stream[pos + 1] in (0xDB, 0xC4) else rest).append(segment)
        pos += 2 + length
    return b"".join(tables) + b"\xff\xd9", b"".join(rest) + stream[pos:]


def test_tiles_with_shared_jpegtables_are_read() -> None:
    img = _image(1)
    tiles, tables = [], b""
    for y in range(0, 256, 128):
        for x in range(0, 384, 128):
            tile = np.zeros((128, 128), np.uint8)
            part = img[y:y + 128, x:x + 128]
            tile[:part.shape[0], :part.shape[1]] = part
            buf = io.BytesIO()
            Image.fromarray(tile).save(buf, "JPEG", quality=90)
            tables, abbreviated = _split_jpeg(buf.getvalue())
            tiles.append(abbreviated)
    out = io.BytesIO()
    with tifffile.TiffWriter(out) as tw:
        tw.write(iter(tiles), shape=img.shape, dtype=np.uint8, tile=(128, 128), compression="jpeg",
                 photometric="minisblack", jpegtables=tables, metadata=None)
    reader = PyramidReader(out.getvalue(), where=WHERE)
    assert reader.levels == [(300, 200)]
    level0 = reader.read_level(0)
    assert np.abs(level0.astype(int) - img).mean() < 2
