"""Tiled image pyramids: build one as a standard pyramidal TIFF, and read regions of it lazily.

Format (DESIGN.md section 3): a tiled TIFF whose pages in the main IFD chain are the levels.
Page 0 is level 0 (the stored full resolution); page ``i + 1`` (NewSubfileType = 1, "reduced
resolution") is page ``i`` box-filtered to ``ceil(w / 2) x ceil(h / 2)``; the last level is the
first that fits in one tile. Tiles are ``tile x tile`` JPEGs, each a complete JPEG stream (no
shared JPEGTables) that Pillow decodes alone: single-component for grey (photometric
MinIsBlack), YCbCr 4:2:0 for colour (tifffile's JPEG default; 4:2:0 is why the tile must be a
multiple of 16). Edge tiles are padded by repeating the edge pixels, which keeps JPEG ringing out
of the image. Successive pages (not SubIFDs) is the layout GDAL/QGIS read as internal overviews,
OpenSlide as a generic tiled TIFF, libvips as a page pyramid and tifffile as ``series[0].levels``.

``PyramidReader`` reads the IFDs (tiff_ifd.py: one read-ahead request per level), then only the
bytes of the tiles a region needs. JPEG output is byte-identical for the same input on the same
libjpeg-turbo build (tifffile encodes through imagecodecs).
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import tifffile
from PIL import Image

from pipeline.errors import FormatError
from pipeline.jpeg_tile import decode_jpeg_tile
from pipeline.resample import (
    Box,
    Window,
    choose_level,
    level_box,
    parse_box,
    parse_out_size,
    resample,
    sampling_window,
    tiles_of,
)
from pipeline.tiff_ifd import parse_pyramid

# benchmarks/tile_size.py (4096 px RGB, 20 regions of 256-1024 px read at 224): 256 has the lowest
# CPU per region (2.8-3.0 ms vs 3.7-4.0 at 128, 3.7-4.3 at 512) and stores 1.40-1.73x a plain JPEG
# (128: 1.62-2.24x); 512 decodes 1.7x more pixels per region.
DEFAULT_TILE = 256
TileKey = tuple[int, int, int]  # (level, tx, ty)


def _check_build_args(image: np.ndarray, tile: int, quality: int) -> np.ndarray:
    if not isinstance(tile, int | np.integer) or tile % 16 or not 16 <= tile <= 1024:
        raise ValueError(f"tile={tile!r}: must be a multiple of 16 in 16..1024 (JPEG MCU, TIFF tiles)")
    if not isinstance(quality, int | np.integer) or not 1 <= quality <= 100:
        raise ValueError(f"quality={quality!r}: must be an int in 1..100")
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"image: expected a uint8 numpy array, got {type(image).__name__} "
                         f"{getattr(image, 'dtype', '')}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3) or 0 in image.shape:
        raise ValueError(f"image.shape={image.shape}: expected non-empty (H, W) or (H, W, 3)")
    return image


def pyramid_levels(image: np.ndarray, tile: int) -> list[np.ndarray]:
    """Level 0 is ``image``; each next level is the previous box-filtered to ceil(w/2) x ceil(h/2)."""
    levels = [image]
    while levels[-1].shape[0] > tile or levels[-1].shape[1] > tile:
        h, w = levels[-1].shape[:2]
        size = (-(-w // 2), -(-h // 2))
        levels.append(np.asarray(Image.fromarray(levels[-1]).resize(size, Image.BOX)))
    return levels


def level_sizes(width: int, height: int, tile: int) -> list[tuple[int, int]]:
    """(w, h) of every level ``pyramid_levels`` makes: halved (ceil) until one tile holds the level."""
    sizes = [(width, height)]
    while sizes[-1][0] > tile or sizes[-1][1] > tile:
        w, h = sizes[-1]
        sizes.append((-(-w // 2), -(-h // 2)))
    return sizes


def tiles_of_band(level: np.ndarray, tile: int):
    """Row-major tiles of ``level`` (or of a band of it starting at a tile row), edge tiles padded
    by repeating the edge pixels."""
    h, w = level.shape[:2]
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            t = level[y:y + tile, x:x + tile]
            pad = ((0, tile - t.shape[0]), (0, tile - t.shape[1])) + ((0, 0),) * (t.ndim - 2)
            yield np.pad(t, pad, mode="edge") if t.shape[:2] != (tile, tile) else t


def build_pyramid(image: np.ndarray, tile: int = DEFAULT_TILE, quality: int = 90) -> bytes:
    """Encode uint8 ``image`` (H, W) or (H, W, 3) as a JPEG-tiled pyramidal TIFF (module doc).

    Deterministic: no date, software or description tags, so the same pixels and arguments give
    the same bytes. BigTIFF is used when the raw pixels pass 2 GiB (classic TIFF offsets are 32-bit).

    Raises:
        ValueError: ``tile`` not a multiple of 16 in 16..1024, ``quality`` not in 1..100, or an
            image that is not uint8 (H, W) / (H, W, 1) / (H, W, 3).
    """
    image = _check_build_args(image, tile, quality)
    levels = pyramid_levels(image, tile)
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf, bigtiff=sum(lv.nbytes for lv in levels) > 2**31) as tw:
        for i, lv in enumerate(levels):
            channels = 3 if lv.ndim == 3 else 1
            write_level(tw, tiles_of_band(lv, tile), (lv.shape[1], lv.shape[0]), channels, tile, quality, i)
    return buf.getvalue()


def write_level(tw: tifffile.TiffWriter, tiles, size: tuple[int, int], channels: int, tile: int,
                quality: int, index: int) -> None:
    """Append one level (an iterator of row-major ``tile`` x ``tile`` tiles) as page ``index``.

    The one place the page's tags are chosen, so in-memory and streaming builds agree byte for byte.
    """
    w, h = size
    shape = (h, w, 3) if channels == 3 else (h, w)
    tw.write(tiles, shape=shape, dtype=np.uint8, tile=(tile, tile),
             photometric="rgb" if channels == 3 else "minisblack", compression="jpeg",
             compressionargs={"level": int(quality)}, subfiletype=1 if index else 0, metadata=None,
             software=False, buffersize=tile * tile * channels * (w // tile + 1))
    # buffersize: one tile row. With several encoding threads (TIFFFILE_NUM_THREADS, or more than
    # 2 cores) tifffile would otherwise gather up to 512 MB of tiles first, and the streaming
    # build's tiles are views that keep their source bands alive (771 MB at 32k measured).


@dataclass(frozen=True)
class _Plan:
    """How one box is served: level, level-pixel window, box inside the window, tiles to decode."""

    level: int
    window: Window
    box: Box
    tiles: tuple[TileKey, ...]


class PyramidReader:
    """Lazy reader of a pyramid made by ``build_pyramid`` (or any 8-bit JPEG-tiled TIFF pyramid).

    ``src`` is the file's bytes or a seekable binary file object (a local file, an fsspec file
    doing HTTP range reads, a ``ranged.RangedFile`` whose ``read_ranges`` fetches all the tiles of
    a call in one batch). Only the header/IFDs (``header_bytes``) and the tiles a read needs
    (``bytes_read``) are ever fetched; ``defer_index=True`` also leaves a level's tile index
    unread until a tile of it is needed (tiff_ifd.DeferredInts), for huge images read coarsely. Decoded tiles are kept in an LRU cache of ``cache_tiles``;
    ``decoded_pixels`` (tile areas) and ``tiles_decoded`` count real decodes only. One reader may
    serve many threads: file reads, the cache and the counters are under locks, decodes are not.

    Raises (constructor):
        FormatError: corrupt or unsupported file, or level 0 larger than ``max_pixels``.
        ValueError: bad limits.
    """

    def __init__(self, src: bytes | BinaryIO, *, where: str = "<bytes>", max_pixels: int = 2**34,
                 max_tile_bytes: int = 16 << 20, cache_tiles: int = 256, defer_index: bool = False) -> None:
        if max_pixels < 1 or max_tile_bytes < 1 or cache_tiles < 0:
            raise ValueError(f"{where}: max_pixels={max_pixels}, max_tile_bytes={max_tile_bytes}, "
                             f"cache_tiles={cache_tiles}: limits must be positive (cache may be 0)")
        self.where, self.max_tile_bytes, self.cache_tiles = where, max_tile_bytes, cache_tiles
        self._io_lock, self._lock = threading.Lock(), threading.Lock()
        self._cache: OrderedDict[TileKey, Image.Image] = OrderedDict()  # decoded, Pillow's own buffer
        self._inflight: dict[TileKey, threading.Event] = {}
        self.header_bytes = self.bytes_read = self.decoded_pixels = self.tiles_decoded = 0
        if isinstance(src, bytes | bytearray | memoryview):
            self._data: bytes | None = bytes(src)
            self._file: BinaryIO | None = None
            self.size = len(self._data)
        else:
            self._data, self._file = None, src
            try:
                self.size = src.seek(0, io.SEEK_END)
            except (OSError, ValueError, AttributeError) as exc:
                raise FormatError(f"{where}: source is not a seekable binary file ({exc})") from exc
        self._prefetched: dict[TileKey, bytes] = {}
        self._levels = parse_pyramid(self._read_header, self.size, where, max_pixels, defer_index)

    # ----------------------------------------------------------------------------------------------
    # properties
    @property
    def width(self) -> int:
        return self._levels[0].width

    @property
    def height(self) -> int:
        return self._levels[0].height

    @property
    def channels(self) -> int:
        return self._levels[0].samples

    @property
    def tile(self) -> int:
        return self._levels[0].tile

    @property
    def levels(self) -> list[tuple[int, int]]:
        """(width, height) of every level, level 0 first."""
        return [(lv.width, lv.height) for lv in self._levels]

    # ----------------------------------------------------------------------------------------------
    # bytes and tiles
    def _read_raw(self, offset: int, size: int) -> bytes:
        if self._data is not None:
            return self._data[offset:offset + size]
        assert self._file is not None  # invariant: one of _data / _file is set in __init__
        with self._io_lock:
            try:
                self._file.seek(offset)
                return self._file.read(size)
            except (OSError, ValueError) as exc:
                raise FormatError(f"{self.where}: read of {size} bytes at {offset} failed: {exc}") from exc

    def _read_header(self, offset: int, size: int) -> bytes:
        data = self._read_raw(offset, size)
        with self._lock:
            self.header_bytes += len(data)
        return data

    def _tile_span(self, key: TileKey) -> tuple[int, int]:
        level, tx, ty = key
        lv = self._levels[level]
        index = ty * lv.tiles_across + tx
        offset, count = lv.offsets[index], lv.bytecounts[index]
        if not 0 < count <= self.max_tile_bytes or offset + count > self.size:
            raise FormatError(f"{self.where}: tile {key} of {count} bytes at {offset} refused "
                              f"(max_tile_bytes={self.max_tile_bytes}, file {self.size} bytes)")
        return offset, count

    def _prefetch(self, keys: Sequence[TileKey]) -> None:
        """Fetch the compressed bytes of tiles not yet cached in one batch, when the source offers
        ``read_ranges`` (ranged.RangedFile: merged, concurrent range requests). Otherwise a no-op:
        tiles are then read one by one as they are decoded."""
        ranged = getattr(self._file, "read_ranges", None)
        if ranged is None:
            return
        with self._lock:
            missing = [k for k in keys if k not in self._cache and k not in self._prefetched]
        if len(missing) < 2:
            return
        spans = [self._tile_span(k) for k in missing]
        with self._io_lock:
            blobs = ranged(spans)
        with self._lock:
            self._prefetched.update(zip(missing, blobs))

    def _fetch_tile(self, key: TileKey) -> bytes:
        lv = self._levels[key[0]]
        offset, count = self._tile_span(key)
        with self._lock:
            data = self._prefetched.pop(key, None)
        if data is None:
            data = self._read_raw(offset, count)
        if len(data) != count:
            raise FormatError(f"{self.where}: tile {key}: short read ({len(data)} of {count} bytes)")
        with self._lock:
            self.bytes_read += count
        if lv.jpegtables:  # abbreviated stream: splice the shared tables in after SOI
            if not (lv.jpegtables.startswith(b"\xff\xd8") and data.startswith(b"\xff\xd8")):
                raise FormatError(f"{self.where}: tile {key}: JPEGTables or tile lacks a JPEG SOI")
            data = lv.jpegtables[:-2] + data[2:]
        return data

    def _decode_tile(self, key: TileKey) -> Image.Image:
        lv = self._levels[key[0]]
        data = self._fetch_tile(key)
        try:
            im = decode_jpeg_tile(data, lv.tile, "RGB" if lv.samples == 3 else "L")
        except Exception as exc:  # noqa: BLE001 - any decoder failure on untrusted bytes is a format error
            raise FormatError(f"{self.where}: tile {key}: {type(exc).__name__}: {exc}") from exc
        with self._lock:
            self.tiles_decoded += 1
            self.decoded_pixels += lv.tile * lv.tile
        return im  # kept as Pillow decoded it: regions are pasted and resized without a numpy copy

    def _tile(self, key: TileKey) -> Image.Image:
        """The decoded tile, from the cache or decoded once even when threads race for it."""
        while True:
            with self._lock:
                if key in self._cache:
                    self._cache.move_to_end(key)
                    return self._cache[key]
                event = self._inflight.get(key)
                owner = event is None
                if owner:
                    event = self._inflight[key] = threading.Event()
            if not owner:
                event.wait()
                continue  # cached now (or evicted / failed: then this thread tries itself)
            try:
                arr = self._decode_tile(key)
                with self._lock:
                    if self.cache_tiles:
                        self._cache[key] = arr
                        while len(self._cache) > self.cache_tiles:
                            self._cache.popitem(last=False)
                return arr
            finally:
                with self._lock:
                    del self._inflight[key]
                event.set()

    # ----------------------------------------------------------------------------------------------
    # regions
    def _plan(self, box: Box, out_size: tuple[int, int], level: int | None, max_upsample: float = 1.0) -> _Plan:
        box = parse_box(box)
        sizes = self.levels
        if level is None:
            level = choose_level(box, out_size, sizes, max_upsample)
        elif not 0 <= level < len(sizes):
            raise ValueError(f"{self.where}: level={level}: pyramid has levels 0..{len(sizes) - 1}")
        lbox = level_box(box, sizes[0], sizes[level])
        window = sampling_window(lbox)
        inside = window.clip(*sizes[level])
        tiles = () if inside is None else tuple((level, tx, ty) for tx, ty in tiles_of(inside, self.tile))
        rel = (lbox[0] - window.x0, lbox[1] - window.y0, lbox[2] - window.x0, lbox[3] - window.y0)
        return _Plan(level, window, rel, tiles)

    def _render(self, plan: _Plan, tiles: dict[TileKey, Image.Image], out_size: tuple[int, int],
                antialias: bool, fill: int) -> np.ndarray:
        if not plan.tiles:
            return np.full((out_size[1], out_size[0]) + ((3,) if self.channels == 3 else ()), fill, np.uint8)
        window = self._window(plan, tiles, fill)
        if antialias:  # resample.resample's antialiased branch, on the Pillow image we already have
            return np.asarray(window.resize(out_size, Image.BILINEAR, box=plan.box))
        return resample(np.asarray(window), plan.box, out_size, antialias)

    def _window(self, plan: _Plan, tiles: dict[TileKey, Image.Image], fill: int) -> Image.Image:
        """The plan's window of its level (``fill`` outside it) by Pillow crops and pastes: the numpy
        round trip of every tile and window it replaces cost a third of the decode itself."""
        win, t = plan.window, self.tile
        lw, lh = self.levels[plan.level]
        covered = min(win.x0, win.y0) >= 0 and win.x1 <= lw and win.y1 <= lh  # the tiles fill every pixel
        if covered and len(plan.tiles) == 1:
            _, tx, ty = plan.tiles[0]  # the window inside one tile: crop it
            return tiles[plan.tiles[0]].crop((win.x0 - tx * t, win.y0 - ty * t, win.x1 - tx * t, win.y1 - ty * t))
        mode = "RGB" if self.channels == 3 else "L"
        colour = None if covered else (fill,) * 3 if mode == "RGB" else fill
        canvas = Image.new(mode, (win.shape[1], win.shape[0]), colour)  # None: left uninitialised
        for key in plan.tiles:
            _, tx, ty = key
            tile = tiles[key]
            if (tx + 1) * t > lw or (ty + 1) * t > lh:  # an edge tile: drop its padding first
                tile = tile.crop((0, 0, min(t, lw - tx * t), min(t, lh - ty * t)))
            canvas.paste(tile, (tx * t - win.x0, ty * t - win.y0))  # Pillow clips to the canvas
        return canvas

    def read_regions(self, boxes: Sequence[Box], out_size: tuple[int, int] | int, *,
                     executor: Executor | None = None, antialias: bool = True, fill: int = 0,
                     level: int | None = None, max_upsample: float = 1.0) -> list[np.ndarray]:
        """Read many boxes (see ``read_region``); tile decodes and resampling run in ``executor``.

        Tiles shared by several boxes are decoded once per call even when the cache is smaller.

        Raises:
            FormatError: a needed tile is corrupt or over ``max_tile_bytes``.
            ValueError: a bad box, out_size, fill or level.
        """
        size = parse_out_size(out_size)
        if not 0 <= fill <= 255:
            raise ValueError(f"fill={fill}: must be in 0..255")
        plans = [self._plan(b, size, level, max_upsample) for b in boxes]
        keys = sorted({k for p in plans for k in p.tiles})
        self._prefetch(keys)
        if executor is None:
            tiles = {k: self._tile(k) for k in keys}
            return [self._render(p, tiles, size, antialias, fill) for p in plans]
        tiles = dict(zip(keys, executor.map(self._tile, keys)))
        return list(executor.map(lambda p: self._render(p, tiles, size, antialias, fill), plans))

    def read_region(self, box: Box, out_size: tuple[int, int] | int, *, antialias: bool = True,
                    fill: int = 0, level: int | None = None, max_upsample: float = 1.0) -> np.ndarray:
        """Pixels of ``box`` (xyxy, level-0 pixel coordinates, may be fractional or reach outside)
        resized to ``out_size`` ((w, h) or an int): uint8 (h, w) or (h, w, 3).

        The level is the coarsest that covers the request (``resample.choose_level``; with
        ``max_upsample`` > 1, one up to that factor short of it, then upsampled) unless
        ``level`` forces one (``level=0`` with ``antialias=False`` reproduces the paper's
        "crop, then bilinear from full resolution" exactly). Only the tiles the box intersects
        are decoded. The box is cut from the level padded with ``fill`` (snapped outward to whole
        level pixels) and resized with its exact fractional position, filters clamped to the
        crop (resample.py). ``antialias=True`` is Pillow's antialiased bilinear;
        ``antialias=False`` plain bilinear interpolation, as torch's ``interpolate`` of a crop.

        Raises:
            FormatError: a needed tile is corrupt or over ``max_tile_bytes``.
            ValueError: a bad box, out_size, fill or level.
        """
        return self.read_regions([box], out_size, antialias=antialias, fill=fill, level=level,
                                 max_upsample=max_upsample)[0]

    def read_level(self, level: int) -> np.ndarray:
        """The whole of one level, decoded tile by tile: uint8 (h, w) or (h, w, 3).

        Raises:
            FormatError: a tile is corrupt. ValueError: no such level.
        """
        if not 0 <= level < len(self._levels):
            raise ValueError(f"{self.where}: level={level}: pyramid has levels 0..{len(self._levels) - 1}")
        w, h = self.levels[level]
        t = self.tile
        out = np.empty((h, w) + ((3,) if self.channels == 3 else ()), np.uint8)
        self._prefetch([(level, tx, ty) for tx, ty in tiles_of(Window(0, 0, w, h), t)])
        for tx, ty in tiles_of(Window(0, 0, w, h), t):
            tile = np.asarray(self._tile((level, tx, ty)))
            out[ty * t:(ty + 1) * t, tx * t:(tx + 1) * t] = tile[:min(t, h - ty * t), :min(t, w - tx * t)]
        return out

    def level_bytes(self, level: int) -> int:
        """Compressed bytes of one level's tiles (storage accounting; reads nothing)."""
        return sum(self._levels[level].bytecounts)

    def full_pixels(self) -> int:
        """Pixels of level 0: the denominator of the decoded-pixel honesty metric."""
        return self.width * self.height

