"""Decode one pyramid tile's JPEG with pillow-simd's C decoder, without Pillow's Python header parse.

``Image.open(...).load()`` walks every JPEG marker in Python (quantisation tables element by
element) before the C decoder runs. For the small tiles TNet reads (64 px grey on Megapixel
MNIST) that walk costs more than the decode itself (docs/benchmarks.md, the loader section).
Here a strict marker walk reads only the frame header, checks it against the size and mode the
pyramid's IFD declares, and hands the bytes to the same libjpeg decoder Pillow uses, so the
pixels are Pillow's to the bit.

Safety: the C decoder writes into an image of the size we give it. Pillow's plugin guarantees that
size equals the frame's; here ``jpeg_frame`` does, and it is stricter than both Pillow and libjpeg
(only the segment types a baseline or progressive header holds, each followed by its length;
any other byte where a marker must be, a second frame header, a scan before the frame, a
precision other than 8 or a frame type libjpeg-turbo cannot decode is an error), so whatever it
accepts, libjpeg walks the same segments and reads the same frame. The decoder must also report the end of the image; anything else is
an error, never a partly grey tile.
"""

from __future__ import annotations

from typing import NamedTuple

from PIL import Image

from pipeline.images import jpeg_is_complete

# Baseline, extended sequential, progressive (Huffman) and their arithmetic-coded twins.
_FRAMES = {0xC0: False, 0xC1: False, 0xC2: True, 0xC9: False, 0xCA: True}
_OTHER_FRAMES = {0xC3, 0xC5, 0xC6, 0xC7, 0xCB, 0xCD, 0xCE, 0xCF}  # lossless, hierarchical
_SOS = 0xDA
# Segments that may precede the scan, each skipped by its length: DHT, DAC, DQT, DRI, COM, APP0-15.
_TABLES = {0xC4, 0xCC, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)}


class JpegFrame(NamedTuple):
    width: int
    height: int
    components: int
    progressive: bool


def jpeg_frame(data: bytes) -> JpegFrame:
    """The frame header of a JPEG stream, read by a strict walk over the segments before its scan.

    Raises:
        ValueError: naming what is wrong, for anything but a well-formed 8-bit frame.
    """
    if not data.startswith(b"\xff\xd8"):
        raise ValueError("no start-of-image marker")
    pos, end, frame = 2, len(data), None
    while True:
        if pos >= end or data[pos] != 0xFF:
            raise ValueError(f"no marker at byte {pos}")
        while pos < end and data[pos] == 0xFF:  # fill bytes before a marker
            pos += 1
        if pos + 2 >= end:
            raise ValueError("header ends before the first scan")
        marker = data[pos]
        length = (data[pos + 1] << 8) | data[pos + 2]
        if marker == _SOS:
            if frame is None:
                raise ValueError("scan before the frame header")
            return frame
        if not (marker in _TABLES or marker in _FRAMES or marker in _OTHER_FRAMES) or length < 2:
            # Anything else (a stuffed 0xFF00, SOI, EOI, RSTn, reserved codes) is where libjpeg would
            # skip bytes to resynchronise and could read a different chain of segments than we do.
            raise ValueError(f"unexpected marker 0xFF{marker:02X} in the header")
        if marker in _FRAMES:
            if frame is not None:
                raise ValueError("two frame headers")
            if length < 8 or pos + 1 + length > end:
                raise ValueError("frame header cut short")
            precision = data[pos + 3]
            height = (data[pos + 4] << 8) | data[pos + 5]
            width = (data[pos + 6] << 8) | data[pos + 7]
            components = data[pos + 8]
            if precision != 8:
                raise ValueError(f"{precision}-bit samples (8 expected)")
            if length != 8 + 3 * components:
                raise ValueError(f"frame header of {length} bytes for {components} components")
            frame = JpegFrame(width, height, components, _FRAMES[marker])
        elif marker in _OTHER_FRAMES:
            raise ValueError(f"unsupported JPEG process (frame marker 0xFF{marker:02X})")
        pos += 1 + length


def decode_jpeg_tile(data: bytes, side: int, mode: str) -> Image.Image:
    """``data`` decoded as a ``side`` x ``side`` image of ``mode`` ("L" or "RGB").

    Raises:
        ValueError: the stream lacks its end-of-image marker, the header does not declare that
            size and mode, or the decoder failed or stopped before the end of the image (naming which).
    """
    if not jpeg_is_complete(data):
        raise ValueError("truncated JPEG (no end-of-image after the last scan)")
    frame = jpeg_frame(data)
    components = {"L": 1, "RGB": 3}[mode]
    if (frame.width, frame.height) != (side, side):
        raise ValueError(f"a {frame.width}x{frame.height} JPEG where the pyramid declares {side}x{side}")
    if frame.components != components:
        raise ValueError(f"{frame.components} colour components where the pyramid declares {components}")
    core = Image.core.new(mode, (side, side))
    decoder = Image._getdecoder(mode, "jpeg", (mode, ""))
    try:
        decoder.setimage(core)
        consumed, status = decoder.decode(data)
    finally:
        decoder.cleanup()
    if status < 0:
        raise ValueError(f"decoder error {status}")
    if consumed >= 0:  # the decoder wants more bytes: the scans stop before the image is whole
        raise ValueError("image data ends before the last row")
    return Image.Image()._new(core)
