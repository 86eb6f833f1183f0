"""The tile decoder: Pillow's pixels to the bit, and no header it accepts can overflow its buffer."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.jpeg_tile import JpegFrame, decode_jpeg_tile, jpeg_frame


def encode(side: int, mode: str, seed: int = 0, **save: object) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (side, side, 3) if mode == "RGB" else (side, side)
    ramp = np.linspace(0, 180, side)[:, None] if mode == "L" else np.linspace(0, 180, side)[:, None, None]
    pixels = (rng.random(shape) * 70 + ramp).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode).save(out, "JPEG", **save)
    return out.getvalue()


def segment(data: bytes, marker: int) -> tuple[int, int]:
    """(start, end) of the first segment with ``marker`` (start at its 0xFF)."""
    pos = 2
    while data[pos + 1] != marker:
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return pos, pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")


@settings(max_examples=60, deadline=None)
@given(side=st.integers(8, 96), mode=st.sampled_from(["L", "RGB"]), quality=st.integers(30, 98),
       progressive=st.booleans(), subsampling=st.sampled_from([0, 2]), seed=st.integers(0, 2**16))  # fmt: skip
def test_same_pixels_as_pillow_open(side: int, mode: str, quality: int, progressive: bool, subsampling: int,
                                    seed: int) -> None:  # fmt: skip
    data = encode(side, mode, seed, quality=quality, progressive=progressive, subsampling=subsampling)
    assert jpeg_frame(data) == JpegFrame(side, side, 1 if mode == "L" else 3, progressive)
    im = decode_jpeg_tile(data, side, mode)
    assert (im.mode, im.size) == (mode, (side, side))
    assert np.array_equal(np.asarray(im), np.asarray(Image.open(io.BytesIO(data))))


def test_headers_that_disagree_with_the_pyramid_are_refused_before_decoding() -> None:
    grey = encode(64, "L")
    start, end = segment(grey, 0xC0)
    cases = {
        "a 32x32 JPEG where the pyramid declares 64x64": (encode(32, "L"), 64, "L"),
        "a 128x128 JPEG where the pyramid declares 64x64": (encode(128, "L"), 64, "L"),  # would overflow
        "3 colour components where the pyramid declares 1": (encode(64, "RGB"), 64, "L"),
        "1 colour components where the pyramid declares 3": (grey, 64, "RGB"),
        "12-bit samples": (grey[: start + 4] + b"\x0c" + grey[start + 5 :], 64, "L"),
        "unsupported JPEG process (frame marker 0xFFC3)": (grey[: start + 1] + b"\xc3" + grey[start + 2 :], 64, "L"),
        "two frame headers": (grey[:end] + grey[start:end] + grey[end:], 64, "L"),
        "scan before the frame header": (grey[:start] + grey[end:], 64, "L"),
        "no start-of-image marker": (grey[2:], 64, "L"),
        # a stuffed zero where a marker must be: libjpeg would scan on byte by byte from there
        "unexpected marker 0xFF00": (grey[:start] + b"\xff\x00\x00\x04" + grey[start:], 64, "L"),
        "unexpected marker 0xFFD8": (grey[:2] + grey, 64, "L"),
        "no marker at byte 2": (b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xda\x00\x02\xff\xd9", 64, "L"),
        "truncated JPEG": (grey[: len(grey) // 2], 64, "L"),
    }
    for reason, (data, side, mode) in cases.items():
        with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            decode_jpeg_tile(data, side, mode)
    cmyk = io.BytesIO()
    Image.new("CMYK", (16, 16), (1, 2, 3, 4)).save(cmyk, "JPEG")
    with pytest.raises(ValueError, match="4 colour components where the pyramid declares 3"):
        decode_jpeg_tile(cmyk.getvalue(), 16, "RGB")


@settings(max_examples=300, deadline=None)
@given(data=st.data(), mode=st.sampled_from(["L", "RGB"]))
def test_damaged_tiles_decode_whole_or_raise(data: st.DataObject, mode: str) -> None:
    """Flipped, cut or inserted bytes anywhere: a right-sized image or a ValueError, never a crash
    (a buffer overflow in the C decoder would take the test process down)."""
    tile = bytearray(encode(32, mode, quality=85))
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(tile) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            tile[pos] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del tile[pos : pos + data.draw(st.integers(1, 40))]
        else:
            tile[pos:pos] = data.draw(st.binary(min_size=1, max_size=40))
        if not tile:
            break
    try:
        im = decode_jpeg_tile(bytes(tile), 32, mode)
    except ValueError:
        return
    assert (im.mode, im.size) == (mode, (32, 32))
