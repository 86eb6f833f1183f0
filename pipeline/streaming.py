"""Streaming pyramid builds: a source far larger than memory becomes the same pyramid, band by band.

``build_pyramid`` (pyramid.py) holds the image and all its levels in memory; a 64k x 64k RGB slide
is 12 GiB. Here a source only has to hand over horizontal *bands* of rows, top to bottom
(``BandSource``): a plain tiled TIFF decoded tile row by tile row (tiff_bands.py), anything else
libvips opens (striped TIFF, huge JPEG/PNG) decoded sequentially, an OpenSlide slide
(sources/slides.py), or an array (tests). Memory stays at about one band (``tile`` rows of full
width: 25 MB for a 32k RGB level 0) plus what the source keeps, whatever the image size:

1. Level 0 is written to the TIFF one tile row at a time (``tile`` rows of the band); tifffile
   consumes the tile iterator lazily. While a band goes by, it is box-filtered to the next level
   (``halving.Halver``, 32 output rows per resize, no copy of the band) and those rows are
   appended, raw, to an anonymous temporary file (plain ``write``, not a memory map, so the pages
   never count in this process's resident memory).
2. Each next level is read back from its temporary file band by band, written, and halved again.

Same layout and bytes as ``build_pyramid``, for every size (tested): levels are
``ceil(w / 2) x ceil(h / 2)`` made with Pillow's BOX filter, cut per group of rows and checked
against Pillow's whole-level filter table (``halving``), edge tiles padded by repetition, the same
tifffile arguments.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

import numpy as np
import tifffile

from pipeline.halving import Halver
from pipeline.pyramid import DEFAULT_TILE, level_sizes, tiles_of_band, write_level

BAND_ROWS_MAX = 4096  # rows a source band may have; tile rows are what we ask for
FETCH_COLUMNS = 1024  # columns per libvips fetch of a band (VipsBands.read_band)


class BandSource(Protocol):
    """An image readable top to bottom in horizontal bands of full width."""

    width: int
    height: int
    channels: int  # 1 (grey) or 3 (RGB)

    def read_band(self, y0: int, y1: int) -> np.ndarray:
        """Rows ``[y0, y1)``: uint8 (y1 - y0, width) or (y1 - y0, width, 3). Called in row order."""
        ...


@dataclass
class ArrayBands:
    """Bands of an array already in memory (tests, and small images through the same code path)."""

    array: np.ndarray

    def __post_init__(self) -> None:
        if self.array.dtype != np.uint8 or self.array.ndim not in (2, 3) or (
                self.array.ndim == 3 and self.array.shape[2] != 3) or 0 in self.array.shape:
            raise ValueError(f"array {self.array.dtype} {self.array.shape}: expected uint8 (H, W) or (H, W, 3)")
        self.height, self.width = (int(v) for v in self.array.shape[:2])
        self.channels = 1 if self.array.ndim == 2 else 3

    def read_band(self, y0: int, y1: int) -> np.ndarray:
        return self.array[y0:y1]


class _RawBands:
    """Bands of a level stored raw (row-major uint8) in a temporary file."""

    def __init__(self, f: BinaryIO, width: int, height: int, channels: int) -> None:
        self.f, self.width, self.height, self.channels = f, width, height, channels
        self._row = width * channels

    def read_band(self, y0: int, y1: int) -> np.ndarray:
        self.f.seek(y0 * self._row)
        data = self.f.read((y1 - y0) * self._row)
        if len(data) != (y1 - y0) * self._row:
            raise OSError(f"temporary level file: short read of rows {y0}..{y1}")
        shape = (y1 - y0, self.width) + ((3,) if self.channels == 3 else ())
        return np.frombuffer(data, np.uint8).reshape(shape)


@dataclass(frozen=True)
class StreamedPyramid:
    """What ``build_pyramid_stream`` wrote: sizes of its levels and its byte count."""

    levels: list[tuple[int, int]]
    size: int
    bigtiff: bool


def _check(bands: BandSource, tile: int, quality: int) -> None:
    if not isinstance(tile, int) or tile % 16 or not 16 <= tile <= 1024:
        raise ValueError(f"tile={tile!r}: must be a multiple of 16 in 16..1024 (JPEG MCU, TIFF tiles)")
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality={quality!r}: must be an int in 1..100")
    if bands.channels not in (1, 3) or bands.width < 1 or bands.height < 1:
        raise ValueError(f"band source {bands.width}x{bands.height}x{bands.channels}: need a non-empty "
                         "image of 1 or 3 channels")


def _level_tiles(read: Any, size: tuple[int, int], channels: int, tile: int,
                 halver: Halver | None) -> Iterator[np.ndarray]:
    w, h = size
    for y0 in range(0, h, tile):
        band = np.asarray(read(y0, min(y0 + tile, h)))
        expect = (min(y0 + tile, h) - y0, w) + ((3,) if channels == 3 else ())
        if band.shape != expect or band.dtype != np.uint8:
            raise ValueError(f"band rows {y0}..{y0 + expect[0]}: got {band.dtype} {band.shape}, expected uint8 {expect}")
        if halver is not None:
            halver.push(band)
        yield from tiles_of_band(band, tile)
        del band  # before the next read: a band may be a view that keeps the source's buffer alive


def build_pyramid_stream(bands: BandSource, out: BinaryIO, tile: int = DEFAULT_TILE, quality: int = 90,
                         tmp_dir: str | None = None) -> StreamedPyramid:
    """Write the pyramid of ``bands`` to the seekable binary file ``out`` (module docstring).

    Temporary level files go to ``tmp_dir`` (default: the system's); they take about a third of
    level 0's raw size at most and vanish when closed, also on errors.

    Raises:
        ValueError: bad tile or quality, or a band source that hands over wrong shapes.
        OSError: writing ``out`` or a temporary file failed; the source's own read errors.
    """
    _check(bands, tile, quality)
    sizes = level_sizes(bands.width, bands.height, tile)
    c = bands.channels
    bigtiff = sum(w * h * c for w, h in sizes) > 2**31
    start = out.tell()
    read = bands.read_band
    with tifffile.TiffWriter(out, bigtiff=bigtiff) as tw:
        prev: BinaryIO | None = None
        try:
            for i, size in enumerate(sizes):
                nxt = tempfile.TemporaryFile(dir=tmp_dir) if i + 1 < len(sizes) else None  # noqa: SIM115
                try:
                    halver = Halver(size, sizes[i + 1], nxt) if nxt is not None else None
                    write_level(tw, _level_tiles(read, size, c, tile, halver), size, c, tile, quality, i)
                    if halver is not None:
                        halver.finish()
                        nxt.flush()
                except BaseException:
                    if nxt is not None:
                        nxt.close()
                    raise
                if prev is not None:
                    prev.close()
                prev = nxt
                if nxt is not None:
                    read = _RawBands(nxt, *sizes[i + 1], c).read_band
        finally:
            if prev is not None:
                prev.close()
    return StreamedPyramid(levels=sizes, size=out.tell() - start, bigtiff=bigtiff)


def build_pyramid_file(bands: BandSource, tile: int = DEFAULT_TILE, quality: int = 90,
                       tmp_dir: str | None = None) -> tuple[BinaryIO, StreamedPyramid]:
    """``build_pyramid_stream`` into an anonymous temporary file, returned rewound (caller closes it)."""
    f = tempfile.NamedTemporaryFile(dir=tmp_dir, suffix=".tif")  # noqa: SIM115 - handed to the caller
    try:
        info = build_pyramid_stream(bands, f, tile, quality, tmp_dir)
    except BaseException:
        f.close()
        raise
    f.seek(0)
    return f, info


class VipsBands:
    """Bands of any image libvips opens (tiled/striped TIFF and BigTIFF, pyramidal TIFF page 0,
    JPEG, PNG, ...), converted the way ``images.decode_image`` converts: alpha composited onto
    black, 16-bit scaled by 1/257, grey repeated to RGB or RGB reduced by ITU-R 601 luma.

    The file is opened for sequential access: bands are asked for top to bottom, so libvips decodes
    in one pass keeping a few scanlines or a tile row (random access kept whole strips of a striped
    16k TIFF cached: 1 GB resident). Bands come from one ``pyvips.Region``: one pipeline per image.

    ``VipsBands.open(path, ...)`` raises SampleError: an unreadable file ("unreadable image"),
    more than ``max_pixels`` pixels ("decompression bomb", from the header), or a band format it
    cannot map ("unsupported mode"); ``read_band`` raises it for data that fails to decode.
    """

    def __init__(self, image: Any, channels: int, where: str) -> None:
        import pyvips

        self.where, self.source_size = where, (image.width, image.height)
        self.image = _to_uint8_channels(image, channels, where)
        self.width, self.height, self.channels = image.width, image.height, channels
        self._region = pyvips.Region.new(self.image)

    @classmethod
    def open(cls, path: str, channels: int, where: str, max_pixels: int) -> VipsBands:
        """Open a local file (header only until bands are read)."""
        import pyvips

        from pipeline.errors import SampleError

        try:
            img = pyvips.Image.new_from_file(path, access="sequential", fail=True)
        except pyvips.Error as exc:
            raise SampleError(where, "unreadable image", f"libvips: {str(exc).strip()[:500]}") from None
        if img.width * img.height > max_pixels:
            raise SampleError(where, "decompression bomb", f"{img.width}x{img.height} > max_pixels={max_pixels}")
        return cls(img, channels, where)

    def shrunk(self, max_side: int) -> VipsBands:
        """These bands downscaled (lanczos3, streaming) so the longer side is ``max_side``."""
        scale = max_side / max(self.width, self.height)
        if max_side <= 0 or scale >= 1:
            return self
        out = VipsBands(self.image.resize(scale, kernel="lanczos3"), self.channels, self.where)
        out.source_size = self.source_size
        return out

    def read_band(self, y0: int, y1: int) -> np.ndarray:
        """Rows ``[y0, y1)``, fetched ``FETCH_COLUMNS`` columns at a time into one array.

        One fetch of a whole 256-row band of a 32k image cost about 1.6 MB of peak RSS per row (libvips'
        region buffer, the copy it hands back, and its tile cache's working set around the request),
        387 MB at 32k; column chunks keep libvips' share at its own tile cache (measured: docs/gigapixel.md).
        """
        import pyvips

        from pipeline.errors import SampleError

        shape = (y1 - y0, self.width) + ((3,) if self.channels == 3 else ())
        out = np.empty(shape, np.uint8)
        for x0 in range(0, self.width, FETCH_COLUMNS):
            x1 = min(x0 + FETCH_COLUMNS, self.width)
            try:
                data = self._region.fetch(x0, y0, x1 - x0, y1 - y0)
            except pyvips.Error as exc:
                reason = "truncated image" if "truncat" in str(exc).lower() or "premature" in str(exc).lower() \
                    else "unreadable image"
                raise SampleError(self.where, reason, f"libvips at rows {y0}..{y1}: {str(exc).strip()[:500]}") from None
            out[:, x0:x1] = np.frombuffer(data, np.uint8).reshape((y1 - y0, x1 - x0) + shape[2:])
        return out


def _to_uint8_channels(img: Any, channels: int, where: str) -> Any:
    from pipeline.errors import SampleError

    if img.interpretation == "cmyk" or img.bands == 4 and not img.hasalpha():
        img = img.colourspace("srgb")
    if img.hasalpha():  # c * a / max, as composite_on_black (floor of (c * a + max / 2) / max)
        top = 65535.0 if img.format == "ushort" else 255.0
        colour, alpha = img.extract_band(0, n=img.bands - 1), img[img.bands - 1]
        img = ((colour * alpha + (top - 1) / 2) / top).cast(colour.format)
    if img.format == "ushort":
        img = (img / 257.0 + 0.5).cast("uchar")
    elif img.format in ("float", "double"):  # taken as [0, 1]: a min..max pass would read it all
        img = (img * 255.0 + 0.5).cast("uchar")
    elif img.format != "uchar":
        raise SampleError(where, "unsupported mode", f"libvips band format {img.format}")
    if img.bands not in (1, 3):
        raise SampleError(where, "unsupported mode", f"{img.bands} bands")
    if channels == 3 and img.bands == 1:
        return img.bandjoin([img, img])
    if channels == 1 and img.bands == 3:
        luma = (img[0] * 19595 + img[1] * 38470 + img[2] * 7471 + 32768) / 65536
        return luma.floor().cast("uchar")
    return img
