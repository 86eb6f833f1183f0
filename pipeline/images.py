"""Decode one source image (JPEG, PNG, TIFF, ...) into a uint8 array, or say clearly why not.

Every dataset source goes through ``decode_image``, so the rules live here once:

- The format is found from the bytes, never from the file name (ImageNet has a PNG named .JPEG).
- Pillow decodes first; tifffile decodes the TIFFs Pillow cannot (16-bit or float multi-sample,
  exotic compressions).
- The declared size is checked against ``max_pixels`` after parsing the header and before any
  pixel is decoded. Pillow's own bomb check (a process-wide ``MAX_IMAGE_PIXELS``, ~179 MP) is
  not used on open, so ``max_pixels`` is the one limit and nothing global is changed.
- Truncation is detected from the bytes (JPEG: an EOI marker after the last scan; PNG: an IEND
  chunk after the last IDAT), so a process that set ``ImageFile.LOAD_TRUNCATED_IMAGES`` cannot
  make a half-downloaded file pass as an image.
- Modes: 1, L, P (palette, with or without transparency), LA, RGB, RGBA, CMYK (the multiplicative
  formula ``R = (255 - C)(255 - K) / 255``, what Pillow's convert does; no ICC), YCbCr, I;16,
  I (16-bit PNG or any TIFF integer), F. Alpha is composited onto black (``c * a / 255``):
  pixels that are transparent carry arbitrary colours, so dropping alpha would show them.
- Integer data wider than 8 bits is scaled by the full range of its dtype (uint16: ``v / 257``;
  Pillow's own 16-bit RGB decode keeps the high byte, at most one level away). Float data is
  taken as [0, 1] when it lies there, else scaled by its own finite min..max (NaN -> 0).
- EXIF orientation is ignored: boxes in dataset metadata refer to stored pixels.

Errors are ``SampleError(where, reason, detail)`` with reasons from ``REASONS``.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

from pipeline.errors import SampleError

REASONS = ("zero bytes", "truncated image", "unreadable image", "decompression bomb", "unsupported mode")

# Formats Pillow may open for us. An allow-list keeps plugins that shell out (EPS runs
# Ghostscript) or parse exotic containers away from untrusted bytes.
PILLOW_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "GIF", "WEBP", "PPM", "MPO")

_JPEG_SOI = b"\xff\xd8\xff"
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_TIFF_SIGS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Errors Pillow raises for bytes it cannot parse or decode.
_PIL_ERRORS = (OSError, ValueError, SyntaxError, IndexError, TypeError, KeyError, EOFError, struct.error,
               Image.DecompressionBombError)


def sniff_format(data: bytes) -> str | None:
    """``"jpeg"``, ``"png"``, ``"tiff"`` from the magic bytes, else None (let Pillow try)."""
    if data.startswith(_JPEG_SOI):
        return "jpeg"
    if data.startswith(_PNG_SIG):
        return "png"
    if data[:4] in _TIFF_SIGS:
        return "tiff"
    return None


def jpeg_is_complete(data: bytes) -> bool:
    """True when an EOI marker follows the last start-of-scan.

    Entropy-coded data escapes 0xFF as FF00, so FFDA/FFD9 only occur as markers; an EXIF thumbnail
    ends before the main image's scans, so its EOI does not count.
    """
    sos = data.rfind(b"\xff\xda")
    return sos >= 0 and data.rfind(b"\xff\xd9") > sos


def png_is_complete(data: bytes) -> bool:
    """True when an IEND chunk follows the last IDAT chunk."""
    idat = data.rfind(b"IDAT")
    return idat >= 0 and data.rfind(b"IEND") > idat


def open_pillow(data: bytes, formats: tuple[str, ...] = PILLOW_FORMATS) -> Image.Image | None:
    """Parse the header of ``data`` with Pillow (no pixels decoded); None if no format accepts it.

    This is ``Image.open`` without its global decompression-bomb check, so the caller can apply
    its own per-call limit to ``im.size`` before ``im.load()``. Uses Pillow's plugin registry
    (``Image.OPEN``), the same table ``Image.open`` walks.

    Raises:
        the parse errors of Pillow's plugins other than "not this format" (callers map them).
    """
    Image.init()
    prefix = data[:16]
    for fmt in formats:
        if fmt not in Image.OPEN:
            continue
        factory, accept = Image.OPEN[fmt]
        accepted = True if accept is None else accept(prefix)
        if not accepted or isinstance(accepted, str):
            continue
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue  # the same "not this format after all" that Image.open swallows
    return None


def to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """Return uint8 ``arr`` as (H, W) for ``channels == 1`` or (H, W, 3) for ``channels == 3``.

    Grey to RGB repeats the plane; RGB to grey is Pillow's ITU-R 601-2 luma in upstream Pillow's
    fixed point (``(19595 R + 38470 G + 7471 B + 2**15) >> 16``; pillow-simd rounds differently by
    at most one level), computed here so the result does not depend on which Pillow is installed.

    Raises:
        ValueError: ``channels`` is not 1 or 3, or ``arr`` is not uint8 (H, W), (H, W, 1) or (H, W, 3).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels={channels}: must be 1 or 3")
    if arr.dtype != np.uint8:
        raise ValueError(f"arr.dtype={arr.dtype}: expected uint8")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return arr if channels == 1 else np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"arr.shape={arr.shape}: expected (H, W), (H, W, 1) or (H, W, 3)")
    if channels == 3:
        return arr
    rgb = arr.astype(np.uint32)
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return luma.astype(np.uint8)


def scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map any numeric array onto uint8 by the full range of its dtype (floats: see module doc)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        scaled = (arr.astype(np.float64) - info.min) * (255.0 / (float(info.max) - info.min))
        return np.rint(scaled).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        data = arr.astype(np.float64)
        finite = np.isfinite(data)
        if not finite.any():
            return np.zeros(arr.shape, np.uint8)
        lo, hi = float(data[finite].min()), float(data[finite].max())
        if lo < 0.0 or hi > 1.0:
            data = (data - lo) / (hi - lo) if hi > lo else np.zeros_like(data)
        data = np.where(finite, data, 0.0)
        return np.rint(np.clip(data, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ValueError(f"dtype={arr.dtype}: not a numeric image")


def composite_on_black(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``colour * alpha / 255`` rounded, for uint8 colour (H, W[, C]) and alpha (H, W)."""
    a = alpha.astype(np.uint32)
    if colour.ndim == 3:
        a = a[:, :, None]
    return ((colour.astype(np.uint32) * a + 127) // 255).astype(np.uint8)


class _TryTifffile(Exception):
    """Pillow cannot decode these bytes; for a TIFF, tifffile gets a turn."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def _pillow_to_array(im: Image.Image) -> np.ndarray:
    """Convert a loaded Pillow image of any supported mode to uint8 (H, W) or (H, W, 3)."""
    mode = im.mode
    if mode == "P":
        mode, im = ("RGBA", im.convert("RGBA")) if "transparency" in im.info else ("RGB", im.convert("RGB"))
    elif mode in ("PA", "RGBa", "RGBX", "La", "1", "CMYK", "YCbCr"):
        target = {"PA": "RGBA", "RGBa": "RGBA", "RGBX": "RGB", "La": "LA", "1": "L"}.get(mode, "RGB")
        mode, im = target, im.convert(target)
    if mode in ("L", "RGB"):
        return np.asarray(im)
    if mode in ("LA", "RGBA"):
        arr = np.asarray(im)
        return composite_on_black(arr[..., :-1].squeeze(-1) if mode == "LA" else arr[..., :3], arr[..., -1])
    if mode.startswith("I;16"):
        return scale_to_uint8(np.asarray(im).astype(np.uint16))
    if mode == "I" and im.format == "PNG":
        return scale_to_uint8(np.clip(np.asarray(im), 0, 65535).astype(np.uint16))
    if mode == "F":
        return scale_to_uint8(np.asarray(im))
    raise _TryTifffile("unsupported mode", f"Pillow mode {im.mode}")


def _decode_pillow(data: bytes, where: str, max_pixels: int) -> np.ndarray:
    """Decode with Pillow. Raises SampleError, or _TryTifffile when Pillow cannot do it."""
    try:
        im = open_pillow(data)
    except _PIL_ERRORS as exc:
        raise _TryTifffile("unreadable image", f"{type(exc).__name__}: {exc}") from exc
    if im is None:
        raise _TryTifffile("unreadable image", "no decoder recognises the bytes")
    width, height = im.size
    if width * height > max_pixels:
        raise SampleError(where, "decompression bomb", f"{width}x{height} > max_pixels={max_pixels}")
    if width <= 0 or height <= 0:
        raise _TryTifffile("unreadable image", f"size {width}x{height}")
    try:
        im.load()
        return _pillow_to_array(im)
    except Image.DecompressionBombError as exc:
        raise SampleError(where, "decompression bomb", str(exc)) from exc
    except _PIL_ERRORS as exc:
        reason = "truncated image" if "truncated" in str(exc) else "unreadable image"
        raise _TryTifffile(reason, f"{type(exc).__name__}: {exc}") from exc


def _tiff_to_array(arr: np.ndarray, axes: str, photometric: int, extrasamples: int) -> np.ndarray:
    """Normalise a tifffile array (axes such as YX, YXS, SYX) to uint8 (H, W) or (H, W, 3)."""
    if set(axes) - {"Y", "X", "S"} or "Y" not in axes or "X" not in axes:
        raise _TryTifffile("unsupported mode", f"TIFF axes {axes}")
    if "S" not in axes:
        arr, axes = arr[..., None], axes + "S"
    arr = np.moveaxis(arr, [axes.index("Y"), axes.index("X"), axes.index("S")], [0, 1, 2])
    samples = arr.shape[2]
    alpha = scale_to_uint8(arr[:, :, -1]) if extrasamples and samples in (2, 4) else None
    if photometric == 5 and samples - (alpha is not None) == 4:  # SEPARATED: CMYK
        cmyk = scale_to_uint8(arr).astype(np.uint32)
        k = 255 - cmyk[:, :, 3:4]
        colour = ((255 - cmyk[:, :, :3]) * k + 127) // 255
        return colour.astype(np.uint8)
    colour_samples = samples - (alpha is not None)
    if colour_samples not in (1, 3) or photometric not in (0, 1, 2):
        raise _TryTifffile("unsupported mode", f"TIFF photometric {photometric} with {samples} samples")
    colour = scale_to_uint8(arr[:, :, :colour_samples])
    if photometric == 0:  # MINISWHITE
        colour = 255 - colour
    colour = colour[:, :, 0] if colour_samples == 1 else colour
    return colour if alpha is None else composite_on_black(colour, alpha)


def _decode_tifffile(data: bytes, where: str, max_pixels: int) -> np.ndarray:
    """Decode the first image of a TIFF with tifffile. Raises SampleError."""
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages.first
            width, height = int(page.imagewidth), int(page.imagelength)
            if width * height > max_pixels:
                raise SampleError(where, "decompression bomb", f"{width}x{height} > max_pixels={max_pixels}")
            ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts)]
            if not ends or max(ends) > len(data):
                raise SampleError(where, "truncated image", f"image data ends past {len(data)} bytes")
            arr = page.asarray()
            return _tiff_to_array(arr, page.axes, int(page.photometric), len(page.extrasamples))
    except (SampleError, _TryTifffile):
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of a third-party decoder on untrusted bytes
        raise SampleError(where, "unreadable image", f"tifffile: {type(exc).__name__}: {exc}") from exc


def decode_image(data: bytes, where: str, channels: int, max_pixels: int = 2**31) -> np.ndarray:
    """Decode image bytes to uint8 (H, W) when ``channels == 1`` or (H, W, 3) when ``channels == 3``.

    ``where`` names the input in errors (path, URL or key). See the module docstring for the
    rules (format by content, modes, alpha onto black, 16-bit scaling, truncation).

    Raises:
        SampleError: reason "zero bytes", "truncated image", "unreadable image",
            "decompression bomb" (declared width * height > max_pixels) or "unsupported mode".
        ValueError: ``channels`` is not 1 or 3.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels={channels}: must be 1 or 3")
    if not data:
        raise SampleError(where, "zero bytes")
    kind = sniff_format(data)
    if kind == "jpeg" and not jpeg_is_complete(data):
        raise SampleError(where, "truncated image", "no JPEG end-of-image marker after the last scan")
    if kind == "png" and not png_is_complete(data):
        raise SampleError(where, "truncated image", "no PNG IEND chunk after the last IDAT")
    try:
        arr = _decode_pillow(data, where, max_pixels)
    except _TryTifffile as exc:
        if kind != "tiff":
            raise SampleError(where, exc.reason, exc.detail) from exc
        try:
            arr = _decode_tifffile(data, where, max_pixels)
        except _TryTifffile as exc2:
            raise SampleError(where, exc2.reason, exc2.detail) from exc2
    return to_channels(arr, channels)
