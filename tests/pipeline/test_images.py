"""decode_image: every mode the datasets throw at us, by content not by name, and clear rejections.

Inputs are generated here from a fixed seed (no committed binaries).
"""

from __future__ import annotations

import io
import struct
import zlib

import imagecodecs
import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from pipeline.errors import SampleError
from pipeline.images import decode_image, scale_to_uint8, to_channels

RNG = np.random.default_rng(0)
RGB = np.asarray(Image.fromarray(RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((80, 60), Image.BICUBIC))
ALPHA = RNG.integers(0, 256, (60, 80), dtype=np.uint8)


def pil_bytes(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def tiff_bytes(arr: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kwargs)
    return buf.getvalue()


def reason(data: bytes, channels: int = 3, **kwargs) -> str:
    with pytest.raises(SampleError) as info:
        decode_image(data, "train/n01/x.JPEG", channels, **kwargs)
    assert str(info.value).startswith("train/n01/x.JPEG: ")
    return info.value.reason


# ------------------------------------------------------------------------------------------------
# modes
def test_rgb_and_grey_jpeg() -> None:
    data = pil_bytes(Image.fromarray(RGB), "JPEG", quality=95)
    rgb = decode_image(data, "a.jpg", 3)
    assert rgb.shape == (60, 80, 3) and rgb.dtype == np.uint8 and np.abs(rgb.astype(int) - RGB).mean() < 3
    grey = decode_image(data, "a.jpg", 1)
    assert grey.shape == (60, 80)
    assert np.abs(grey.astype(int) - np.asarray(Image.fromarray(rgb).convert("L"))).max() <= 1  # Pillow's luma
    g = decode_image(pil_bytes(Image.fromarray(RGB[..., 0]), "JPEG"), "g.jpg", 3)
    assert g.shape == (60, 80, 3) and (g[..., 0] == g[..., 2]).all()


def test_cmyk_jpeg_is_converted_not_misread() -> None:
    cmyk = Image.new("CMYK", (32, 16), (10, 200, 30, 40))
    out = decode_image(pil_bytes(cmyk, "JPEG", quality=100), "cmyk.JPEG", 3)
    expected = [round((255 - c) * (255 - 40) / 255) for c in (10, 200, 30)]  # (207, 46, 190)
    assert np.abs(out.reshape(-1, 3).astype(int) - expected).max() <= 2


def test_png_named_jpeg_decodes_by_content() -> None:
    out = decode_image(pil_bytes(Image.fromarray(RGB), "PNG"), "train/n02105855/n02105855_2933.JPEG", 3)
    assert np.array_equal(out, RGB)


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_png(transparency: bool) -> None:
    im = Image.fromarray(RGB).quantize(16)
    kwargs = {"transparency": 0} if transparency else {}
    out = decode_image(pil_bytes(im, "PNG", **kwargs), "p.png", 3)
    expected = np.asarray(im.convert("RGB"))
    if transparency:  # palette index 0 is transparent: black after compositing
        expected = np.where((np.asarray(im) == 0)[..., None], 0, expected)
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_onto_black(mode: str) -> None:
    colour = RGB if mode == "RGBA" else RGB[..., 0]
    im = Image.fromarray(np.dstack([colour, ALPHA]), mode)
    out = decode_image(pil_bytes(im, "PNG"), "a.png", 3 if mode == "RGBA" else 1)
    black = Image.new(mode, im.size, (0, 0, 0, 255) if mode == "RGBA" else (0, 255))
    expected = np.asarray(Image.alpha_composite(black.convert("RGBA"), im.convert("RGBA")).convert(
        "RGB" if mode == "RGBA" else "L"))
    assert np.abs(out.astype(int) - expected).max() <= 1


def test_16_bit_is_scaled_by_the_dtype_range_not_clipped() -> None:
    v = np.array([[0, 255, 257, 32768, 65535, 1000]], np.uint16)
    expected = np.rint(v / 257).astype(np.uint8)
    assert np.array_equal(decode_image(imagecodecs.png_encode(v), "g16.png", 1), expected)  # I;16 PNG
    assert np.array_equal(decode_image(tiff_bytes(v), "g16.tif", 1), expected)  # I;16 TIFF
    rgb16 = np.stack([v, v[:, ::-1], v], -1)
    for data in (imagecodecs.png_encode(rgb16), tiff_bytes(rgb16, photometric="rgb")):
        out = decode_image(data, "rgb16", 3)  # Pillow keeps the high byte: within 1 of v / 257
        assert np.abs(out.astype(int) - np.rint(rgb16 / 257)).max() <= 1


def test_tiffs_pillow_cannot_read_go_to_tifffile() -> None:
    v = np.linspace(0, 65535, 30).astype(np.uint16).reshape(5, 6)
    rgba16 = np.stack([v, v, v, np.full_like(v, 65535)], -1)
    out = decode_image(tiff_bytes(rgba16, photometric="rgb", extrasamples=["unassalpha"]), "rgba16.tif", 3)
    assert np.abs(out[..., 0].astype(int) - np.rint(v / 257)).max() <= 1  # Pillow: high byte
    i32 = np.array([[-(2**31), 0, 2**31 - 1]], np.int32)  # Pillow mode I: tifffile knows the dtype
    assert np.array_equal(decode_image(tiff_bytes(i32), "i32.tif", 1), [[0, 128, 255]])
    f = np.linspace(0, 1, 30, dtype=np.float32).reshape(5, 6)
    out = decode_image(tiff_bytes(np.stack([f, f, f], -1), photometric="rgb"), "f32.tif", 3)
    assert np.array_equal(out[..., 1], np.rint(f * 255).astype(np.uint8))
    cmyk = decode_image(tiff_bytes(np.full((4, 4, 4), (10, 200, 30, 40), np.uint8), photometric="separated"),
                        "cmyk.tif", 3)
    assert np.abs(cmyk[0, 0].astype(int) - (207, 46, 190)).max() <= 1
    white = decode_image(tiff_bytes(np.full((4, 4), 250, np.uint8), photometric="miniswhite"), "w.tif", 1)
    assert (white == 5).all()


def test_float_and_signed_scaling() -> None:
    assert np.array_equal(scale_to_uint8(np.array([0.0, 0.5, 1.0], np.float32)), [0, 128, 255])
    assert np.array_equal(scale_to_uint8(np.array([-2.0, 0.0, 2.0, np.nan])), [0, 128, 255, 0])
    assert np.array_equal(scale_to_uint8(np.array([-32768, 32767], np.int16)), [0, 255])
    assert np.array_equal(decode_image(pil_bytes(Image.fromarray(np.full((3, 3), 0.25, np.float32)), "TIFF"),
                                       "f.tif", 1), np.full((3, 3), 64))


# ------------------------------------------------------------------------------------------------
# rejections
def _png_with_size(width: int, height: int) -> bytes:
    """A valid tiny PNG whose IHDR then claims ``width`` x ``height`` (CRC fixed up)."""
    data = bytearray(pil_bytes(Image.new("L", (4, 4)), "PNG"))
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    limit = Image.MAX_IMAGE_PIXELS
    assert reason(_png_with_size(100_000, 100_000)) == "decompression bomb"  # 1e10 > 2**31
    assert reason(pil_bytes(Image.fromarray(RGB), "JPEG"), max_pixels=80 * 60 - 1) == "decompression bomb"
    assert reason(tiff_bytes(np.zeros((5, 6, 4), np.uint16), photometric="rgb", extrasamples=["unassalpha"]),
                  max_pixels=29) == "decompression bomb"  # the tifffile path checks too
    assert limit == Image.MAX_IMAGE_PIXELS  # nothing global changed


def test_truncated_images_are_detected_even_if_someone_loads_truncated(monkeypatch) -> None:
    jpeg = pil_bytes(Image.fromarray(RGB), "JPEG")
    png = pil_bytes(Image.fromarray(RGB), "PNG")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # another library's global choice
    assert reason(jpeg[: len(jpeg) // 2]) == "truncated image"
    assert reason(jpeg[:-2]) == "truncated image"  # only the end-of-image marker missing
    assert reason(png[: len(png) // 2]) == "truncated image"
    assert reason(png[:-12]) == "truncated image"  # IEND chunk missing


def test_truncated_tiff_is_detected() -> None:
    data = tiff_bytes(np.tile(RGB, (4, 4, 1)), photometric="rgb")
    assert reason(data[: len(data) // 2]) == "truncated image"


def test_zero_garbage_and_unsupported() -> None:
    assert reason(b"") == "zero bytes"
    assert reason(RNG.integers(0, 256, 1000, dtype=np.uint8).tobytes()) == "unreadable image"
    assert reason(b"\xff\xd8\xff\xe0" + bytes(64) + b"\xff\xda" + bytes(32) + b"\xff\xd9") == "unreadable image"
    assert reason(b"%!PS-Adobe-3.0 EPSF-3.0\n") == "unreadable image"  # not on the allow-list
    assert reason(tiff_bytes(np.zeros((3, 3, 3), np.uint8), photometric="cielab")) == "unsupported mode"
    with pytest.raises(ValueError, match="channels=2"):
        decode_image(b"x", "a", 2)


# ------------------------------------------------------------------------------------------------
# properties
@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), channels=st.sampled_from([1, 3]),
       fmt=st.sampled_from(["PNG", "TIFF", "BMP", "PPM"]), seed=st.integers(0, 2**32 - 1))
def test_lossless_formats_round_trip(h: int, w: int, channels: int, fmt: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3) if channels == 3 else (h, w), dtype=np.uint8)
    assert np.array_equal(decode_image(pil_bytes(Image.fromarray(arr), fmt), f"x.{fmt}", channels), arr)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 30), w=st.integers(1, 30), seed=st.integers(0, 2**32 - 1))
def test_to_channels_matches_pillow(h: int, w: int, seed: int) -> None:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    grey = to_channels(rgb, 1)  # upstream Pillow's fixed point; pillow-simd rounds differently by <= 1
    assert np.abs(grey.astype(int) - np.asarray(Image.fromarray(rgb).convert("L"))).max() <= 1
    assert np.array_equal(to_channels(to_channels(grey, 3), 1), grey)
    assert to_channels(grey[..., None], 1).shape == (h, w)
    with pytest.raises(ValueError, match="shape"):
        to_channels(np.zeros((2, 2, 4), np.uint8), 3)
